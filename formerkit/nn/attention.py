"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

One module serves self-attention (queries, keys and values from one sequence, fused into one projection) and
cross-attention (queries from the decoder, keys and values from the encoder's output). Grouped-query attention shares
each key/value head among ``num_heads // num_kv_heads`` query heads.

The same projections serve every kind of attention a layer may use (``kind`` per call): softmax over scaled dot
products; L2 attention, whose scores are minus squared distances; linear attention with the elu + 1 kernel. Local
(sliding-window) attention arrives as a blocked mask and is computed block by block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.errors import InputError
from formerkit.nn.cache import KVCache, StaticSlots
from formerkit.nn.context import LayerContext
from formerkit.nn.linear_attention import linear_attention, quadratic_form
from formerkit.nn.local_attention import blockwise_attention, grouped_sdpa, repeat_kv, written_out_scores
from formerkit.nn.masks import BlockedMask, PreparedMask
from formerkit.nn.norms import build_norm
from formerkit.nn.positions import apply_rotary
from formerkit.nn.projection import project_parts

__all__ = ["Attention", "GaussianMixtureMask", "attention_weights"]


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = True,
                 out_bias: bool = True, qk_norm: bool = False, norm_kind: str = "layernorm", norm_eps: float = 1e-5,
                 norm_weight_offset: float = 0.0, dropout: float = 0.0, cross: bool = False, gaussian_mixture: int = 0,
                 grid: tuple[int, int] | None = None, prefix_tokens: int = 0, scale: float | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        # The multiplier of the scores; None: 1/sqrt(head_dim), SDPA's default.
        self.scale = scale
        # Soft-capping of the scores, softcap * tanh(scores / softcap), before the mask (Gemma 2). SDPA cannot apply
        # it, so softmax layers with a cap compute their scores explicitly on every path (see ``_softmax``).
        self.softcap = softcap
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.q = nn.Linear(width, num_heads * head_dim, bias=qkv_bias)
            self.kv = nn.Linear(width, 2 * num_kv_heads * head_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(width, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(num_heads * head_dim, width, bias=out_bias)
        self.q_norm = build_norm(norm_kind, head_dim, norm_eps, weight_offset=norm_weight_offset) if qk_norm else None
        self.k_norm = build_norm(norm_kind, head_dim, norm_eps, weight_offset=norm_weight_offset) if qk_norm else None
        self.gaussian = (GaussianMixtureMask(num_heads, gaussian_mixture, grid, prefix_tokens)
                         if gaussian_mixture else None)
        # Self-attention only: a module whose call (batch) gives keys and values [batch, kv_heads, n, head_dim] that
        # every query sees before the sequence's own, or None (prefix tuning, formerkit.adapt.prefix); None in a plain
        # layer.
        self.key_value_prefix: nn.Module | None = None

    def project(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [batch, heads, tokens, head_dim] and keys/values [batch, kv_heads, keys, head_dim]."""
        batch, length, _ = x.shape
        # Split along the features first, then give each part its heads. Training computes the parts one by one
        # (formerkit.nn.projection): no concatenated gradient in the backward pass, and the values attention keeps
        # do not keep the queries' and keys' features alive with them.
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.cross:
            q, (k, v) = self.q(x), project_parts(self.kv, memory, [kv_size, kv_size])
        else:
            q, k, v = project_parts(self.qkv, x, [q_size, kv_size, kv_size])
        keys = k.shape[1]
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, keys, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor, context: LayerContext) -> tuple[Tensor, Tensor | None]:
        """Returns the attended values [batch, tokens, width] and, if ``context.need_weights``, the attention
        probabilities [batch, heads, tokens, keys] (computed explicitly, without SDPA).

        Self-attention applies ``context.mask`` (with token merging, its proportional form) and the rotary tables;
        cross-attention reads ``context.memory`` under ``context.memory_mask``. With a cache (decoding step by step),
        self-attention appends this pass's keys and values to the cache rows of layer ``context.index`` and attends
        over everything cached; cross-attention projects the encoder's output once and reuses it at later steps.
        """
        batch, length, _ = x.shape
        cache = context.cache
        if self.cross:
            mask = context.memory_mask
            if cache is not None:
                q, k, v = self._cached_cross(x, context.memory, cache, context.index)
            else:
                q, k, v = self.project(x, context.memory)
        else:
            mask = context.mask if context.merging is None else context.merging.attention_mask(context.mask)
            q, k, v = self.project(x)
            if context.rotary is not None:
                cos, sin = context.rotary[0].to(q.dtype), context.rotary[1].to(q.dtype)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(context.index, k, v)
            if self.key_value_prefix is not None:
                # After the cache: the prefix is a weight, never cached, and prepended at every pass.
                k, v, mask = self._prepend(k, v, mask, context.kind, length)
        kind = "softmax" if self.cross else context.kind
        if kind == "linear":
            if context.need_weights:
                raise InputError("output_attentions: linear attention never forms attention probabilities")
            out, weights = self._linear(q, k, v, mask), None
        else:
            out, weights = self._softmax(q, k, v, mask, kind, context.need_weights,
                                         isinstance(cache, StaticSlots))
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out(out), weights

    def _prepend(self, k: Tensor, v: Tensor, mask: PreparedMask, kind: str,
                 queries: int) -> tuple[Tensor, Tensor, PreparedMask]:
        """The prefix's keys and values before ``k``/``v``, and ``mask`` widened by columns every query may attend
        to: neither causality nor padding hides a prefix key (Li & Liang 2021's virtual tokens come first)."""
        prefix = self.key_value_prefix(k.shape[0])
        if prefix is None:
            return k, v, mask
        if kind == "linear" or mask.blocked is not None or self.gaussian is not None:
            what = ("linear attention" if kind == "linear" else "blockwise sliding-window attention"
                    if mask.blocked is not None else "the Gaussian-mixture mask")
            raise InputError(f"prefix tuning: keys and values before the sequence are not supported with {what}")
        prefix_k, prefix_v = prefix[0].to(k.dtype), prefix[1].to(v.dtype)
        num_prefix, keys = prefix_k.shape[2], k.shape[2]
        value = mask.value
        if value is None and mask.is_causal:  # SDPA's causal flag, as an explicit mask over the widened keys
            value = torch.ones(queries, keys, dtype=torch.bool, device=k.device).tril(keys - queries)
        if value is not None:
            visible = (torch.ones if value.dtype == torch.bool else torch.zeros)(
                *value.shape[:-1], num_prefix, dtype=value.dtype, device=value.device)
            value = torch.cat([visible, value], dim=-1)
        return (torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2),
                PreparedMask(value=value, empty_rows=mask.empty_rows))

    def _softmax(self, q: Tensor, k: Tensor, v: Tensor, mask: PreparedMask, kind: str, need_weights: bool,
                 static: bool) -> tuple[Tensor, Tensor | None]:
        scale, softcap = self.scale, self.softcap
        if kind == "l2":
            q, k, v, l2_scale = _l2_as_dot_products(q, k, v)
            scale = l2_scale if scale is None else scale
        attn_mask = mask.value
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        multiplier = None
        if self.gaussian is not None and not self.cross:
            multiplier = self.gaussian(q.shape[2]).to(q.dtype)
        weights = None
        if need_weights or multiplier is not None:
            out, weights = attention_weights(q, k, v, attn_mask, mask.is_causal, dropout, scale=scale,
                                             multiplier=multiplier, softcap=softcap)
        elif mask.blocked is not None:
            out = self._blockwise(q, k, v, mask.blocked, dropout, scale)
        elif static and q.shape[2] == 1:
            out = single_query_attention(q, k, v, attn_mask, scale=scale, softcap=softcap)
        # The fused kernel takes no gradient for its mask: a learned score bias (T5's relative positions) goes to
        # SDPA, whose math path real runs take too.
        elif (q.device.type == "meta" and torch.is_grad_enabled() and softcap is None
              and not (attn_mask is not None and attn_mask.requires_grad)):
            out = _meta_fused_attention(q, k, v, attn_mask, dropout, mask.is_causal, scale)
        else:  # with a softcap, grouped_sdpa computes the scores explicitly
            out = grouped_sdpa(q, k, v, attn_mask, dropout, mask.is_causal, scale, softcap)
        if mask.empty_rows is not None:
            out = out.masked_fill(mask.empty_rows, 0.0)
            if weights is not None:
                weights = weights.masked_fill(mask.empty_rows, 0.0)
        if kind == "l2":
            out = out[..., : self.head_dim]
        return out, weights

    def _blockwise(self, q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, dropout: float,
                   scale: float | None) -> Tensor:
        return blockwise_attention(q, k, v, blocked, dropout, scale, self.softcap)

    def _linear(self, q: Tensor, k: Tensor, v: Tensor, mask: PreparedMask) -> Tensor:
        """Linear attention: the linear-time form under a causal mask and/or key padding, else the quadratic form
        under the mask (as when decoding with a cache, or with masks of other shapes)."""
        if mask.blocked is not None:
            raise InputError("linear attention has no blockwise window form; give windows to softmax layers")
        if mask.value is None:
            return linear_attention(q, k, v, causal=mask.is_causal, key_keep=mask.key_keep,
                                    document_runs=mask.document_runs)
        if mask.value.dtype != torch.bool:
            raise InputError("linear attention takes boolean masks only: additive scores (ALiBi, soft masks, float "
                             "tensors) have no meaning without softmax scores")
        out = quadratic_form(q, k, v, mask.value)
        return out if mask.empty_rows is None else out.masked_fill(mask.empty_rows, 0.0)

    def _cached_cross(self, x: Tensor, memory: Tensor | None, cache: KVCache,
                      layer: int) -> tuple[Tensor, Tensor, Tensor]:
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if cache.cross[layer] is None:
            _, k, v = self.project(x[:, :0], memory)
            cache.cross[layer] = (k, v)
        k, v = cache.cross[layer]
        return q, k, v


def _l2_as_dot_products(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """L2 attention's scores -|q - k|^2 / sqrt(d) as dot products, so SDPA (and every mask path) computes them:
    -|q - k|^2 = 2 q.k - |k|^2 - |q|^2, and |q|^2 is the same for every key of a query, so softmax drops it; the
    rest is the dot product of [2q, -1] with [k, |k|^2]. Values get a zero column to match (SDPA's fast kernels
    want equal widths); callers drop it from the output."""
    dim = q.shape[-1]
    q = torch.cat([2.0 * q, q.new_full((*q.shape[:-1], 1), -1.0)], dim=-1)
    k = torch.cat([k, (k * k).sum(-1, keepdim=True)], dim=-1)
    v = F.pad(v, (0, 1))
    return q, k, v, 1.0 / math.sqrt(dim)


def _meta_fused_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float,
                          is_causal: bool, scale: float | None = None) -> Tensor:
    """On the meta device (shape-only runs, used by ``formerkit.summary``) SDPA falls back to its math path, which
    keeps the whole probability matrix for backward. The fused CPU kernel that real runs use keeps only its output and
    log-sum-exp; calling it directly lets memory estimates match real runs. (Without autograd, the FLOP counter
    goes through SDPA, which it knows how to count.)"""
    k, v = repeat_kv(q, k, v)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal,
                                                                      attn_mask=attn_mask, scale=scale)[0]


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                           scale: float | None = None, softcap: float | None = None) -> Tensor:
    """Attention of one query per row [batch, heads, 1, head_dim] over keys [batch, kv_heads, keys, head_dim] as
    element-wise products and sums (no matrix-multiply calls): inside a compiled decode step these fuse into a few
    small kernels, where a single-query SDPA call costs more than the arithmetic. Masks as in SDPA; ``softcap``
    caps the scores before the mask, softcap * tanh(scores / softcap)."""
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    query = q.reshape(batch, kv_heads, group, 1, dim)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = (query * k.unsqueeze(2)).sum(-1) * scale  # [batch, kv_heads, group, keys]
    scores = scores.reshape(batch, heads, 1, keys)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    # The softmax's division comes after the weighted sum (one division per output, not one per key and output).
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    total = weights.sum(dim=-1, keepdim=True).reshape(batch, kv_heads, group, 1)
    out = (weights.reshape(batch, kv_heads, group, keys, 1) * v.unsqueeze(2)).sum(-2) / total
    return out.reshape(batch, heads, 1, v.shape[-1])


def attention_weights(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                      dropout: float = 0.0, *, scale: float | None = None, multiplier: Tensor | None = None,
                      softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(cap(multiplier * (q k^T * scale)) + mask) v written out (scale 1/sqrt(d) by default; ``multiplier``
    [heads, queries, keys] scales the scores, as the Gaussian-mixture mask does; cap(s) = softcap * tanh(s / softcap)
    with a ``softcap``, else s), returning the probabilities too."""
    k, v = repeat_kv(q, k, v)
    scores = written_out_scores(q, k, attn_mask, is_causal, scale=scale, multiplier=multiplier, softcap=softcap)
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout) @ v if dropout else weights @ v
    return out, weights


class GaussianMixtureMask(nn.Module):
    """The learned Gaussian-mixture mask of Li and Zhang ("Toward a Deeper Understanding: RetNet Viewed through
    Convolution"): the scores between image tokens at grid distance d are multiplied by
    sum_k weight[h, k] * exp(-d^2 / (2 sigma[h, k]^2)), two parameters per kernel and head, giving a ViT trained on
    little data a convolution-like bias toward nearby patches. Scores involving the prefix tokens (class token,
    registers) are left as they are.

    Initialized with weights 1/kernels and widths spread from one grid step to the grid's side, so training starts
    near plain attention for nearby patches.
    """

    def __init__(self, num_heads: int, kernels: int, grid: tuple[int, int] | None, prefix_tokens: int = 0):
        super().__init__()
        if grid is None:
            raise InputError("GaussianMixtureMask: needs the grid of image tokens (an image stem)")
        rows, cols = grid
        self.num_heads, self.kernels, self.prefix_tokens = num_heads, kernels, prefix_tokens
        # 1-D parameters (heads x kernels flattened): like other scalars of a layer, not weight-decayed.
        self.weight = nn.Parameter(torch.full((num_heads * kernels,), 1.0 / kernels))
        widths = torch.linspace(1.0, float(max(rows, cols, 2)), kernels) if kernels > 1 else torch.tensor([1.0 * max(
            rows, cols)])
        self.sigma = nn.Parameter(widths.repeat(num_heads))
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        y, x = y.flatten().float(), x.flatten().float()
        distance = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
        self.register_buffer("squared_distance", distance, persistent=False)

    def forward(self, num_tokens: int) -> Tensor:
        """The multiplier [heads, tokens, tokens] for a sequence of the prefix tokens followed by the grid."""
        grid = self.squared_distance.shape[0]
        if num_tokens != self.prefix_tokens + grid:
            raise InputError(f"GaussianMixtureMask: built for {self.prefix_tokens} prefix tokens and a grid of {grid} "
                             f"image tokens, got a sequence of {num_tokens} (token merging or MAE masking change the "
                             f"grid and cannot be combined with it)")
        weight = self.weight.view(self.num_heads, self.kernels, 1, 1)
        sigma = self.sigma.view(self.num_heads, self.kernels, 1, 1)
        local = (weight * torch.exp(-self.squared_distance / (2.0 * sigma * sigma + 1e-6))).sum(dim=1)
        if not self.prefix_tokens:
            return local
        return F.pad(local, (self.prefix_tokens, 0, self.prefix_tokens, 0), value=1.0)
