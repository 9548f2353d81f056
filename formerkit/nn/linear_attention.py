"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs"): softmax(q k^T) is replaced by the kernel
phi(q) phi(k)^T with phi(x) = elu(x) + 1, so attention is phi(q) (sum_j phi(k_j) v_j^T) / (phi(q) sum_j phi(k_j)) and
its cost grows linearly with length.

The causal form is computed chunk by chunk: within a chunk the quadratic form under a causal mask, across chunks a
running sum of phi(k) v^T (an exclusive prefix sum over chunks), so memory stays linear too. ``quadratic_form`` is the
written-out reference (and the path for any other mask, and for a key/value cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from formerkit.nn.document_linear_attention import document_linear_attention
from formerkit.nn.local_attention import repeat_kv

__all__ = ["feature_map", "linear_attention", "quadratic_form"]

# Queries per chunk of the causal form: large enough for matrix products to be efficient, small enough that the
# per-chunk states [chunks, head_dim, head_dim] stay small.
CHUNK = 64


def feature_map(x: Tensor) -> Tensor:
    """elu(x) + 1: positive, so every normalizer is > 0 (Katharopoulos et al.)."""
    return F.elu(x) + 1.0


def _normalize(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, with 0 where a query sees no key at all (denominator 0, so numerator 0 too), as
    softmax layers give."""
    denominator = denominator.unsqueeze(-1)
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def quadratic_form(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
    """The reference: weights phi(q_i) . phi(k_j) where ``allowed`` (bool, broadcastable to [batch, heads, queries,
    keys]; None = all) permits, each row normalized to sum 1. q [batch, heads, queries, dim], k/v [batch, kv_heads,
    keys, dim]."""
    k, v = repeat_kv(q, k, v)
    weights = feature_map(q) @ feature_map(k).transpose(-2, -1)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return _normalize(weights @ v, weights.sum(-1))


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_keep: Tensor | None = None,
                     chunk: int = CHUNK, document_runs: Tensor | None = None) -> Tensor:
    """Linear attention over a whole sequence. ``causal``: each query sees keys at or before it; ``key_keep``
    [batch, keys] (True for a real token) leaves padding out; ``document_runs`` [batch, tokens] (causal only; from
    ``formerkit.nn.document_linear_attention.document_runs``) keeps each query within its document, as
    ``DocumentMask`` does. Equal to ``quadratic_form`` under the same mask."""
    k, v = repeat_kv(q, k, v)
    if document_runs is not None:
        if not causal:
            raise ValueError("linear_attention: document_runs needs causal=True")
        fk = feature_map(k) if key_keep is None else feature_map(k) * key_keep[:, None, :, None].to(k.dtype)
        return document_linear_attention(feature_map(q), fk, v, document_runs, chunk)
    if causal:
        keep = None if key_keep is None else key_keep[:, None, :, None].to(k.dtype)
        return _CausalLinearAttention.apply(q, k, v, keep, chunk)
    q, k = feature_map(q), feature_map(k)
    if key_keep is not None:
        k = k * key_keep[:, None, :, None].to(k.dtype)
    # A column of ones after the values makes the products carry the normalizer (the sum of the weights) along with
    # the weighted values: one pass instead of two.
    v = F.pad(v, (0, 1), value=1.0)
    out = q @ (k.transpose(-2, -1) @ v)  # [batch, heads, queries, value_dim + 1]
    return _normalize(out[..., :-1], out[..., -1])


# ----- the causal form, chunk by chunk -----

# Elements of a group's temporaries (2 MB in float32): the chunks of a group are computed together. Causal, 16K
# tokens, 6 heads x 64, fwd+bwd: 2^18 -> 407 ms and 143 MB above the inputs, 2^19 -> 261 ms and 148 MB, 2^20 -> 257 ms
# and 155 MB, 2^21 -> 365 ms and 170 MB.
GROUP_ELEMENTS = 2**19


def _chunk_groups(length: int, chunk: int, per_chunk: int):
    """(first, last) token ranges of groups of whole chunks."""
    size = max(1, GROUP_ELEMENTS // max(per_chunk, 1)) * chunk
    for first in range(0, length, size):
        yield first, min(first + size, length)


def _chunked(x: Tensor, chunk: int) -> Tensor:
    """[batch, heads, n, d] -> [batch, heads, chunks, chunk, d], zero rows added at the end."""
    missing = -x.shape[2] % chunk
    if missing:
        x = F.pad(x, (0, 0, 0, missing))
    return x.view(x.shape[0], x.shape[1], -1, chunk, x.shape[3])


def _unchunked(x: Tensor, length: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :length]


def _features(x: Tensor, keep: Tensor | None, first: int, last: int) -> Tensor:
    rows = feature_map(x[:, :, first:last])
    return rows if keep is None else rows * keep[:, :, first:last]


class _CausalLinearAttention(torch.autograd.Function):
    """Causal linear attention a group of chunks at a time, carrying the running sums from group to group, with a
    backward pass of the same shape (gradients of a causal product are causal products themselves, run forward for
    the queries and backward for the keys and values). Nothing of size tokens x chunk or larger outlives a group, so
    memory stays near the inputs, output and gradients."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, chunk: int) -> Tensor:
        batch, heads, length, dim = q.shape
        value_dim = v.shape[-1]
        out = q.new_empty(batch, heads, length, value_dim)
        denominator = q.new_empty(batch, heads, length)
        state = q.new_zeros(batch, heads, dim, value_dim + 1)  # sum of phi(k) [v, 1]^T over earlier groups
        for first, last in _chunk_groups(length, chunk, batch * heads * chunk * (chunk + dim + value_dim)):
            fq = _chunked(feature_map(q[:, :, first:last]), chunk)
            fk = _chunked(_features(k, keep, first, last), chunk)
            fv = _chunked(F.pad(v[:, :, first:last], (0, 1), value=1.0), chunk)
            states = fk.transpose(-2, -1) @ fv  # [batch, heads, chunks, dim, value_dim + 1]
            earlier = states.cumsum(dim=2) - states + state.unsqueeze(2)
            result = _unchunked((fq @ fk.transpose(-2, -1)).tril() @ fv + fq @ earlier, last - first)
            state = state + states.sum(dim=2)
            denominator[:, :, first:last] = result[..., value_dim]
            out[:, :, first:last] = _normalize(result[..., :value_dim], result[..., value_dim])
        ctx.save_for_backward(q, k, v, keep, out, denominator)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, keep, out, denominator = ctx.saved_tensors
        chunk = ctx.chunk
        batch, heads, length, dim = q.shape
        value_dim = v.shape[-1]
        per_chunk = batch * heads * chunk * (chunk + dim + value_dim)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

        def grad_result(first: int, last: int) -> Tensor:
            # out = numerator / denominator: the gradient for [numerator, denominator] (0 where nothing was seen).
            seen = denominator[:, :, first:last].unsqueeze(-1)
            scale = 1.0 / torch.where(seen > 0, seen, torch.ones_like(seen))
            d_out = grad_out[:, :, first:last]
            d_den = -(d_out * out[:, :, first:last]).sum(-1, keepdim=True)
            return torch.cat([d_out, d_den], dim=-1) * scale

        def feature_slope(x: Tensor) -> Tensor:  # d(elu(x) + 1)/dx
            return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp(max=0)))

        # Queries: d phi(q_i) = sum_{j <= i} (g_i . [v_j, 1]) phi(k_j), forward through the sequence.
        state = q.new_zeros(batch, heads, value_dim + 1, dim)  # sum of [v, 1] phi(k)^T over earlier groups
        for first, last in _chunk_groups(length, chunk, per_chunk):
            g = _chunked(grad_result(first, last), chunk)
            fk = _chunked(_features(k, keep, first, last), chunk)
            fv = _chunked(F.pad(v[:, :, first:last], (0, 1), value=1.0), chunk)
            states = fv.transpose(-2, -1) @ fk  # [batch, heads, chunks, value_dim + 1, dim]
            earlier = states.cumsum(dim=2) - states + state.unsqueeze(2)
            d_fq = _unchunked((g @ fv.transpose(-2, -1)).tril() @ fk + g @ earlier, last - first)
            state = state + states.sum(dim=2)
            grad_q[:, :, first:last] = d_fq * feature_slope(q[:, :, first:last])
        # Keys and values: d phi(k_j) = sum_{i >= j} (g_i . [v_j, 1]) phi(q_i) and d[v_j, 1] = sum_{i >= j}
        # (phi(q_i) . phi(k_j)) g_i, both from the running sum of phi(q_i) g_i^T, backward through the sequence.
        state = q.new_zeros(batch, heads, dim, value_dim + 1)
        for first, last in reversed(list(_chunk_groups(length, chunk, per_chunk))):
            g = _chunked(grad_result(first, last), chunk)
            fq = _chunked(feature_map(q[:, :, first:last]), chunk)
            fk = _chunked(_features(k, keep, first, last), chunk)
            fv = _chunked(F.pad(v[:, :, first:last], (0, 1), value=1.0), chunk)
            states = fq.transpose(-2, -1) @ g  # [batch, heads, chunks, dim, value_dim + 1]
            later = states.flip(2).cumsum(dim=2).flip(2) - states + state.unsqueeze(2)
            d_fk = (g @ fv.transpose(-2, -1)).tril().transpose(-2, -1) @ fq + fv @ later.transpose(-2, -1)
            d_fv = (fq @ fk.transpose(-2, -1)).tril().transpose(-2, -1) @ g + fk @ later
            state = state + states.sum(dim=2)
            d_fk = _unchunked(d_fk, last - first)
            if keep is not None:
                d_fk = d_fk * keep[:, :, first:last]
            grad_k[:, :, first:last] = d_fk * feature_slope(k[:, :, first:last])
            grad_v[:, :, first:last] = _unchunked(d_fv, last - first)[..., :value_dim]
        return grad_q, grad_k, grad_v, None, None
