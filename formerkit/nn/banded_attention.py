"""Blockwise local attention over overlapping views of the keys: no gathered copies of the windows.

The queries of each (sequence, head) are cut into blocks of ``block``; block ``j`` reads the keys at positions
[j * block - before, (j + 1) * block + after), with ``before`` and ``after`` whole numbers of blocks, so the windows
of a run of blocks are one strided view of the key rows [blocks, span, dim] (block stride block rows, row stride the
tensor's own), which matrix products read in place, whatever the layout of q, k and v (heads-major or the
projection's token-major view). Only a chunk whose windows reach past either end of the sequence reads a small
zero-padded copy instead; the mask blocks those positions.

Forward computes softmax(q k^T * scale + mask) v a chunk of blocks at a time with batched matrix products and keeps
only the output and the log-sum-exp of each row; backward recomputes the probabilities of a chunk as
exp(scores - logsumexp) (one pass, no second softmax; both in base 2, see ``LOG2E``) and folds the gradients of the
overlapping key windows straight into the keys' rows, one product per block of the span. Nothing larger than one chunk's
scores is ever alive beyond the inputs, outputs and gradients, as in fused attention kernels (Dao et al., 2022,
"FlashAttention").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def _rows(x: Tensor, first: int, last: int) -> Tensor:
    """Rows [first, last) of x [tokens, d] (a view inside the sequence; zero rows for positions outside it)."""
    if first >= 0 and last <= x.shape[0]:
        return x[first:last]
    inside = x[max(first, 0):min(last, x.shape[0])]
    return F.pad(inside, (0, 0, max(-first, 0), max(last - x.shape[0], 0)))


def _windows(x: Tensor, blocked: BlockedMask, first: int, last: int) -> Tensor:
    """The key windows of blocks [first, last) from the rows x [tokens, d]: a view [last - first, span, d]."""
    block = blocked.block
    rows = _rows(x, first * block - blocked.before, last * block + blocked.after)
    span = blocked.before + block + blocked.after
    return rows.as_strided((last - first, span, rows.shape[1]), (block * rows.stride(0), rows.stride(0), 1))


def _blocks(x: Tensor, block: int, first: int, last: int) -> Tensor:
    """Blocks [first, last) of the rows x [tokens, d] as [last - first, block, d] (zero rows past the end)."""
    return _rows(x, first * block, last * block).unflatten(0, (last - first, block))


class _Masks:
    """The masks of chunks of blocks of one (sequence, head), from the blocked mask ([batch*blocks | blocks,
    heads | 1, block, span]) as base-2 scores to add. Most blocks of a sequence have the same mask as its middle
    block (a band of whole blocks; a document's inside): chunks made only of those read that one block's mask, in
    cache, instead of a slice of the whole mask. Built once per blocked mask and dtype, for every layer."""

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
            blocked.additive[dtype] = (additive, common, same.tolist())
        self.value, self.common, self.same = blocked.additive[dtype]
        self.empty = (None if blocked.empty_rows is None
                      else blocked.empty_rows.view(-1, blocks, *blocked.empty_rows.shape[1:]))

    def scores(self, products: Tensor, scale: float, sequence: int, head: int, start: int, stop: int) -> Tensor:
        """The base-2 scores of blocks [start, stop), log2(e) * (products * scale + mask), in ``products``'
        memory: one pass."""
        row = sequence if self.value.shape[0] > 1 else 0
        column = head if self.value.shape[2] > 1 else 0
        mask = (self.common[row, column] if all(self.same[row][column][start:stop])
                else self.value[row, start:stop, column])
        return torch.add(mask, products, alpha=scale * LOG2E, out=products)

    def empty_rows(self, sequence: int, head: int, start: int, stop: int) -> Tensor | None:
        """The rows of blocks [start, stop) that see no key, [stop - start, block, 1], or None."""
        if self.empty is None:
            return None
        return self.empty[sequence if self.empty.shape[0] > 1 else 0, start:stop].select(
            1, head if self.empty.shape[2] > 1 else 0)


def _chunks(batch: int, heads: int, blocks: int, per_block: int):
    """(sequence, head, first, last): runs of blocks of one (sequence, head) each."""
    size = max(1, CHUNK_ELEMENTS // max(per_block, 1))
    for sequence in range(batch):
        for head in range(heads):
            for first in range(0, blocks, size):
                yield sequence, head, first, min(first + size, blocks)


class _BandedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, blocked: BlockedMask, scale: float) -> Tensor:
        batch, heads, length, _ = q.shape
        block = blocked.block
        blocks = -(-length // block)
        span = blocked.before + block + blocked.after
        share = heads // k.shape[1]
        masks = _Masks(blocked, q.dtype, blocks)
        out = q.new_empty(batch, heads, blocks * block, v.shape[-1])
        logsumexp = q.new_empty(batch, heads, blocks * block, 1)
        for sequence, head, first, last in _chunks(batch, heads, blocks, block * span):
            keys, values = k[sequence, head // share], v[sequence, head // share]
            products = torch.bmm(_blocks(q[sequence, head], block, first, last),
                                 _windows(keys, blocked, first, last).transpose(1, 2))
            scores = masks.scores(products, scale, sequence, head, first, last)
            top = scores.amax(-1, keepdim=True)
            weights = scores.sub_(top).exp2_()
            total = weights.sum(-1, keepdim=True)
            # Normalized after the product: [block, dim] divisions instead of [block, span].
            result = torch.bmm(weights, _windows(values, blocked, first, last),
                               out=_blocks(out[sequence, head], block, first, last))
            result.div_(total)
            lse = torch.add(total.log2_(), top, out=_blocks(logsumexp[sequence, head], block, first, last))
            empty = masks.empty_rows(sequence, head, first, last)
            if empty is not None:
                # A query with no key gives zeros, and its probabilities are zero in backward (exp(s - inf)).
                result.masked_fill_(empty, 0.0)
                lse.masked_fill_(empty, float("inf"))
        out = out[:, :, :length]
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
        parts, share = span // block, heads // k.shape[1]
        masks = _Masks(blocked, q.dtype, blocks)
        grad_q = q.new_empty(batch, heads, blocks * block, dim)
        # The key gradients with the windows' reach around each sequence: block j's window covers its rows
        # [j * block, j * block + span).
        grad_k = k.new_zeros(*k.shape[:2], blocked.before + blocks * block + blocked.after, dim)
        grad_v = v.new_zeros(*v.shape[:2], grad_k.shape[2], v.shape[-1])
        for sequence, head, first, last in _chunks(batch, heads, blocks, block * span):
            count = last - first
            keys, values = k[sequence, head // share], v[sequence, head // share]
            queries = _blocks(q[sequence, head], block, first, last)
            window_keys, window_values = _windows(keys, blocked, first, last), _windows(values, blocked, first, last)
            # The probabilities again, in one pass from the saved log-sum-exp.
            weights = masks.scores(torch.bmm(queries, window_keys.transpose(1, 2)), scale, sequence, head, first, last)
            weights.sub_(_blocks(logsumexp[sequence, head], block, first, last)).exp2_()
            grad = _blocks(grad_out[sequence, head], block, first, last)
            rows_k, rows_v = grad_k[sequence, head // share], grad_v[sequence, head // share]
            # The windows overlap: block j's window covers rows [j * block, j * block + span) of the padded
            # gradients, so the product for each block of keys in the span adds straight into its rows (one product
            # per part of the span, no window-sized gradient and no second pass to fold it).
            for part in range(parts):
                columns = slice(part * block, (part + 1) * block)
                rows_v[(first + part) * block:(last + part) * block].view(count, block, -1).baddbmm_(
                    weights[:, :, columns].transpose(1, 2), grad)
            # delta_i = sum_j P_ij dP_ij = dO_i . O_i (Dao et al.), then dS = P * (dP - delta), built in dP's memory;
            # all times ``scale``, which the gradients of q and k carry.
            scaled = grad * scale
            delta = (scaled * _blocks(out[sequence, head], block, first, last)).sum(-1, keepdim=True)
            grad_scores = torch.bmm(scaled, window_values.transpose(1, 2)).sub_(delta).mul_(weights)
            del weights
            torch.bmm(grad_scores, window_keys, out=_blocks(grad_q[sequence, head], block, first, last))
            for part in range(parts):
                columns = slice(part * block, (part + 1) * block)
                rows_k[(first + part) * block:(last + part) * block].view(count, block, dim).baddbmm_(
                    grad_scores[:, :, columns].transpose(1, 2), queries)
        inside = slice(blocked.before, blocked.before + length)
        return grad_q[:, :, :length], grad_k[:, :, inside], grad_v[:, :, inside], None, None
