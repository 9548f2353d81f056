"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

One module serves self-attention (queries, keys and values from one sequence, fused into one projection) and
cross-attention (queries from the decoder, keys and values from the encoder's output). Grouped-query attention shares
each key/value head among ``num_heads // num_kv_heads`` query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.nn.cache import KVCache, StaticSlots
from formerkit.nn.masks import PreparedMask
from formerkit.nn.norms import build_norm
from formerkit.nn.positions import apply_rotary

__all__ = ["Attention", "attention_weights"]

# SDPA's enable_gqa arrived in torch 2.5; older versions repeat the key/value heads instead.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool = True,
                 out_bias: bool = True, qk_norm: bool = False, norm_kind: str = "layernorm", norm_eps: float = 1e-5,
                 dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.num_heads = num_heads
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
        self.q_norm = build_norm(norm_kind, head_dim, norm_eps) if qk_norm else None
        self.k_norm = build_norm(norm_kind, head_dim, norm_eps) if qk_norm else None

    def project(self, x: Tensor, memory: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [batch, heads, tokens, head_dim] and keys/values [batch, kv_heads, keys, head_dim]."""
        batch, length, _ = x.shape
        if self.cross:
            q = self.q(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(memory).view(batch, memory.shape[1], 2 * self.num_kv_heads, self.head_dim).transpose(
                1, 2).split(self.num_kv_heads, dim=1)
        else:
            q, k, v = self.qkv(x).view(batch, length, -1, self.head_dim).transpose(1, 2).split(
                [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor, mask: PreparedMask, *, rotary: tuple[Tensor, Tensor] | None = None,
                memory: Tensor | None = None, need_weights: bool = False, cache: KVCache | None = None,
                layer: int = 0) -> tuple[Tensor, Tensor | None]:
        """Returns the attended values [batch, tokens, width] and, if ``need_weights``, the attention probabilities
        [batch, heads, tokens, keys] (computed explicitly, without SDPA).

        With a ``cache`` (decoding step by step), self-attention appends this pass's keys and values to the cache's
        slots of ``layer`` and attends over everything cached; cross-attention projects the encoder's output once and
        reuses it at later steps.
        """
        batch, length, _ = x.shape
        if cache is not None and self.cross:
            q, k, v = self._cached_cross(x, memory, cache, layer)
        else:
            q, k, v = self.project(x, memory)
            if rotary is not None:
                cos, sin = rotary[0].to(q.dtype), rotary[1].to(q.dtype)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        attn_mask = mask.value
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = attention_weights(q, k, v, attn_mask, mask.is_causal, dropout)
        elif isinstance(cache, StaticSlots) and length == 1:
            out = single_query_attention(q, k, v, attn_mask)
        else:
            gqa = self.num_kv_heads != self.num_heads
            if gqa and not _SDPA_HAS_GQA:
                repeat = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
                gqa = False
            if q.device.type == "meta" and torch.is_grad_enabled():
                out = _meta_fused_attention(q, k, v, attn_mask, dropout, mask.is_causal)
            else:
                extra = {"enable_gqa": True} if gqa else {}
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                     is_causal=mask.is_causal, **extra)
        if mask.empty_rows is not None:
            out = out.masked_fill(mask.empty_rows, 0.0)
            if weights is not None:
                weights = weights.masked_fill(mask.empty_rows, 0.0)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out(out), weights


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


def _meta_fused_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float,
                          is_causal: bool) -> Tensor:
    """On the meta device (shape-only runs, used by ``formerkit.summary``) SDPA falls back to its math path, which
    keeps the whole probability matrix for backward. The fused CPU kernel that real runs use keeps only its output and
    log-sum-exp; calling it directly lets memory estimates match real runs. (Without autograd, the FLOP counter
    goes through SDPA, which it knows how to count.)"""
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal,
                                                                      attn_mask=attn_mask)[0]


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """Attention of one query per row [batch, heads, 1, head_dim] over keys [batch, kv_heads, keys, head_dim] as
    element-wise products and sums (no matrix-multiply calls): inside a compiled decode step these fuse into a few
    small kernels, where a single-query SDPA call costs more than the arithmetic. Masks as in SDPA."""
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    query = q.reshape(batch, kv_heads, group, 1, dim)
    scores = (query * k.unsqueeze(2)).sum(-1) * (1.0 / math.sqrt(dim))  # [batch, kv_heads, group, keys]
    scores = scores.reshape(batch, heads, 1, keys)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probabilities = scores.softmax(dim=-1).reshape(batch, kv_heads, group, keys, 1)
    return (probabilities * v.unsqueeze(2)).sum(-2).reshape(batch, heads, 1, dim)


def attention_weights(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                      dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v written out, returning the probabilities too (for inspection)."""
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        length, keys = scores.shape[-2:]
        attn_mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(keys - length)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = scores.softmax(dim=-1)
    out = F.dropout(weights, dropout) @ v if dropout else weights @ v
    return out, weights
