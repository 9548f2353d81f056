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

# Score elements per chunk and thread (1 MB in float32): the scores and their gradients stay in the cores' L2 caches
# while the chunk's passes (products, exp, sums) run over them -- each pass splits the chunk among the threads in the
# same halves, so a chunk of two threads' share stays in two cores' caches -- and the chunks are few enough that
# their Python is cheap (16K tokens, 6 heads, 2 threads: chunks of 2^19 elements 4% faster forward + backward than
# 2^18; one thread: 2^18 1-5% faster than 2^19).
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


def _strided_rows(x: Tensor, first: int, count: int, size: int, step: int) -> Tensor:
    """``count`` runs of ``size`` rows of x [tokens, d], the first starting at row ``first`` and each ``step`` rows
    after the one before, as a view [count, size, d] (one call: the chunk loops below cut a few per chunk) -- or,
    where the runs reach past either end of x, from a zero-padded copy of the rows they cover."""
    last = first + (count - 1) * step + size
    if first < 0 or last > x.shape[0]:
        x, first = _rows(x, first, last), 0
    row, column = x.stride()
    return x.as_strided((count, size, x.shape[1]), (step * row, row, column), x.storage_offset() + first * row)


def _windows(x: Tensor, blocked: BlockedMask, first: int, last: int) -> Tensor:
    """The key windows of blocks [first, last) from the rows x [tokens, d]: a view [last - first, span, d]."""
    block = blocked.block
    return _strided_rows(x, first * block - blocked.before, last - first, blocked.before + block + blocked.after,
                         block)


def _blocks(x: Tensor, block: int, first: int, last: int) -> Tensor:
    """Blocks [first, last) of the rows x [tokens, d] as [last - first, block, d] (zero rows past the end)."""
    return _strided_rows(x, first * block, last - first, block, block)


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

    def head(self, sequence: int, head: int) -> tuple[Tensor, list[bool], Tensor]:
        """One (sequence, head)'s masks: the common block's [block, span], which blocks have it, and every block's
        [blocks, block, span]."""
        row = sequence if self.value.shape[0] > 1 else 0
        column = head if self.value.shape[2] > 1 else 0
        return self.common[row, column], self.same[row][column], self.value[row, :, column]

    @staticmethod
    def blocks(head: tuple[Tensor, list[bool], Tensor], start: int, stop: int) -> Tensor:
        """The masks of blocks [start, stop) under ``head``'s masks (``head()``): the common block's [block, span]
        if every one of them has it, else their own [stop - start, block, span]."""
        common, same, every = head
        return common if all(same[start:stop]) else every[start:stop]

    @staticmethod
    def scores(products: Tensor, scale: float, head: tuple[Tensor, list[bool], Tensor], start: int,
               stop: int) -> Tensor:
        """The base-2 scores of blocks [start, stop), log2(e) * (products * scale + mask), in ``products``'
        memory (one pass), under ``head``'s masks (``head()``)."""
        return torch.add(_Masks.blocks(head, start, stop), products, alpha=scale * LOG2E, out=products)

    @staticmethod
    def scores_less(buffer: Tensor, head: tuple[Tensor, list[bool], Tensor], sums: Tensor, start: int,
                    stop: int) -> Tensor:
        """Blocks [start, stop)'s masks (``head()``) less the rows' ``sums`` [stop - start, block, 1], in
        ``buffer`` [stop - start, block, span]."""
        return torch.sub(_Masks.blocks(head, start, stop), sums, out=buffer)

    def empty_rows(self, sequence: int, head: int, start: int, stop: int) -> Tensor | None:
        """The rows of blocks [start, stop) that see no key, [stop - start, block, 1], or None."""
        if self.empty is None:
            return None
        return self.empty[sequence if self.empty.shape[0] > 1 else 0, start:stop].select(
            1, head if self.empty.shape[2] > 1 else 0)


def _chunk_size(per_block: int, blocks: int) -> int:
    """Blocks per chunk."""
    return min(blocks, max(1, CHUNK_ELEMENTS * torch.get_num_threads() // max(per_block, 1)))


def _chunks(batch: int, heads: int, blocks: int, per_block: int):
    """(sequence, head, runs): each (sequence, head) and its runs of blocks, (first, last) each."""
    size = _chunk_size(per_block, blocks)
    runs = [(first, min(first + size, blocks)) for first in range(0, blocks, size)]
    for sequence in range(batch):
        for head in range(heads):
            yield sequence, head, runs


def _add_parts(rows: Tensor, scores: Tensor, right: Tensor, first: int, last: int, lead: int,
               reach: list[tuple[int, int]], alpha: float, fresh: bool) -> None:
    """rows[j - lead + p] += alpha * scores[j][:, part p]^T right[j] for the chunk's blocks j in [first, last) and each
    part p of their windows (``rows`` [row blocks, block, d], ``scores`` [count, block, span], ``right`` [count, block,
    d]), where block j's part p lands inside the sequence (j in ``reach[p]``). The last part goes first and, if
    ``fresh``, writes its rows instead of adding to them: they are the rows no earlier chunk reached."""
    block = rows.shape[1]
    # Part p of every block's window, transposed: [parts, count, block (key), block (query)].
    pieces = scores.unflatten(2, (len(reach), block)).permute(2, 0, 3, 1)
    for part in range(len(reach) - 1, -1, -1):
        low, high = max(first, reach[part][0]), min(last, reach[part][1])
        if low < high:
            beta = 0.0 if fresh and part == len(reach) - 1 else 1.0
            piece = pieces[part]
            if low > first or high < last:
                piece, operand = piece[low - first:high - first], right[low - first:high - first]
            else:
                operand = right
            rows[low + part - lead:high + part - lead].baddbmm_(piece, operand, beta=beta, alpha=alpha)


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
        # One chunk's scores live in this buffer, chunk after chunk (backward: the scores and their gradient in two):
        # the same memory stays in cache, and no chunk-sized tensor is allocated per chunk.
        buffer = q.new_empty(_chunk_size(block * span, blocks), block, span)
        for sequence, head, runs in _chunks(batch, heads, blocks, block * span):
            keys, values, queries = k[sequence, head // share], v[sequence, head // share], q[sequence, head]
            outputs, sums, mask = out[sequence, head], logsumexp[sequence, head], masks.head(sequence, head)
            for first, last in runs:
                products = torch.bmm(_blocks(queries, block, first, last),
                                     _windows(keys, blocked, first, last).transpose(1, 2), out=buffer[:last - first])
                scores = masks.scores(products, scale, mask, first, last)
                top = scores.amax(-1, keepdim=True)
                weights = scores.sub_(top).exp2_()
                total = weights.sum(-1, keepdim=True)
                # Normalized after the product: [block, dim] divisions instead of [block, span].
                result = torch.bmm(weights, _windows(values, blocked, first, last),
                                   out=_blocks(outputs, block, first, last))
                result.div_(total)
                lse = torch.add(total.log2_(), top, out=_blocks(sums, block, first, last))
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
        # The key and value gradients have as many rows as the queries (the same size, so the allocator can hand back
        # the memory of an earlier one of these: a tensor of a new size over its largest mmap threshold is fresh
        # pages, a page fault for every 4 KB): block j's window covers row blocks j - lead .. j - lead + parts - 1,
        # and the parts outside the sequence, whose probabilities the mask made zero, are left out. They are not
        # zero-filled: each chunk's last part writes the row blocks no earlier chunk reached (``_add_parts``); only
        # the first ``after`` rows, which no block's last part reaches, start at zero.
        grad_k = k.new_empty(*k.shape[:2], blocks * block, dim)
        grad_v = v.new_empty(*v.shape[:2], blocks * block, v.shape[-1])
        grad_k[:, :, :blocked.after].zero_()
        grad_v[:, :, :blocked.after].zero_()
        lead = blocked.before // block
        # Each part's blocks [low, high) of every chunk: those whose part p lands inside the sequence.
        reach = [(lead - part, blocks + lead - part) for part in range(parts)]
        chunk = _chunk_size(block * span, blocks)
        buffers = q.new_empty(2, chunk, block, span)
        # dO * O of a chunk, and its row sums.
        products = q.new_empty(chunk, block, dim)
        deltas = q.new_empty(chunk, block, 1)
        for sequence, head, runs in _chunks(batch, heads, blocks, block * span):
            keys, values, all_queries = k[sequence, head // share], v[sequence, head // share], q[sequence, head]
            outputs, sums, grads = out[sequence, head], logsumexp[sequence, head], grad_out[sequence, head]
            query_grads, mask = grad_q[sequence, head], masks.head(sequence, head)
            # The key and value gradients' rows as blocks; the first of the heads that share them writes them.
            rows_k = grad_k[sequence, head // share].unflatten(0, (-1, block))
            rows_v = grad_v[sequence, head // share].unflatten(0, (-1, block))
            fresh = head % share == 0
            for first, last in runs:
                count = last - first
                queries = _blocks(all_queries, block, first, last)
                window_keys = _windows(keys, blocked, first, last)
                window_values = _windows(values, blocked, first, last)
                # The probabilities again, in one pass from the saved log-sum-exp: the mask less the log-sum-exp
                # first, then the product added to it inside the matrix product.
                weights = masks.scores_less(buffers[0, :count], mask, _blocks(sums, block, first, last), first, last)
                weights.baddbmm_(queries, window_keys.transpose(1, 2), alpha=scale * LOG2E).exp2_()
                grad = _blocks(grads, block, first, last)
                # The windows overlap, so the product for each block of keys in the span adds straight into its
                # rows (one product per part of the span, no window-sized gradient and no second pass to fold it).
                _add_parts(rows_v, weights, grad, first, last, lead, reach, 1.0, fresh)
                # delta_i = sum_j P_ij dP_ij = dO_i . O_i (Dao et al.), then dS = P * (dP - delta), built in dP's
                # memory; the gradients of q and k carry ``scale`` (their products' alpha).
                delta = torch.mul(grad, _blocks(outputs, block, first, last), out=products[:count])
                delta = torch.sum(delta, -1, keepdim=True, out=deltas[:count])
                grad_scores = torch.bmm(grad, window_values.transpose(1, 2), out=buffers[1, :count])
                grad_scores.sub_(delta).mul_(weights)
                del weights
                _blocks(query_grads, block, first, last).baddbmm_(grad_scores, window_keys, beta=0.0, alpha=scale)
                _add_parts(rows_k, grad_scores, queries, first, last, lead, reach, scale, fresh)
        return grad_q[:, :, :length], grad_k[:, :, :length], grad_v[:, :, :length], None, None
