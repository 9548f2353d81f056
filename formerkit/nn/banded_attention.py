"""Blockwise local attention over overlapping views of the keys: no gathered copies of the windows.

Every (sequence, head) pair's keys are laid out one after another in one flat [rows, dim] tensor, preceded by
``before`` and followed by ``after`` rows of zeros. With ``before`` a whole number of blocks, block ``i`` of that
layout reads rows [i * block, i * block + span): the keys of all blocks form one strided view
[blocks, span, dim] (row stride dim, block stride block * dim), which matrix products read in place. The first blocks
of a sequence read the end of the previous one (and the last ones, without causality, the start of the next): those
keys lie outside the sequence, which the blocked mask blocks, so they get zero probability.

Forward computes softmax(q k^T * scale + mask) v a chunk of blocks at a time with batched matrix products and keeps
only the output and the log-sum-exp of each row; backward recomputes the probabilities of a chunk as
exp(scores - logsumexp) (one pass, no second softmax; both in base 2, see ``LOG2E``) and folds the gradients of the
overlapping key windows back onto the keys with one addition per block of the span. Nothing larger than one chunk's
scores is ever alive beyond the inputs, outputs and gradients, as in fused attention kernels (Dao et al., 2022,
"FlashAttention").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from formerkit.nn.masks import BlockedMask

__all__ = ["banded_attention", "band_fits"]

# Score elements per chunk (1 MB in float32): the scores and their gradients stay in a core's L2 cache while the
# chunk's passes (products, exp, sums) run over them, and the chunks are few enough that their Python is cheap.
CHUNK_ELEMENTS = 2**18

# Scores are kept in base 2 (log2(e) * (q k^T * scale + mask)) and exponentiated with exp2: the same probabilities,
# and exp2 takes the same time for every input, where exp slows down several times on the masked (-inf) and
# underflowing scores (float32 on a 2-core AVX-512 CPU, 3.2M scores of which a fifth masked: exp 27 ms, exp2 8 ms).
LOG2E = math.log2(math.e)


def band_fits(blocked: BlockedMask) -> bool:
    """Whether ``blocked`` has the layout the band views need: no global tokens and a span of whole blocks."""
    return (not blocked.global_tokens and blocked.before % blocked.block == 0
            and blocked.after % blocked.block == 0)


def banded_attention(q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, scale: float) -> Tensor:
    """Local attention of q [batch, heads, tokens, dim] over k/v [batch, kv_heads, tokens, dim] under ``blocked``
    (``band_fits``), differentiable by recomputation."""
    return _BandedAttention.apply(q, k, v, blocked, scale)


def _flat_keys(x: Tensor, blocked: BlockedMask, blocks: int) -> Tensor:
    """x [batch, kv_heads, tokens, d] as [before + batch * kv_heads * blocks * block + after, d], each sequence
    padded to whole blocks, zeros around."""
    batch, heads, length, dim = x.shape
    block = blocked.block
    flat = x.new_empty(blocked.before + batch * heads * blocks * block + blocked.after, dim)
    flat[:blocked.before].zero_()
    flat[flat.shape[0] - blocked.after:].zero_()
    body = flat[blocked.before:blocked.before + batch * heads * blocks * block].view(batch, heads, blocks * block, dim)
    body[:, :, :length] = x
    body[:, :, length:].zero_()
    return flat


def _band(flat: Tensor, blocked: BlockedMask, start: int, stop: int) -> Tensor:
    """Blocks [start, stop) of the flat layout's key windows: a view [stop - start, span, d]."""
    span = blocked.before + blocked.block + blocked.after
    dim = flat.shape[1]
    return flat.as_strided((stop - start, span, dim), (blocked.block * dim, dim, 1), start * blocked.block * dim)


def _queries(x: Tensor, blocks: int, block: int) -> Tensor:
    """x [batch, heads, tokens, d] as [batch * heads * blocks, block, d] (a view when it can be, zero rows past the
    end)."""
    batch, heads, length, dim = x.shape
    if length != blocks * block:
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - length))
    return x.reshape(batch * heads * blocks, block, dim)


class _Masks:
    """The masks of chunks of blocks of one (sequence, head), from the blocked mask ([batch*blocks | blocks,
    heads | 1, block, span]) as base-2 scores to add. Most blocks of a sequence have the same mask as its middle
    block (a band of whole blocks; a document's inside): chunks made only of those read that one block's mask, in
    cache, instead of a slice of the whole mask, and only its columns that block something (the band's two
    triangles), instead of every column. Built once per blocked mask and dtype, for every layer."""

    def __init__(self, blocked: BlockedMask, dtype: torch.dtype, blocks: int):
        if blocked.additive is None:
            blocked.additive = {}
        if dtype not in blocked.additive:
            value = blocked.value
            additive = (torch.zeros(value.shape, dtype=dtype, device=value.device).masked_fill_(~value, float("-inf"))
                        if value.dtype == torch.bool else value.to(dtype) * LOG2E)
            additive = additive.view(-1, blocks, *additive.shape[1:])  # [batch|1, blocks, heads|1, block, span]
            common = additive[:, blocks // 2]
            # Blocks whose mask is the middle one's, [batch|1, heads|1, blocks] (-inf == -inf counts as equal).
            same = (additive == common.unsqueeze(1)).flatten(3).all(-1).transpose(1, 2)
            blocked.additive[dtype] = (additive, common, same.tolist(), _open_columns(common))
        self.value, self.common, self.same, self.open = blocked.additive[dtype]
        self.empty = (None if blocked.empty_rows is None
                      else blocked.empty_rows.view(-1, blocks, *blocked.empty_rows.shape[1:]))

    def add_to(self, scores: Tensor, sequence: int, head: int, start: int, stop: int) -> Tensor:
        """Adds the mask of blocks [start, stop) to their scores [stop - start, block, span] (in place)."""
        row = sequence if self.value.shape[0] > 1 else 0
        column = head if self.value.shape[2] > 1 else 0
        if not all(self.same[row][column][start:stop]):
            return scores.add_(self.value[row, start:stop, column])
        common = self.common[row, column]
        first, last = self.open[row][column]
        if first > 0:
            scores[..., :first] += common[:, :first]
        if last < scores.shape[-1]:
            scores[..., last:] += common[:, last:]
        return scores

    def empty_rows(self, sequence: int, head: int, start: int, stop: int) -> Tensor | None:
        """The rows of blocks [start, stop) that see no key, [stop - start, block, 1], or None."""
        if self.empty is None:
            return None
        return self.empty[sequence if self.empty.shape[0] > 1 else 0, start:stop].select(
            1, head if self.empty.shape[2] > 1 else 0)


def _open_columns(common: Tensor) -> list[list[tuple[int, int]]]:
    """For each mask [block, span] of ``common`` [batch|1, heads|1, block, span], the widest range of columns
    [first, last) that adds nothing (zeros: keys every query of the block sees), or (0, 0)."""
    ranges = []
    for rows in common:
        per_head = []
        for mask in rows:
            zero = (mask == 0).all(0).tolist()
            first = zero.index(True) if True in zero else 0
            last = first
            while last < len(zero) and zero[last]:
                last += 1
            per_head.append((first, last))
        ranges.append(per_head)
    return ranges


def _chunks(batch: int, heads: int, kv_heads: int, blocks: int, per_block: int):
    """(query block, key block, sequence, head, first, last): chunks of blocks of one (sequence, head) each, with
    the flat index of their first query block and first key block."""
    size = max(1, CHUNK_ELEMENTS // max(per_block, 1))
    share = heads // kv_heads
    for sequence in range(batch):
        for head in range(heads):
            queries = (sequence * heads + head) * blocks
            keys = (sequence * kv_heads + head // share) * blocks
            for first in range(0, blocks, size):
                last = min(first + size, blocks)
                yield queries + first, keys + first, sequence, head, first, last


class _BandedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, scale: float) -> Tensor:
        batch, heads, length, dim = q.shape
        block = blocked.block
        blocks = -(-length // block)
        span = blocked.before + block + blocked.after
        masks = _Masks(blocked, q.dtype, blocks)
        queries = _queries(q, blocks, block)
        keys, values = _flat_keys(k, blocked, blocks), _flat_keys(v, blocked, blocks)
        out = q.new_empty(queries.shape[0], block, v.shape[-1])
        logsumexp = q.new_empty(queries.shape[0], block, 1)
        for at, key_at, sequence, head, first, last in _chunks(batch, heads, k.shape[1], blocks, block * span):
            count = last - first
            scores = torch.bmm(queries[at:at + count] * (scale * LOG2E),
                               _band(keys, blocked, key_at, key_at + count).transpose(1, 2))
            masks.add_to(scores, sequence, head, first, last)
            empty = masks.empty_rows(sequence, head, first, last)
            top = scores.amax(-1, keepdim=True)
            weights = scores.sub_(top).exp2_()
            total = weights.sum(-1, keepdim=True)
            # Normalized after the product: [block, dim] divisions instead of [block, span].
            result = torch.bmm(weights, _band(values, blocked, key_at, key_at + count), out=out[at:at + count])
            result.div_(total)
            lse = torch.add(total.log2_(), top, out=logsumexp[at:at + count])
            if empty is not None:
                # A query with no key gives zeros, and its probabilities are zero in backward (exp(s - inf)).
                result.masked_fill_(empty, 0.0)
                lse.masked_fill_(empty, float("inf"))
        out = out.view(batch, heads, blocks * block, -1)[:, :, :length]
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.blocked, ctx.scale = blocked, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, logsumexp = ctx.saved_tensors
        blocked, scale = ctx.blocked, ctx.scale
        batch, heads, length, dim = q.shape
        block = blocked.block
        blocks = -(-length // block)
        span = blocked.before + block + blocked.after
        parts = span // block
        masks = _Masks(blocked, q.dtype, blocks)
        queries = _queries(q, blocks, block)
        keys, values = _flat_keys(k, blocked, blocks), _flat_keys(v, blocked, blocks)
        d_out = _queries(grad_out, blocks, block)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i (Dao et al.): the softmax's backward without P's rows. Divided by
        # log2(e), as are the gradients of the scores below: products with the base-2 scaled queries then give the
        # key gradients at the natural scale.
        delta = (d_out * _queries(out, blocks, block)).sum(-1, keepdim=True).div_(LOG2E)
        grad_q = torch.empty_like(queries)
        # The key gradients in the flat layout, as blocks: block i's window covers flat blocks i .. i + parts - 1.
        grad_keys = keys.new_zeros(keys.shape[0] // block, block, dim)
        grad_values = values.new_zeros(values.shape[0] // block, block, v.shape[-1])
        for at, key_at, sequence, head, first, last in _chunks(batch, heads, k.shape[1], blocks, 2 * block * span):
            count = last - first
            scaled = queries[at:at + count] * (scale * LOG2E)
            window_keys = _band(keys, blocked, key_at, key_at + count)
            window_values = _band(values, blocked, key_at, key_at + count)
            # The probabilities again, in one pass from the saved log-sum-exp.
            weights = masks.add_to(torch.bmm(scaled, window_keys.transpose(1, 2)), sequence, head, first, last)
            weights.sub_(logsumexp[at:at + count]).exp2_()
            grad = d_out[at:at + count]
            window_grad_values = torch.bmm(weights.transpose(1, 2), grad).view(count, parts, block, -1)
            # dS / log2(e) = P * (dP - delta) / log2(e), built in dP's memory.
            grad_scores = torch.bmm(grad * (1.0 / LOG2E), window_values.transpose(1, 2))
            grad_scores.sub_(delta[at:at + count]).mul_(weights)
            del weights
            torch.bmm(grad_scores, window_keys, out=grad_q[at:at + count]).mul_(scale * LOG2E)
            window_grad_keys = torch.bmm(grad_scores.transpose(1, 2), scaled).view(count, parts, block, dim)
            for part in range(parts):
                grad_keys[key_at + part:key_at + part + count] += window_grad_keys[:, part]
                grad_values[key_at + part:key_at + part + count] += window_grad_values[:, part]
        kv_heads = k.shape[1]
        skip = blocked.before // block

        def unflat(x: Tensor, like: Tensor) -> Tensor:
            body = x[skip:skip + batch * kv_heads * blocks].view(batch, kv_heads, blocks * block, -1)
            return body[:, :, :length]

        grad_q = grad_q.view(batch, heads, blocks * block, dim)[:, :, :length]
        return grad_q, unflat(grad_keys, k), unflat(grad_values, v), None, None
