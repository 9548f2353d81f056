"""Token merging (ToMe; Bolya et al., 2023, "Token Merging: Your ViT but Faster"): fewer tokens at every layer of an
encoder that classifies, with no training.

In every block, between attention and the feed-forward sub-layer, ``r`` tokens are merged into their most similar
partners by bipartite soft matching: the tokens are split alternately into sets A and B, each A token finds its most
similar B token (cosine similarity of the attention keys averaged over heads, the paper's choice), and the ``r`` A
tokens with the most similar partners are averaged into them. A merged token remembers its size (how many input tokens
it holds): merges average by size, attention adds log(size) to the scores of each key (ToMe's proportional attention,
so a token of size 2 draws the attention two identical tokens would) and mean pooling weighs tokens by size. The class
token and register tokens are never merged.

Enable it per call: ``model(images, merge_tokens=r)`` (or one ``r`` per layer); ``merge_tokens=0`` is the plain
model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.errors import InputError
from formerkit.nn.masks import PreparedMask

__all__ = ["Matching", "TokenMerging", "attention_keys", "bipartite_soft_matching", "merge_weighted"]


class Matching(NamedTuple):
    """Which tokens bipartite soft matching merges, as indices into the sets A (tokens 0, 2, 4, ...) and B (tokens
    1, 3, 5, ...): A's ``kept`` tokens stay, A's ``merged`` tokens are averaged into B's ``destination`` tokens."""

    kept: Tensor  # [batch, |A| - r], in their original order
    merged: Tensor  # [batch, r]
    destination: Tensor  # [batch, r]


def bipartite_soft_matching(metric: Tensor, r: int) -> Matching:
    """ToMe's matching of ``r`` pairs among tokens described by ``metric`` [batch, tokens, channels]: A tokens are
    the even positions, B tokens the odd ones; every A token is paired with its most similar B token (cosine
    similarity), and the ``r`` best-matched A tokens are merged. Several A tokens may share a destination.
    Alternating sets keep the matching one matrix product and spread merges over the image (the paper, section 3)."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)  # [batch, |A|]
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values
    return Matching(kept, merged, partner.gather(1, merged))


def merge_weighted(x: Tensor, sizes: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Applies a matching to ``x`` [batch, tokens, width] whose tokens hold ``sizes`` [batch, tokens] input tokens:
    a merged token is the size-weighted mean of its members and holds their summed size. Returns the tokens (A's kept
    tokens, then all of B) and their sizes."""
    width = x.shape[-1]
    weighted = x * sizes.unsqueeze(-1).to(x.dtype)
    a, b = weighted[:, ::2], weighted[:, 1::2]
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    moved = a.gather(1, matching.merged.unsqueeze(-1).expand(-1, -1, width))
    b = b.scatter_add(1, matching.destination.unsqueeze(-1).expand(-1, -1, width), moved)
    size_b = size_b.scatter_add(1, matching.destination, size_a.gather(1, matching.merged))
    kept = a.gather(1, matching.kept.unsqueeze(-1).expand(-1, -1, width))
    new_sizes = torch.cat([size_a.gather(1, matching.kept), size_b], dim=1)
    return torch.cat([kept, b], dim=1) / new_sizes.unsqueeze(-1).to(x.dtype), new_sizes


def attention_keys(attention: nn.Module, attention_input: Tensor) -> Tensor:
    """The similarity metric: the keys a self-attention layer computes from ``attention_input`` [batch, tokens,
    width], averaged over the key heads ([batch, tokens, head_dim]). Only the key rows of the fused projection are
    computed again (width x kv_heads * head_dim per token), not the queries and values."""
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    rows = slice(heads * dim, (heads + kv_heads) * dim)  # the projection's layout: queries, keys, values
    bias = attention.qkv.bias
    keys = F.linear(attention_input, attention.qkv.weight[rows], None if bias is None else bias[rows])
    keys = keys.view(*attention_input.shape[:2], kv_heads, dim)
    if attention.k_norm is not None:
        keys = attention.k_norm(keys)
    return keys.mean(dim=2)


def _schedule(merge_tokens, num_layers: int) -> tuple[int, ...]:
    """``merge_tokens`` as one r per layer, checked."""

    def is_count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if is_count(merge_tokens):
        if merge_tokens < 0:
            raise InputError(f"merge_tokens: expected the number of tokens each layer merges, an int >= 0, got "
                             f"{merge_tokens}")
        return (merge_tokens,) * num_layers
    if isinstance(merge_tokens, Sequence) and not isinstance(merge_tokens, str):
        values = tuple(merge_tokens)
        if len(values) != num_layers or not all(is_count(r) and r >= 0 for r in values):
            raise InputError(f"merge_tokens: expected an int >= 0 or one int >= 0 per layer ({num_layers} layers), "
                             f"got {list(values)!r}")
        return values
    raise InputError(f"merge_tokens: expected the number of tokens each layer merges, an int >= 0 (or one per layer), "
                     f"got {merge_tokens!r} ({type(merge_tokens).__name__})")


def check_mergeable(config) -> None:
    """Raises InputError unless ``config`` describes a model token merging serves: an encoder whose head pools its
    tokens (cls, mean or sequence pooling), with every layer attending all tokens by softmax (or l2) scores and no
    positions applied inside attention, since merged tokens have no single position."""
    head, attention = config.head, config.attention
    pooling = config.head_pooling
    if config.arch != "encoder" or head.kind not in ("classification", "regression") or pooling not in (
            "cls", "mean", "sequence"):
        raise InputError(f"merge_tokens: token merging is for encoders that classify (or regress) from pooled tokens "
                         f"(pooling cls, mean or sequence); this model is arch={config.arch!r}, head={head.kind!r}, "
                         f"pooling={pooling!r}")
    reasons = []
    if config.position.kind in ("rope", "alibi"):
        reasons.append(f"position.kind {config.position.kind!r} (positions inside attention)")
    if attention.sliding_window is not None:
        reasons.append("attention.sliding_window")
    if attention.kind == "linear":
        reasons.append("linear attention (no scores to add log(size) to)")
    if attention.gaussian_mixture:
        reasons.append("attention.gaussian_mixture (a fixed grid of image tokens)")
    if reasons:
        raise InputError(f"merge_tokens: merged tokens have no single position, so token merging cannot be combined "
                         f"with {', '.join(reasons)}")


class TokenMerging:
    """One forward pass's token merging: ``schedule`` (how many tokens each layer merges) and ``sizes``
    ([batch, tokens], how many input tokens each current token holds, prefix tokens included; None until a layer
    has merged). The model makes one per call of ``model(..., merge_tokens=r)``; blocks call ``attention_mask``
    and ``merge``."""

    def __init__(self, config, merge_tokens: int | Sequence[int]):
        check_mergeable(config)
        self.schedule = _schedule(merge_tokens, config.num_layers)
        self.num_prefix_tokens = config.stem.num_prefix_tokens
        self.sizes: Tensor | None = None

    def start(self, num_tokens: int) -> None:
        """Checks the schedule against an input of ``num_tokens`` tokens (prefix tokens included): matching can merge
        at most half of the mergeable tokens a layer receives (set B must have a token for each one merged)."""
        mergeable = remaining = num_tokens - self.num_prefix_tokens
        for layer, r in enumerate(self.schedule):
            if r > remaining // 2:
                raise InputError(f"merge_tokens: layer {layer + 1} of {len(self.schedule)} cannot merge {r} tokens: "
                                 f"only {remaining} mergeable tokens remain there ({mergeable} at the input, "
                                 f"{mergeable - remaining} merged by earlier layers; class and register tokens are "
                                 f"never merged), and at most half of them can be merged (here {remaining // 2})")
            remaining -= r
        self.sizes = None

    def attention_mask(self, mask: PreparedMask | None) -> PreparedMask | None:
        """Proportional attention: log(size) added to the scores of every key, so that a token of size s draws the
        attention s identical tokens would. The model's own mask is empty here (check_mergeable, and no padding)."""
        if self.sizes is None:
            return mask
        return PreparedMask(value=self.sizes.log()[:, None, None, :])

    def merge(self, x: Tensor, layer: int, attention: nn.Module, attention_input: Tensor) -> Tensor:
        """Merges layer ``layer``'s share of tokens of the residual stream ``x`` (after attention), matched by the
        keys ``attention`` computed from ``attention_input``."""
        r = self.schedule[layer]
        if r == 0:
            return x
        prefix = self.num_prefix_tokens
        sizes = self.sizes if self.sizes is not None else x.new_ones(x.shape[:2], dtype=torch.float)
        matching = bipartite_soft_matching(attention_keys(attention, attention_input)[:, prefix:].float(), r)
        tokens, token_sizes = merge_weighted(x[:, prefix:], sizes[:, prefix:], matching)
        self.sizes = torch.cat([sizes[:, :prefix], token_sizes], dim=1)
        return torch.cat([x[:, :prefix], tokens], dim=1)
