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


def test_kfold_splits_hold_every_example_out_exactly_once_with_each_class_spread_evenly():
    kfold_splits = script("adapt_transfer.py")["kfold_splits"]
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 13)
    masks = kfold_splits(labels, 5)
    assert len(masks) == 5
    assert torch.equal(torch.stack(masks).sum(0), torch.ones(len(labels), dtype=torch.long))
    for mask in masks:  # 10 -> 2 each; 7 -> 1 or 2; 13 -> 2 or 3
        counts = torch.bincount(labels[mask], minlength=3).tolist()
        assert counts[0] == 2 and counts[1] in (1, 2) and counts[2] in (2, 3)
    assert all(torch.equal(a, b) for a, b in zip(masks, kfold_splits(labels, 5)))
    assert not all(torch.equal(a, b) for a, b in zip(masks, kfold_splits(labels, 5, seed=1)))


def test_best_of_takes_the_lowest_mean_held_out_loss_and_keeps_only_the_settings():
    best_of = script("adapt_transfer.py")["best_of"]
    records = [{"method": "lora", "lr": 5e-3, "cv_loss": 0.3, "cv_accuracy": 0.99, "folds": 5, "steps": 9},
               {"method": "lora", "lr": 1e-2, "cv_loss": 0.2, "cv_accuracy": 0.98, "folds": 5, "steps": 9}]
    assert best_of(records) == {"lr": 1e-2}
    records.append({"method": "adapter", "lr": 2e-2, "scale": 1.0, "cv_loss": 0.1, "cv_accuracy": 0.9,
                    "folds": 5, "steps": 9})
    assert best_of(records[2:]) == {"lr": 2e-2, "scale": 1.0}


def test_the_selection_topics_are_a_fifth_of_the_training_topics_and_never_the_held_out_ones():
    language = script("adapt_language.py")
    train_docs, valid_docs = language["topic_documents"]()
    fit_docs, score_docs = language["selection_split"](train_docs)
    assert sorted(fit_docs + score_docs) == sorted(train_docs)
    assert score_docs == train_docs[4::5]  # every 5th, as the held-out topics are taken from all of them
    assert not set(score_docs) & set(valid_docs) and not set(fit_docs) & set(valid_docs)


def test_the_record_logger_appends_each_record_as_it_comes(tmp_path, capsys):
    from formerkit.bench.common import record_logger
    from formerkit.data.files import jsonl_records

    path = tmp_path / "records.jsonl"
    log = record_logger("cv", str(path))
    records = [{"method": "lora", "lr": 0.01}, {"method": "full", "lr": 0.002}]
    for count, record in enumerate(records, start=1):
        log(record)
        assert [r for _, r in jsonl_records(path)] == records[:count]
    assert capsys.readouterr().err.splitlines() == [f"  cv {r}" for r in records]
    record_logger("select", None)(records[0])  # no file: printed only
    assert capsys.readouterr().err == f"  select {records[0]}\n"
