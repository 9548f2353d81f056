"""Sliding-window (local) attention computed block by block, so time and memory grow with length x window.

The queries are cut into blocks; each block attends only to the keys of its window (plus the global tokens' keys, if
any), under a ``BlockedMask`` prepared once per forward (see ``formerkit.nn.masks.prepare_blocked_mask``).

Blocks are processed a group at a time, and backward recomputes each group's attention probabilities from the saved
queries, keys and values instead of keeping them (as fused attention kernels do): besides the inputs and output, only
one group's scores are ever alive, so memory stays close to that of a fused full-attention kernel while the work is a
fraction of it. Without global tokens, in single or double precision, the blocks read their keys as views
(``formerkit.nn.banded_attention``); the gathering path here serves global tokens and half precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from formerkit.nn.banded_attention import band_fits, banded_attention
from formerkit.nn.masks import BlockedMask

__all__ = ["blockwise_attention", "grouped_sdpa", "repeat_kv", "softcapped_attention", "written_out_scores"]

# SDPA's enable_gqa arrived in torch 2.5; older versions repeat the key/value heads instead.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

# Score elements per group of blocks (1 MB in float32): large enough that the per-group Python work is small, small
# enough that a group's scores and their gradients stay small. Window 256 over 16K tokens, 6 heads x 64, fwd+bwd:
# 2^18 -> 411 ms and 143 MB above the inputs, 2^20 -> 478 ms and 166 MB, 2^21 -> 410 ms and 201 MB.
GROUP_ELEMENTS = 2**18
# Forward groups are this many times larger.
FORWARD_GROUPS = 8


def repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values [batch, kv_heads, keys, d] with each head repeated for its group of query heads, for code
    that needs one key/value head per query head (q [batch, heads, queries, d])."""
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return k, v


def grouped_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, softcap: float | None = None) -> Tensor:
    """SDPA with grouped key/value heads (repeated on torch versions whose SDPA cannot share them). With a
    ``softcap`` the scores are capped before the mask, softcap * tanh(scores / softcap) (Gemma 2), which SDPA cannot
    do: the attention is then written out (``softcapped_attention``)."""
    if softcap is not None:
        return softcapped_attention(q, k, v, attn_mask, dropout, is_causal, scale, softcap)
    extra = {} if scale is None else {"scale": scale}
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            k, v = repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                                          **extra)


def written_out_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, *, scale: float | None = None,
                       multiplier: Tensor | None = None, softcap: float | None = None) -> Tensor:
    """The masked scores cap(multiplier * (q k^T * scale)) + mask [batch, heads, queries, keys], for keys with one head
    per query head (``repeat_kv``; scale 1/sqrt(d) by default; ``multiplier`` [heads, queries, keys] scales them,
    as the Gaussian-mixture mask does; cap(s) = softcap * tanh(s / softcap), Gemma 2's; masks as in SDPA): what the
    paths that cannot use SDPA compute before their softmax."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if multiplier is not None:
        scores = scores * multiplier
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        length, keys = scores.shape[-2:]
        attn_mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(keys - length)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float, is_causal: bool,
                         scale: float | None, softcap: float) -> Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap) + mask) v written out (Gemma 2's capped scores; masks as in
    SDPA). Half-precision scores are normalized in float32, as fused kernels do."""
    k, v = repeat_kv(q, k, v)
    scores = written_out_scores(q, k, attn_mask, is_causal, scale=scale, softcap=softcap)
    wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    weights = scores.softmax(dim=-1, dtype=wide).to(q.dtype)
    return (F.dropout(weights, dropout) if dropout else weights) @ v


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, dropout: float = 0.0,
                        scale: float | None = None, softcap: float | None = None) -> Tensor:
    """Local attention: q [batch, heads, tokens, dim], k/v [batch, kv_heads, tokens, dim]; each block of queries
    against the keys of its window, the global queries (if any) against every key. With attention dropout (training)
    the blocks go through autograd as a whole, as dropout's random mask must be the one backward sees; so do
    soft-capped scores (``softcap``), whose derivative the recomputing backward does not know, and a mask that is
    learned (T5's relative bias table: the recomputing backward gives no gradient to the mask)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout or softcap is not None or (blocked.value.requires_grad and torch.is_grad_enabled()):
        out = _local_with_autograd(q, k, v, blocked, dropout, scale, softcap)
    elif band_fits(blocked) and q.dtype in (torch.float32, torch.float64):
        # Half-precision inputs keep the path below, which normalizes their scores in float32.
        out = banded_attention(q, k, v, blocked, scale)
    else:
        out = _LocalAttention.apply(q, k, v, blocked, scale)
    glob = blocked.global_tokens
    if glob:
        rows = blocked.global_rows
        value = rows.value if rows.value.dtype == torch.bool else rows.value.to(q.dtype)
        first = grouped_sdpa(q[:, :, :glob], k, v, value, dropout, False, scale, softcap)
        if rows.empty_rows is not None:
            first = first.masked_fill(rows.empty_rows, 0.0)
        out = torch.cat([first, out[:, :, glob:]], dim=2)
    return out


# ----- pieces shared by both paths -----


def _num_blocks(length: int, blocked: BlockedMask) -> int:
    return -(-length // blocked.block)


def _group_queries(x: Tensor, start: int, stop: int, block: int) -> Tensor:
    """Rows of blocks [start, stop) of x [batch, heads, tokens, d] as [batch, heads, blocks, block, d] (zeros past the
    end)."""
    first, last = start * block, min(stop * block, x.shape[2])
    rows = x[:, :, first:last]
    missing = (stop - start) * block - (last - first)
    if missing:
        rows = F.pad(rows, (0, 0, 0, missing))
    return rows.reshape(x.shape[0], x.shape[1], stop - start, block, x.shape[3])


class _WindowKeys:
    """The window keys of groups of blocks from x [batch, kv_heads, tokens, d], as [batch, kv_heads, blocks, keys, d].

    With ``views``, one sequence and no global tokens, the windows are overlapping views of one zero-padded copy (no
    gathering: one copy of the keys per call, not one per block; faster, but the copy lives as long as this object);
    otherwise each group's keys are gathered by position (slots holding no key read token 0, which the mask
    blocks)."""

    def __init__(self, x: Tensor, blocked: BlockedMask, views: bool = True):
        self.x, self.blocked = x, blocked
        self.padded = None
        if views and x.shape[0] == 1 and not blocked.global_tokens:
            after = _num_blocks(x.shape[2], blocked) * blocked.block - x.shape[2] + blocked.after
            # [1, before + blocks * block + after, kv_heads, d], token-major so each window is one strided view.
            self.padded = F.pad(x.transpose(1, 2), (0, 0, 0, 0, blocked.before, after))

    def __call__(self, start: int, stop: int) -> Tensor:
        x, blocked = self.x, self.blocked
        if self.padded is None:
            index = blocked.key_index[start:stop].clamp(0, x.shape[2] - 1)
            return x.index_select(2, index.flatten()).view(x.shape[0], x.shape[1], stop - start, index.shape[1],
                                                           x.shape[3])
        span = blocked.before + blocked.block + blocked.after
        rows = self.padded[:, start * blocked.block:(stop - 1) * blocked.block + span]
        # unfold: [1, blocks, kv_heads, d, span] -> [1, kv_heads, blocks, span, d]
        return rows.unfold(1, span, blocked.block).permute(0, 2, 1, 4, 3)


def _group_mask(tensor: Tensor | None, blocks: int, start: int, stop: int) -> Tensor | None:
    """Blocks [start, stop) of a blocked mask (or its empty rows) laid out [batch|1 * blocks, heads|1, block, keys]:
    [batch|1, heads|1, group, block, keys]."""
    if tensor is None:
        return None
    batch = tensor.shape[0] // blocks
    return tensor.view(batch, blocks, *tensor.shape[1:])[:, start:stop].transpose(1, 2)


def _groups(blocks: int, per_block: int):
    size = max(1, GROUP_ELEMENTS // max(per_block, 1))
    for start in range(0, blocks, size):
        yield start, min(start + size, blocks)


def _local_with_autograd(q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, dropout: float,
                         scale: float, softcap: float | None = None) -> Tensor:
    """All blocks in one SDPA call (written out with soft-capped scores), through autograd (the path with attention
    dropout or a soft-cap)."""
    batch, heads, length, _ = q.shape
    blocks = _num_blocks(length, blocked)
    queries = _group_queries(q, 0, blocks, blocked.block)
    keys, values = _WindowKeys(k, blocked)(0, blocks), _WindowKeys(v, blocked)(0, blocks)
    out = grouped_sdpa(*(x.transpose(1, 2).reshape(batch * blocks, x.shape[1], *x.shape[3:])
                         for x in (queries, keys, values)),
                       _as_sdpa_mask(blocked.value, q.dtype, batch, blocks), dropout, False, scale, softcap)
    if blocked.empty_rows is not None:
        out = out.masked_fill(_expand_blocks(blocked.empty_rows, batch, blocks), 0.0)
    return out.view(batch, blocks, heads, blocked.block, -1).transpose(1, 2).reshape(
        batch, heads, blocks * blocked.block, -1)[:, :, :length]


def _expand_blocks(tensor: Tensor, batch: int, blocks: int) -> Tensor:
    """[batch|1 * blocks, ...] -> [batch * blocks, ...]: a mask shared by the rows (stored once, see
    ``prepare_blocked_mask``) repeated for each, as SDPA broadcasts a size-1 batch but not one of blocks."""
    if tensor.shape[0] == blocks and batch > 1:
        tensor = tensor.unsqueeze(0).expand(batch, *tensor.shape).reshape(batch * blocks, *tensor.shape[1:])
    return tensor


def _as_sdpa_mask(value: Tensor, dtype: torch.dtype, batch: int, blocks: int) -> Tensor:
    value = _expand_blocks(value, batch, blocks)
    return value if value.dtype == torch.bool else value.to(dtype)


class _LocalAttention(torch.autograd.Function):
    """Blockwise local attention without dropout, a group of blocks at a time, recomputing probabilities in
    backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, scale: float) -> Tensor:
        batch, heads, length, _ = q.shape
        blocks, block = _num_blocks(length, blocked), blocked.block
        out = q.new_empty(batch, heads, blocks * block, v.shape[-1])
        # Forward keeps no scores (SDPA's fused kernel), so its groups can be larger than backward's.
        per_block = batch * heads * block * blocked.key_index.shape[1] // FORWARD_GROUPS
        window_keys, window_values = _WindowKeys(k, blocked), _WindowKeys(v, blocked)
        for start, stop in _groups(blocks, per_block):
            group = stop - start
            queries = _group_queries(q, start, stop, block)
            keys, values = window_keys(start, stop), window_values(start, stop)
            mask = _group_mask(blocked.value, blocks, start, stop).transpose(1, 2)
            mask = _as_sdpa_mask(mask.reshape(-1, *mask.shape[2:]), q.dtype, batch, group)
            result = grouped_sdpa(*(x.transpose(1, 2).reshape(batch * group, x.shape[1], *x.shape[3:])
                                    for x in (queries, keys, values)), mask, 0.0, False, scale)
            result = result.view(batch, group, heads, block, -1).transpose(1, 2)
            empty = _group_mask(blocked.empty_rows, blocks, start, stop)
            if empty is not None:
                result = result.masked_fill(empty, 0.0)
            out.view(batch, heads, blocks, block, -1)[:, :, start:stop] = result
        out = out[:, :, :length]
        ctx.save_for_backward(q, k, v, out)
        ctx.blocked, ctx.scale = blocked, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out = ctx.saved_tensors
        blocked, scale = ctx.blocked, ctx.scale
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        share = heads // kv_heads
        blocks, block = _num_blocks(length, blocked), blocked.block
        grad_q = torch.zeros_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        per_block = batch * heads * block * blocked.key_index.shape[1]

        def by_group(x: Tensor) -> Tensor:  # [batch, heads, ...] -> [batch, kv_heads, share, ...]
            return x.view(x.shape[0], -1 if x.shape[1] == heads else 1, share if x.shape[1] == heads else 1,
                          *x.shape[2:])

        # Gathered per group, not viewed from padded copies: backward's memory peak would hold those copies too.
        window_keys, window_values = _WindowKeys(k, blocked, views=False), _WindowKeys(v, blocked, views=False)
        for start, stop in _groups(blocks, per_block):
            group = stop - start
            queries = by_group(_group_queries(q, start, stop, block))  # [b, kv, share, group, block, dim]
            keys = window_keys(start, stop).unsqueeze(2)  # [b, kv, 1, group, keys, dim]
            values = window_values(start, stop).unsqueeze(2)
            d_out = by_group(_group_queries(grad_out, start, stop, block))
            outputs = by_group(_group_queries(out, start, stop, block))
            # The probabilities again, as forward computed them.
            scores = (queries @ keys.transpose(-2, -1)) * scale
            mask = by_group(_group_mask(blocked.value, blocks, start, stop))
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            # Half-precision scores are normalized in float32, as fused kernels do; others in their own precision.
            wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
            probabilities = scores.softmax(dim=-1, dtype=wide).to(q.dtype)
            del scores
            empty = _group_mask(blocked.empty_rows, blocks, start, stop)
            if empty is not None:
                probabilities.masked_fill_(by_group(empty), 0.0)
            grad_values = (probabilities.transpose(-2, -1) @ d_out).sum(2)  # [b, kv, group, keys, dim]
            delta = (d_out * outputs).sum(-1, keepdim=True)
            # The gradient of the scores, P * (dP - delta) * scale, built in place in dP's memory.
            grad_scores = (d_out @ values.transpose(-2, -1)).sub_(delta).mul_(probabilities).mul_(scale)
            del probabilities
            grad_queries = (grad_scores @ keys).reshape(batch, heads, group * block, dim)
            first, last = start * block, min(stop * block, length)
            grad_q[:, :, first:last] = grad_queries[:, :, : last - first]
            grad_keys = (grad_scores.transpose(-2, -1) @ queries).sum(2)  # [b, kv, group, keys, dim]
            # Slots holding no key read token 0 and got zero probability, so what they add there is zero.
            index = blocked.key_index[start:stop].clamp(0, length - 1).flatten()
            grad_k.index_add_(2, index, grad_keys.reshape(batch, kv_heads, -1, dim))
            grad_v.index_add_(2, index, grad_values.reshape(batch, kv_heads, -1, v.shape[-1]))
        return grad_q, grad_k, grad_v, None, None
