"""The Transformer block: attention and feed-forward sub-layers, each wrapped in a residual connection with norms."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerkit.nn.attention import Attention
from formerkit.nn.condition import AdaptiveModulation, gated_add, modulate
from formerkit.nn.context import LayerContext
from formerkit.nn.feedforward import build_feedforward
from formerkit.nn.moe import build_moe
from formerkit.nn.norms import model_norm
from formerkit.nn.recompute import recomputed_norm_output

__all__ = ["DropPath", "LayerScale", "Residual", "TransformerBlock"]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drops a whole residual branch per sample while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        noise = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * noise / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (Touvron et al., 2021, "Going Deeper with Image
    Transformers")."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Residual(nn.Module):
    """x + branch(x) with the norm placement of the config.

    pre: x + drop(scale(f(norm(x)))); post: norm(x + drop(scale(f(x))));
    sandwich: x + drop(scale(norm_out(f(norm(x)))))
    """

    def __init__(self, config, *, own_norm: bool = True):
        super().__init__()
        norm = config.norm
        self.placement = norm.placement
        # Without a norm of its own (a parallel block's feed-forward reading the attention's normed input) the block
        # gives the branch its input. A conditioned block's norms have no learned scale or bias: the condition's
        # shift and scale take their place (adaLN-Zero).
        affine = config.condition.kind is None
        self.norm = model_norm(norm, config.width, affine=affine) if own_norm else None
        sandwich = norm.placement == "sandwich"
        self.norm_out = model_norm(norm, config.width) if sandwich else None
        # Absent parts are None rather than identity modules: decoding calls merge once per token per layer.
        self.scale = LayerScale(config.width, config.layer_scale) if config.layer_scale else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None

    def branch_input(self, x: Tensor) -> Tensor:
        """What the branch reads: the normed stream (pre, sandwich) or the stream itself (post)."""
        return x if self.placement == "post" else self.norm(x)

    def merge(self, x: Tensor, out: Tensor, drop_path: nn.Module | None = None) -> Tensor:
        """Adds the branch's output back into the stream (through the layer's stochastic-depth drop, if any)."""
        if self.norm_out is not None:
            out = self.norm_out(out)
        if self.scale is not None:
            out = self.scale(out)
        if self.training:
            if self.dropout is not None:
                out = self.dropout(out)
            if drop_path is not None:
                out = drop_path(out)
        x = x + out
        return self.norm(x) if self.placement == "post" else x

    def merge_gated(self, x: Tensor, gate: Tensor, out: Tensor, drop_path: nn.Module | None = None) -> Tensor:
        """``merge(x, gate * out)`` (adaLN-Zero's gated branch, gate [batch, width]), as one fused pass over the
        stream (``gated_add``) when nothing else acts on the branch (no output norm, layer scale, dropout or
        stochastic depth, pre-norm placement)."""
        plain = (self.norm_out is None and self.scale is None and self.placement != "post"
                 and not (self.training and (self.dropout is not None or getattr(drop_path, "rate", 0.0))))
        return gated_add(x, gate, out) if plain else self.merge(x, gate.unsqueeze(1) * out, drop_path)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention (decoder of an encoder-decoder), then feed-forward (dense, or a
    mixture of experts when ``config.feedforward`` makes block ``index`` one)."""

    def __init__(self, config, *, cross_attention: bool = False, index: int = 0):
        super().__init__()
        attn = config.attention

        image = config.stem.kind in ("patches", "conv")

        heads, kv_heads = config.layer_num_heads(index), config.layer_kv_heads(index)

        def make_attention(cross: bool) -> Attention:
            return Attention(config.width, heads, kv_heads, config.head_dim, qkv_bias=attn.qkv_bias,
                             out_bias=attn.out_bias, qk_norm=attn.qk_norm, norm_kind=config.norm.kind,
                             norm_eps=config.norm.eps, norm_weight_offset=config.norm.weight_offset,
                             dropout=attn.dropout, cross=cross,
                             gaussian_mixture=0 if cross else attn.gaussian_mixture,
                             grid=config.stem.grid_size if image else None,
                             prefix_tokens=config.stem.num_prefix_tokens if image else 0, scale=attn.scale,
                             softcap=attn.softcap)

        self.attention = make_attention(False)
        self.attention_residual = Residual(config)
        self.cross_attention = make_attention(True) if cross_attention else None
        self.cross_attention_residual = Residual(config) if cross_attention else None
        self.mixture = config.feedforward.is_mixture_block(index)
        self.feedforward: nn.Module = build_moe(config) if self.mixture else build_feedforward(config, index)
        self.parallel = config.parallel_residual is not None
        self.feedforward_residual = Residual(config, own_norm=config.parallel_residual != "shared_norm")
        # adaLN-Zero (condition.kind): shift, scale and gate of both sub-layers regressed from the condition vector.
        self.modulation = (AdaptiveModulation(config.condition_dim, config.width, 6)
                           if config.condition.kind is not None else None)
        # A module beside the feed-forward: reads the branch's input, and its output (unless None) adds to the
        # branch's output (AdaptFormer's parallel adapters, formerkit.adapt.adapter); None in a plain block.
        self.feedforward_beside: nn.Module | None = None

    def forward(self, x: Tensor, context: LayerContext) -> tuple[Tensor, Tensor | None]:
        """One layer: returns the new residual stream and, with ``context.need_weights``, the self-attention
        probabilities. ``context`` (see ``LayerContext``) carries the depth's mask, attention kind, cache rows and
        stochastic depth: a block shared across depths runs each with that depth's context. Token merging (ToMe)
        merges tokens between attention and the feed-forward sub-layer, where the paper merges them (after both
        branches in a parallel block)."""
        if self.parallel:
            return self._parallel(x, context)
        if self.modulation is not None:
            return self._modulated(x, context)
        residual = self.attention_residual
        attention_input = residual.branch_input(x)
        # The branches do not keep their norm's output for backward: it is recomputed from the norm's input.
        with recomputed_norm_output(residual.norm, x, attention_input):
            out, weights = self.attention(attention_input, context)
        x = residual.merge(x, out, context.drop_path)
        if context.merging is not None:
            x = context.merging.merge(x, context.index, self.attention, attention_input)
        del attention_input  # not kept through the feed-forward sub-layer
        if self.cross_attention is not None:
            residual = self.cross_attention_residual
            out, _ = self.cross_attention(residual.branch_input(x), context)
            x = residual.merge(x, out, context.drop_path)
        residual = self.feedforward_residual
        feedforward_input = residual.branch_input(x)
        with recomputed_norm_output(residual.norm, x, feedforward_input):
            out = self._feedforward(feedforward_input, context)
        x = residual.merge(x, out, context.drop_path)
        return x, weights

    def _modulated(self, x: Tensor, context: LayerContext) -> tuple[Tensor, Tensor | None]:
        """adaLN-Zero (Peebles & Xie, 2023): x + gate * f(norm(x) * (1 + scale) + shift) for attention, then for the
        feed-forward, each with its own shift, scale and gate regressed from ``context.condition``."""
        (attention_shift, attention_scale, attention_gate,
         feedforward_shift, feedforward_scale, feedforward_gate) = self.modulation(context.condition)
        residual = self.attention_residual
        attention_input = modulate(residual.norm(x), attention_shift, attention_scale)
        out, weights = self.attention(attention_input, context)
        x = residual.merge_gated(x, attention_gate, out, context.drop_path)
        if context.merging is not None:
            x = context.merging.merge(x, context.index, self.attention, attention_input)
        residual = self.feedforward_residual
        out = self._feedforward(modulate(residual.norm(x), feedforward_shift, feedforward_scale), context)
        x = residual.merge_gated(x, feedforward_gate, out, context.drop_path)
        return x, weights

    def _feedforward(self, x: Tensor, context: LayerContext) -> Tensor:
        if self.mixture:  # padding stays out of the routing; the mixture's last_routing then reports this pass
            out = self.feedforward(x, context.token_keep)
        else:
            out = self.feedforward(x)
        if self.feedforward_beside is not None:
            beside = self.feedforward_beside(x)
            if beside is not None:
                out = out + beside
        return out

    def _parallel(self, x: Tensor, context: LayerContext) -> tuple[Tensor, Tensor | None]:
        """x + attention(norm(x)) + feedforward(norm'(x)), norm' being norm itself with a shared norm (GPT-J)."""
        attention_input = self.attention_residual.branch_input(x)
        residual = self.feedforward_residual
        feedforward_input = attention_input if residual.norm is None else residual.branch_input(x)
        out, weights = self.attention(attention_input, context)
        feedforward_out = self._feedforward(feedforward_input, context)
        x = residual.merge(self.attention_residual.merge(x, out, context.drop_path), feedforward_out,
                           context.drop_path)
        if context.merging is not None:
            x = context.merging.merge(x, context.index, self.attention, attention_input)
        return x, weights
