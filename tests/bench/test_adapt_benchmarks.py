"""The data the adapter benchmarks (benchmarks/adapt_transfer.py, benchmarks/adapt_language.py) build: the class
filter of the transfer split, the byte rows of the new text, and the corpus rule that keeps that text out of the
base's training data. Their measurements are never asserted."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def script(name: str) -> dict:
    return runpy.run_path(str(BENCHMARKS / name))


def test_class_subset_keeps_the_chosen_classes_in_order_and_renumbers_them_as_listed():
    class_subset = script("adapt_transfer.py")["class_subset"]
    labels = torch.tensor([5, 0, 9, 7, 5, 3, 9])
    inputs = torch.arange(7).float().unsqueeze(1)
    kept_inputs, kept_labels = class_subset(inputs, labels, (9, 5, 7))
    assert kept_inputs.flatten().tolist() == [0, 2, 3, 4, 6]
    assert kept_labels.tolist() == [1, 0, 2, 1, 0]


def test_held_out_split_takes_a_fifth_of_every_class_disjoint_from_the_rest_and_the_same_each_time():
    held_out_split = script("adapt_transfer.py")["held_out_split"]
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 20)
    inputs = torch.arange(len(labels)).float().unsqueeze(1)
    (train_x, train_y), (held_x, held_y) = held_out_split(inputs, labels)
    assert torch.bincount(held_y).tolist() == [2, 1, 4] and torch.bincount(train_y).tolist() == [8, 4, 16]
    assert sorted(train_x.flatten().tolist() + held_x.flatten().tolist()) == inputs.flatten().tolist()
    assert torch.equal(labels[held_x.flatten().long()], held_y)
    assert torch.equal(held_out_split(inputs, labels)[1][0], held_x)


def test_text_rows_overlap_by_one_so_each_byte_after_the_first_is_predicted_once():
    rows_of = script("adapt_language.py")["rows_of"]
    rows = rows_of([b"abcdef", b"ghij"], 4)  # stream "abcdef\n\nghij": 12 bytes, 11 predictions, 3 rows of 3
    assert [bytes(row.tolist()) for row in rows] == [b"abcd", b"def\n", b"\n\ngh"]
    predicted = torch.cat([row[1:] for row in rows])
    assert bytes(predicted.tolist()) == b"bcdef\n\ngh"


def test_the_base_corpus_stops_before_the_adaptation_text_and_the_whole_stdlib_would_include_it():
    language = script("adapt_language.py")
    held_out = language["HELD_OUT_TEXT"]
    cut = language["corpus_files"](language["BASE_MAX_BYTES"])
    whole = language["corpus_files"](None)
    assert not any(path.as_posix().endswith(held_out) for path in cut)
    assert any(path.as_posix().endswith(held_out) for path in whole)
    assert cut == whole[:len(cut)]
