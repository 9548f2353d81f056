"""Heads: what turns the core's final vectors into outputs (logits, class scores, forecasts).

Every head takes the final hidden states [batch, tokens, width] and ``token_mask`` [batch, tokens] (True at real
tokens, False at padding) and knows how many learned prefix tokens (class token, registers) lead the sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerkit.nn.feedforward import activation
from formerkit.nn.norms import build_norm

__all__ = ["ClassificationHead", "LMHead", "MaskedLMHead", "PatchHead", "Pooling", "RegressionHead", "build_head",
           "lm_logits", "unpatchify"]


class Pooling(nn.Module):
    """Turns [batch, tokens, width] into [batch, width]: cls (first token), mean (of real input tokens, prefix tokens
    excluded), last (last real token), or sequence (CCT's attention pooling: a learned softmax weighting of tokens).

    ``token_sizes`` [batch, tokens] (token merging: how many input tokens each token holds) weighs the mean by size
    and adds log(size) to the sequence-pooling scores (ToMe's proportional attention), so a merged token counts as
    the tokens it holds."""

    def __init__(self, kind: str, width: int, num_prefix_tokens: int):
        super().__init__()
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.score = nn.Linear(width, 1) if kind == "sequence" else None

    def forward(self, hidden: Tensor, token_mask: Tensor | None, token_sizes: Tensor | None = None) -> Tensor:
        if self.kind == "cls":
            return hidden[:, 0]
        if self.kind == "last":
            if token_mask is None:
                return hidden[:, -1]
            # The last real token of each row, whichever side the padding is on.
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = torch.where(token_mask, positions, -1).amax(dim=1).clamp(min=0)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        hidden = hidden[:, self.num_prefix_tokens:]
        mask = None if token_mask is None else token_mask[:, self.num_prefix_tokens:]
        sizes = None if token_sizes is None else token_sizes[:, self.num_prefix_tokens:].unsqueeze(-1)
        if self.kind == "mean":
            if mask is None and sizes is None:
                return hidden.mean(dim=1)
            weights = mask.unsqueeze(-1).to(hidden.dtype) if mask is not None else 1.0
            weights = weights * sizes.to(hidden.dtype) if sizes is not None else weights
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        scores = self.score(hidden)
        if sizes is not None:
            scores = scores + sizes.log().to(scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return (scores.softmax(dim=1) * hidden).sum(dim=1)


class LMHead(nn.Module):
    """Next-token logits: one linear map to the vocabulary (its weight may be the token embedding's), optionally with
    a bias, with the input scaled by 1/sqrt(width) (T5's tied head) and the logits soft-capped (Gemma 2)."""

    def __init__(self, width: int, vocab_size: int, *, bias: bool = False, scale_input: bool = False,
                 logit_softcap: float | None = None):
        super().__init__()
        self.projection = nn.Linear(width, vocab_size, bias=bias)
        self.input_scale = width ** -0.5 if scale_input else None
        self.logit_softcap = logit_softcap

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return lm_logits(hidden, self.projection, self.input_scale, self.logit_softcap)


def lm_logits(hidden: Tensor, projection, input_scale: float | None, logit_softcap: float | None) -> Tensor:
    """``LMHead``'s computation with ``projection`` the map to the vocabulary (the head's Linear, or a call of the
    same weights, as the lean decode step binds it): the input scaled, projected, the logits soft-capped."""
    if input_scale is not None:
        hidden = hidden * input_scale
    logits = projection(hidden)
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    return logits


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense -> GELU -> LayerNorm -> linear to the vocabulary with a bias."""

    def __init__(self, width: int, vocab_size: int, norm_kind: str, norm_eps: float, act: str = "gelu",
                 norm_weight_offset: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = activation(act)
        self.norm = build_norm(norm_kind, width, norm_eps, weight_offset=norm_weight_offset)
        self.projection = nn.Linear(width, vocab_size, bias=True)

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return self.projection(self.norm(self.act(self.dense(hidden))))


class _PooledHead(nn.Module):
    """Pooling, optional BERT pooler (dense + tanh, or DistilBERT's dense + ReLU), dropout, then a linear map to
    ``outputs`` numbers."""

    def __init__(self, width: int, outputs: int, pooling: str, num_prefix_tokens: int, pooler: bool, dropout: float,
                 pooler_activation: str = "tanh"):
        super().__init__()
        self.pooling = Pooling(pooling, width, num_prefix_tokens) if pooling != "none" else None
        self.pooler = nn.Linear(width, width) if pooler else None
        self.pooler_activation = pooler_activation
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.projection = nn.Linear(width, outputs) if outputs else None

    def pool(self, hidden: Tensor, token_mask: Tensor | None, token_sizes: Tensor | None = None) -> Tensor:
        """The pooled representation, after the pooler if there is one (``token_sizes``: see ``Pooling``)."""
        pooled = hidden if self.pooling is None else self.pooling(hidden, token_mask, token_sizes)
        if self.pooler is None:
            return pooled
        pooled = self.pooler(pooled)
        return torch.relu(pooled) if self.pooler_activation == "relu" else torch.tanh(pooled)

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None, token_sizes: Tensor | None = None) -> Tensor:
        return self.projection(self.dropout(self.pool(hidden, token_mask, token_sizes)))


class ClassificationHead(_PooledHead):
    """Pooled vector -> class logits [batch, num_classes]. With a distillation token (DeiT) at ``distill_index``, a
    second linear map reads that token, and the logits are the mean of the two heads' (``parts`` gives both)."""

    def __init__(self, width: int, outputs: int, pooling: str, num_prefix_tokens: int, pooler: bool, dropout: float,
                 distill_index: int | None = None, pooler_activation: str = "tanh"):
        super().__init__(width, outputs, pooling, num_prefix_tokens, pooler, dropout, pooler_activation)
        self.distill_index = distill_index
        self.distill_projection = nn.Linear(width, outputs) if distill_index is not None else None

    def parts(self, hidden: Tensor, token_mask: Tensor | None = None,
              token_sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(the class head's logits, the distillation head's logits)."""
        return (super().forward(hidden, token_mask, token_sizes),
                self.distill_projection(self.dropout(hidden[:, self.distill_index])))

    @staticmethod
    def combine(parts: tuple[Tensor, Tensor]) -> Tensor:
        """The model's logits from the two heads': their mean (DeiT's inference rule)."""
        return (parts[0] + parts[1]) / 2

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None, token_sizes: Tensor | None = None) -> Tensor:
        if self.distill_projection is None:
            return super().forward(hidden, token_mask, token_sizes)
        return self.combine(self.parts(hidden, token_mask, token_sizes))


class RegressionHead(_PooledHead):
    """Pooled vector -> [batch, output_dim] numbers (a forecast horizon, a score); with pooling 'none', per token."""


def unpatchify(patches: Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> Tensor:
    """[batch, rows * cols, patch_size * patch_size * channels] -> images [batch, channels, rows * p, cols * p]:
    token r * cols + c holds the patch at row r, column c, its pixels in (row, column, channel) order (DiT)."""
    batch = patches.shape[0]
    rows, cols = grid
    images = patches.reshape(batch, rows, cols, patch_size, patch_size, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * patch_size, cols * patch_size)


class PatchHead(nn.Module):
    """Each image token -> the pixels of its patch, unpatchified into [batch, channels, height, width] (DiT's final
    layer: one linear map, zero at the start, so a fresh diffusion model predicts 0). Prefix tokens (a class token,
    registers) are dropped."""

    def __init__(self, width: int, patch_size: int, channels: int, grid: tuple[int, int], num_prefix_tokens: int):
        super().__init__()
        self.patch_size, self.channels, self.grid = patch_size, channels, grid
        self.num_prefix_tokens = num_prefix_tokens
        self.projection = nn.Linear(width, patch_size * patch_size * channels)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None) -> Tensor:
        patches = self.projection(hidden[:, self.num_prefix_tokens:])
        return unpatchify(patches, self.grid, self.patch_size, self.channels)


class IdentityHead(_PooledHead):
    """No task head: the model returns its final hidden states. A BERT-style pooler, if configured, is still built
    and its output is reported in ModelOutput.pooled."""

    def __init__(self, width: int, pooling: str, num_prefix_tokens: int, pooler: bool, pooler_activation: str = "tanh"):
        super().__init__(width, 0, pooling if pooler else "none", num_prefix_tokens, pooler, 0.0, pooler_activation)

    def forward(self, hidden: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return hidden


def build_head(config) -> nn.Module:
    head, stem = config.head, config.stem
    prefix = stem.num_prefix_tokens
    pooling = config.head_pooling
    if head.kind == "lm":
        return LMHead(config.width, stem.vocab_size, bias=config.head.bias, scale_input=config.head.scale_input,
                      logit_softcap=config.head.logit_softcap)
    if head.kind == "masked_lm":
        return MaskedLMHead(config.width, stem.vocab_size, config.norm.kind, config.norm.eps,
                            norm_weight_offset=config.norm.weight_offset)
    if head.kind == "classification":
        distill_index = int(stem.class_token) if stem.distill_token and head.distill_head else None
        return ClassificationHead(config.width, head.num_classes, pooling, prefix, head.pooler, head.dropout,
                                  distill_index, head.pooler_activation)
    if head.kind == "regression":
        return RegressionHead(config.width, head.output_dim, pooling, prefix, head.pooler, head.dropout,
                              head.pooler_activation)
    if head.kind == "patches":
        return PatchHead(config.width, stem.patch_size, head.output_dim or stem.in_channels, stem.grid_size, prefix)
    return IdentityHead(config.width, "cls" if head.pooler and pooling == "none" else pooling, prefix, head.pooler,
                        head.pooler_activation)
