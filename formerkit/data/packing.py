"""Sequence packing: documents of different lengths laid into rows of one fixed length, with little padding.

A row holds several whole documents one after another. Each token carries the id of its document within the row and
its position within that document (0 at the document's first token), so a model given ``DocumentMask(document_ids)``
and those ``position_ids`` computes for every document exactly what it computes for that document alone in a row of its
own; ``formerkit.train.objectives`` also keeps the loss from predicting one document's first token from the one before.
Padding fills what is left at the end of a row: document id -1, position 0, token ``pad_id``.

A document longer than a row is cut into pieces of ``row_len`` tokens (the last one shorter), never truncated. Each
piece is a document of its own: positions restart at 0 (continuing them would run past the model's ``max_seq_len``, the
size of a learned position table) and its first token is context only (it is not predicted from the piece before).
``PackedRows.split_documents`` says how many documents were cut.

Placement is best-fit decreasing, a greedy bin packing: the pieces, longest first, each go into the row they leave the
least room in (a new row when none has room). It needs at most 11/9 of the fewest possible rows, plus one. Pieces of
equal length are taken in an order shuffled by ``seed``, so which documents share a row is the same for a given seed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from formerkit.data.base import ArraySplit, DataError

__all__ = ["PackedRows", "PackedSplit", "one_document_per_row", "pack_documents"]


@dataclass
class PackedRows:
    """Rows of ``row_len`` tokens and what every token belongs to.

    tokens [rows, row_len]: token ids (``pad_id`` at padding).
    document_ids [rows, row_len] int32: which piece of the row a token belongs to, numbered 0, 1, ... within each row
        in the order the pieces were placed; -1 for padding.
    position_ids [rows, row_len] int32: the token's position within its piece (0 at padding).
    pieces [pieces, 5] long: per piece, (document index, start within the document, row, column in the row, length).
    split_documents: how many documents were longer than a row and so were cut into several pieces.
    """

    tokens: Tensor
    document_ids: Tensor
    position_ids: Tensor
    pieces: Tensor
    split_documents: int

    @property
    def real_tokens(self) -> int:
        return int((self.document_ids >= 0).sum())

    @property
    def fill(self) -> float:
        """The fraction of the rows' slots that hold a document's token (1 - the padding fraction)."""
        return self.real_tokens / max(self.tokens.numel(), 1)


def _pieces(lengths: Sequence[int], row_len: int) -> tuple[list[tuple[int, int, int]], int]:
    """(document, start, length) of every piece, documents in order, and how many documents were cut."""
    if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 1:
        raise DataError(f"packing: row_len must be an integer >= 1, got {row_len!r}")
    pieces, cut = [], 0
    for document, length in enumerate(lengths):
        cut += length > row_len
        pieces += [(document, start, min(row_len, length - start)) for start in range(0, length, row_len)]
    return pieces, cut


def _layout(documents: Sequence[Tensor], rows: list[list[tuple[int, int, int]]], row_len: int, pad_id: int,
            cut: int) -> PackedRows:
    """Builds the row tensors from each row's pieces (document, start, length), with one gather over all tokens."""
    if not rows:
        raise DataError("packing: no tokens to pack (every document is empty)")
    lengths = [len(document) for document in documents]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    # Every document end to end, then one pad token: every slot of the rows is read from this stream.
    stream = torch.cat([*(document.reshape(-1).long() for document in documents), torch.tensor([pad_id])])
    # Segments in row-major order: the pieces of each row, then that row's padding (document -1).
    source, size, local, table = [], [], [], []
    for row, placed in enumerate(rows):
        column = 0
        for index, (document, start, length) in enumerate(placed):
            source.append(offsets[document] + start)
            size.append(length)
            local.append(index)
            table.append((document, start, row, column, length))
            column += length
        if column < row_len:
            source.append(offsets[-1])
            size.append(row_len - column)
            local.append(-1)
    size_t = torch.tensor(size)
    real = torch.tensor(local) >= 0
    begins = torch.cumsum(size_t, 0) - size_t
    within = torch.arange(len(rows) * row_len) - torch.repeat_interleave(begins, size_t)
    within = within * torch.repeat_interleave(real, size_t)  # padding reads the one pad token, position 0
    index = torch.repeat_interleave(torch.tensor(source), size_t) + within
    shape = (len(rows), row_len)
    return PackedRows(tokens=stream[index].view(shape),
                      document_ids=torch.repeat_interleave(torch.tensor(local, dtype=torch.int32), size_t).view(shape),
                      position_ids=within.to(torch.int32).view(shape),
                      pieces=torch.tensor(table, dtype=torch.long).view(-1, 5), split_documents=cut)


def pack_documents(documents: Sequence[Tensor], row_len: int, *, seed: int = 0, pad_id: int = 0) -> PackedRows:
    """Packs 1-D token tensors into rows of ``row_len`` tokens (see the module docstring for the rule)."""
    pieces, cut = _pieces([len(document) for document in documents], row_len)
    pieces = [pieces[i] for i in torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()]
    pieces.sort(key=lambda piece: -piece[2])  # stable: equal lengths keep the shuffled order
    rows: list[list[tuple[int, int, int]]] = []
    # Rows with room, by free slots: free_rows[f] holds the rows with exactly f slots free; sizes lists the f that
    # have any, sorted, so the tightest row with room for n is one bisect away.
    free_rows: dict[int, list[int]] = {}
    sizes: list[int] = []
    for piece in pieces:
        length = piece[2]
        where = bisect.bisect_left(sizes, length)
        if where < len(sizes):
            free = sizes[where]
            row = free_rows[free].pop()
            if not free_rows[free]:
                sizes.pop(where)
        else:
            free, row = row_len, len(rows)
            rows.append([])
        rows[row].append(piece)
        left = free - length
        if left:
            if not free_rows.get(left):
                free_rows[left] = []
                bisect.insort(sizes, left)
            free_rows[left].append(row)
    return _layout(documents, rows, row_len, pad_id, cut)


def one_document_per_row(documents: Sequence[Tensor], row_len: int, *, pad_id: int = 0) -> PackedRows:
    """The unpacked layout for comparison: every piece (the same pieces ``pack_documents`` makes) in a row of its own,
    right-padded, pieces in document order."""
    pieces, cut = _pieces([len(document) for document in documents], row_len)
    return _layout(documents, [[piece] for piece in pieces], row_len, pad_id, cut)


class PackedSplit(ArraySplit):
    """A split of packed rows: ``take`` gives {"tokens", "document_ids", "position_ids"}, each [batch, row_len]
    (int64), drawn like any ArraySplit (epochs of a seeded permutation of the rows)."""

    def __init__(self, rows: PackedRows):
        super().__init__({"tokens": rows.tokens, "document_ids": rows.document_ids,
                          "position_ids": rows.position_ids})
        self.rows = rows

    def take(self, indices: Tensor) -> dict[str, Tensor]:
        # Stored compactly (int32); the model and DocumentMask take int64 like every other id tensor.
        return {name: tensor[indices].long() for name, tensor in self.tensors.items()}
