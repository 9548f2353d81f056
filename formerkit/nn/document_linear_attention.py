"""Causal linear attention over packed documents in linear time: the running sums restart at each document.

Under ``DocumentMask`` a query sees the earlier keys of its own document only. With each document one contiguous run
of tokens (as packing lays them out), the chunked form of ``formerkit.nn.linear_attention`` still holds with two
changes: within a chunk the causal mask is also a same-document mask, and the running sum of phi(k) [v, 1]^T a chunk
receives from the chunks before it holds only the keys of the document that is open at the chunk's start, which only
that document's queries read. The sums at the chunks' ends follow a recurrence with resets,
state_c = [chunk c continues the document open at its start] * state_{c-1} + (chunk c's keys of its last document),
computed for all chunks at once by a segmented scan (Blelloch, 1990, "Prefix sums and their applications"): log2(chunks)
steps, each linear in length, and no cancellation between large running totals. Differentiated by autograd: time
and memory grow linearly with length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["document_linear_attention", "document_runs"]


def document_runs(document_ids: Tensor) -> Tensor | None:
    """Run numbers [batch, tokens] (0, 1, ... along each row, a new number where the id changes) when every
    document of ``document_ids`` [batch, tokens] is one contiguous run, else None (a document interrupted by
    another: its two runs see each other, which running sums cannot express)."""
    change = document_ids[:, 1:] != document_ids[:, :-1]
    runs = F.pad(change.long().cumsum(1), (1, 0))
    # Sorted by id (stable: positions stay in order), equal ids must stand in one run.
    ids, order = document_ids.sort(dim=1, stable=True)
    sorted_runs = runs.gather(1, order)
    same_id = ids[:, 1:] == ids[:, :-1]
    if bool((same_id & (sorted_runs[:, 1:] != sorted_runs[:, :-1])).any()):
        return None
    return runs


def _segmented_scan(values: Tensor, continues: Tensor) -> Tensor:
    """Inclusive scan along dim 2 with resets: out_c = continues_c * out_{c-1} + values_c (Hillis & Steele's
    doubling form). values [batch, heads, chunks, ...], continues [batch, 1, chunks] (bool)."""
    flags = continues.to(values.dtype).view(*continues.shape, *([1] * (values.dim() - 3)))
    shift = 1
    while shift < values.shape[2]:
        values = torch.cat([values[:, :, :shift], values[:, :, shift:] + flags[:, :, shift:] * values[:, :, :-shift]],
                           dim=2)
        flags = torch.cat([flags[:, :, :shift], flags[:, :, shift:] * flags[:, :, :-shift]], dim=2)
        shift *= 2
    return values


def document_linear_attention(fq: Tensor, fk: Tensor, v: Tensor, runs: Tensor, chunk: int) -> Tensor:
    """Causal linear attention within documents, normalized. fq/fk: the features phi(q), phi(k) (padding keys
    already zeroed) [batch, heads, tokens, dim]; v [batch, heads, tokens, value_dim]; runs [batch, tokens] from
    ``document_runs``. Returns [batch, heads, tokens, value_dim] (zeros for a query that sees no key)."""
    length, value_dim = fq.shape[2], v.shape[-1]
    missing = -length % chunk

    def chunked(x: Tensor) -> Tensor:  # [batch, heads, tokens, d] -> [batch, heads, chunks, chunk, d], zeros after
        return F.pad(x, (0, 0, 0, missing)).unflatten(2, (-1, chunk))

    fq, fk = chunked(fq), chunked(fk)
    fv = chunked(F.pad(v, (0, 1), value=1.0))  # [batch, heads, chunks, chunk, value_dim + 1]
    # Padded positions get a run of their own (-1): their keys are zero and their outputs dropped.
    run = F.pad(runs, (0, missing), value=-1).view(runs.shape[0], 1, -1, chunk)  # [batch, 1, chunks, chunk]
    same = run.unsqueeze(-1) == run.unsqueeze(-2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    inside = ((fq @ fk.transpose(-2, -1)) * (same & causal).to(fq.dtype)) @ fv
    last = run[..., -1]  # [b, 1, C]: the document open at each chunk's end
    # Each chunk's keys of its last document, then the sums at the chunks' ends, restarting with each document.
    own = (fk * (run == last.unsqueeze(-1)).unsqueeze(-1).to(fk.dtype)).transpose(-2, -1) @ fv
    continues = F.pad(last[..., 1:] == last[..., :-1], (1, 0), value=False)
    ends = _segmented_scan(own, continues)
    earlier = F.pad(ends[:, :, :-1], (0, 0, 0, 0, 1, 0))  # the sum each chunk receives
    opened = F.pad(last[..., :-1], (1, 0), value=-2)  # the document open at each chunk's start (-2: none)
    reads = (run == opened.unsqueeze(-1)).unsqueeze(-1).to(fq.dtype)
    result = (inside + (fq * reads) @ earlier).flatten(2, 3)[:, :, :length]
    # Normalized by the sum of the weights; a query that sees no key (sum 0, numerator 0) gives zeros.
    denominator = result[..., value_dim:]
    return result[..., :value_dim] / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
