"""Sequence packing: every token placed once, documents kept apart by their ids and positions, long documents cut
(never truncated), and the same rows for the same seed."""

from __future__ import annotations

import json

import pytest
import torch

from formerkit.data import DataError, build_data
from formerkit.data.packing import PackedSplit, one_document_per_row, pack_documents
from formerkit.errors import ConfigError
from formerkit.train.config import DataConfig, TrainConfig


def random_documents(count: int, longest: int, seed: int = 0, vocab: int = 50) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
    return [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]


def documents_from_rows(rows, count: int) -> list[torch.Tensor]:
    """Each document read back from the rows through the piece table, its pieces in order."""
    parts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(count)]
    for document, start, row, column, length in rows.pieces.tolist():
        parts[document].append((start, rows.tokens[row, column:column + length]))
    return [torch.cat([tokens for _, tokens in sorted(pieces, key=lambda p: p[0])]) if pieces
            else torch.zeros(0, dtype=torch.long) for pieces in parts]


def test_every_token_is_placed_exactly_once_and_documents_read_back_whole():
    documents = random_documents(60, longest=25)
    rows = pack_documents(documents, 16, seed=3)
    assert rows.real_tokens == sum(len(d) for d in documents)
    # No slot holds two pieces, and the slots the pieces cover are exactly the non-padding ones.
    covered = torch.zeros(rows.tokens.shape, dtype=torch.int32)
    for _, _, row, column, length in rows.pieces.tolist():
        covered[row, column:column + length] += 1
    assert covered.max() == 1
    assert torch.equal(covered.bool(), rows.document_ids >= 0)
    for original, read in zip(documents, documents_from_rows(rows, len(documents))):
        assert torch.equal(original, read)


def test_each_piece_has_its_own_id_and_positions_from_zero_and_padding_only_ends_a_row():
    documents = random_documents(40, longest=12, seed=1)
    rows = pack_documents(documents, 16, seed=0, pad_id=0)
    for row in range(len(rows.tokens)):
        ids, positions = rows.document_ids[row].tolist(), rows.position_ids[row].tolist()
        real = [i for i in ids if i >= 0]
        assert ids == real + [-1] * (len(ids) - len(real))  # padding only at the end of the row
        assert real == sorted(real) and sorted(set(real)) == list(range(len(set(real))))  # 0, 1, 2, ... in order
        for column, (piece, position) in enumerate(zip(ids, positions)):
            if piece < 0:
                assert position == 0 and rows.tokens[row, column] == 0
            elif column == 0 or ids[column - 1] != piece:
                assert position == 0
            else:
                assert position == positions[column - 1] + 1


def test_documents_longer_than_a_row_are_cut_into_pieces_not_truncated():
    row_len = 8
    long_document = torch.arange(1, 2 * row_len + 4)  # 19 tokens: pieces of 8, 8 and 3
    documents = [torch.tensor([5, 6, 7]), long_document, torch.tensor([9, 9])]
    rows = pack_documents(documents, row_len, seed=0)
    assert rows.split_documents == 1
    pieces = sorted((start, length) for document, start, _, _, length in rows.pieces.tolist() if document == 1)
    assert pieces == [(0, 8), (8, 8), (16, 3)]
    assert torch.equal(documents_from_rows(rows, 3)[1], long_document)
    # Each piece is a document of its own: its positions restart at 0.
    for _, _, row, column, length in rows.pieces.tolist():
        assert rows.position_ids[row, column:column + length].tolist() == list(range(length))
    unpacked = one_document_per_row(documents, row_len)  # the same five pieces, one per row
    assert len(unpacked.tokens) == 5 and unpacked.split_documents == 1


def test_best_fit_decreasing_fills_rows_that_can_be_filled():
    lengths = [6, 4, 7, 3, 5, 5, 2, 8]  # 40 tokens that fit exactly into 4 rows of 10
    documents = [torch.full((n,), i + 1) for i, n in enumerate(lengths)]
    rows = pack_documents(documents, 10, seed=0)
    assert rows.tokens.shape == (4, 10) and rows.fill == 1.0
    unpacked = one_document_per_row(documents, 10)
    assert unpacked.tokens.shape == (8, 10) and unpacked.fill == pytest.approx(40 / 80)


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_rows():
    documents = random_documents(80, longest=6, seed=2)  # many equal lengths: the seed decides who shares a row
    first, again = pack_documents(documents, 16, seed=0), pack_documents(documents, 16, seed=0)
    other = pack_documents(documents, 16, seed=1)
    for name in ("tokens", "document_ids", "position_ids", "pieces"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.pieces, other.pieces)
    assert len(other.tokens) == len(first.tokens)  # the seed breaks ties only: as many rows either way


def test_packing_rejects_a_bad_row_length_and_an_empty_corpus():
    with pytest.raises(DataError, match="row_len must be an integer >= 1, got 0"):
        pack_documents([torch.tensor([1, 2])], 0)
    with pytest.raises(DataError, match="no tokens to pack"):
        pack_documents([torch.zeros(0, dtype=torch.long)], 4)


def test_packed_split_draws_rows_as_int64_batches():
    rows = pack_documents(random_documents(30, longest=10), 12, seed=0)
    split = PackedSplit(rows)
    batch = split.take(split.sample_indices(4, seed=0, step=0))
    assert set(batch) == {"tokens", "document_ids", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (4, 12) for t in batch.values())
    assert sum(len(b["tokens"]) for b in split.eval_batches(5)) == len(rows.tokens)


# ----- data.pack on the text sources -----


def test_jsonl_with_pack_packs_each_record_as_a_document(tmp_path):
    texts = [f"record {i}: " + "x" * (3 * i) for i in range(24)]  # 10 to 79 bytes
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bundle = build_data(DataConfig(source="jsonl", path=str(path), seq_len=31, valid_fraction=0.25, pack=True))
    assert isinstance(bundle.train, PackedSplit) and isinstance(bundle.valid, PackedSplit)
    assert bundle.preprocessing["packed"] is True and bundle.model_fields["max_seq_len"] == 31
    train_texts = [t.encode() for i, t in enumerate(texts) if i % 4 != 3]
    rows = bundle.train.rows
    assert rows.tokens.shape[1] == 32
    # The records longer than a row (32 bytes) are cut, which the description says.
    longer = sum(len(t) > 32 for t in train_texts)
    assert rows.split_documents == longer > 0 and f"{longer} documents longer than a row" in bundle.description
    assert [bytes(d.tolist()) for d in documents_from_rows(rows, len(train_texts))] == train_texts


def test_text_folder_with_pack_keeps_files_apart(tmp_path):
    for name, text in {"a.txt": "first file\n", "b.md": "second file, a little longer\n", "c.py": "x = 3\n"}.items():
        (tmp_path / name).write_text(text)
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=15, valid_fraction=0.0, pack=True))
    rows = bundle.train.rows
    read = [bytes(d.tolist()) for d in documents_from_rows(rows, 3)]
    assert read == [b"first file\n", b"second file, a little longer\n", b"x = 3\n"]


def test_pack_is_validated_like_the_other_data_keys():
    with pytest.raises(ConfigError, match=r"data\.pack: expected its default \(False\) with data.source='digits'"):
        DataConfig(source="digits", pack=True)
    with pytest.raises(ConfigError, match=r"data\.pack: expected true or false, got 'yes'"):
        DataConfig(pack="yes")
    with pytest.raises(ConfigError, match=r"data\.pack: expected false with objective.kind 'seq2seq'"):
        TrainConfig.from_dict({"data": {"source": "stdlib", "pack": True}, "objective": {"kind": "seq2seq"}})
