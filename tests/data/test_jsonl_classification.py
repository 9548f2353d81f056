"""Text classification from a JSON-lines file (data.label_field): the bundle's token ids, masks, labels, classes and
splits; padding that changes no prediction; the error messages; and (slow) a run trained, evaluated and asked to
predict, against the model's own softmax on texts tokenized by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit import ModelConfig, build_model
from formerkit.cli import main
from formerkit.data import DataError, build_data
from formerkit.data.text import encode_padded
from formerkit.data.tokenizers import ByteTokenizer
from formerkit.errors import ConfigError, InputError
from formerkit.train import load_recipe
from formerkit.train.config import DataConfig, TrainConfig
from formerkit.train.objectives import make_objective

TEXTS = ["no", "yes", "maybe not", "sure", "nah", "yep", "never", "ok", "nope", "yes!"]


def write_records(path, labels, texts=TEXTS, field="label", extra_lines=()) -> None:
    lines = [json.dumps({"id": i, "text": text, field: label}) for i, (text, label) in enumerate(zip(texts, labels))]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")


def config_for(path, **fields) -> DataConfig:
    return DataConfig(**{"source": "jsonl", "path": str(path), "label_field": "label", "seq_len": 4,
                         "valid_fraction": 0.2, **fields})


def padded(text: str, seq_len: int) -> tuple[list[int], list[bool]]:
    """A text's byte ids cut to seq_len and padded with 0, and its mask, written out by hand."""
    data = list(text.encode("utf-8"))[:seq_len]
    return data + [0] * (seq_len - len(data)), [True] * len(data) + [False] * (seq_len - len(data))


def test_the_bundle_holds_padded_byte_ids_masks_sorted_classes_and_a_stratified_test_split(tmp_path):
    path = tmp_path / "data.jsonl"
    write_records(path, ["neg", "pos"] * 5)
    bundle = build_data(config_for(path))
    # neg: lines 0 2 4 6 8, pos: 1 3 5 7 9; round(0.2 * 5) = 1 of each held out, the middle one (position 2).
    train_rows, test_rows = [0, 1, 2, 3, 6, 7, 8, 9], [4, 5]
    assert bundle.valid is None and (len(bundle.train), len(bundle.test)) == (8, 2)
    for split, rows in ((bundle.train, train_rows), (bundle.test, test_rows)):
        expected = [padded(TEXTS[row], 4) for row in rows]
        assert split.tensors["inputs"].tolist() == [ids for ids, _ in expected]
        assert split.tensors["attention_mask"].tolist() == [mask for _, mask in expected]
        assert split.tensors["labels"].tolist() == [row % 2 for row in rows]
    assert bundle.train.tensors["inputs"][2].tolist() == [109, 97, 121, 98]  # "maybe not" cut to "mayb"
    assert bundle.model_fields == {"vocab_size": 256, "max_seq_len": 4, "num_classes": 2}
    assert bundle.preprocessing == {"kind": "text", "tokenizer": {"kind": "byte", "vocab_size": 256}, "seq_len": 4,
                                    "classes": ["neg", "pos"]}
    assert isinstance(bundle.tokenizer, ByteTokenizer)
    assert bundle.description == (f"jsonl {path}: 8 training and 2 test texts, 2 classes (neg, pos); 5 texts fill "
                                  f"data.seq_len=4 tokens (longer ones are cut)")


def test_integer_labels_are_classes_in_numeric_order(tmp_path):
    path = tmp_path / "data.jsonl"
    write_records(path, [10, 2, 2, 10, 7, 2, 10, 7, 7, 10])
    bundle = build_data(config_for(path))
    assert bundle.preprocessing["classes"] == ["2", "7", "10"]
    labels = torch.cat([bundle.train.tensors["labels"], bundle.test.tensors["labels"]])
    assert sorted(labels.tolist()) == sorted([2, 0, 0, 2, 1, 0, 2, 1, 1, 2])
    # 10: lines 0 3 6 9 -> the one at position int(0.5 * 4) = 2 (line 6); 2: lines 1 2 5 -> position 1 (line 2);
    # 7: lines 4 7 8 -> position 1 (line 7).
    assert bundle.test.tensors["inputs"].tolist() == [padded(TEXTS[row], 4)[0] for row in (2, 6, 7)]


def test_a_text_padded_to_a_longer_seq_len_gives_the_same_logits(randomize):
    config = ModelConfig.from_dict({
        "arch": "encoder", "width": 32, "num_layers": 2, "attention": {"num_heads": 2},
        "position": {"kind": "learned"}, "stem": {"kind": "tokens", "vocab_size": 256},
        "head": {"kind": "classification", "num_classes": 3, "pooling": "mean"}, "max_seq_len": 64})
    model = randomize(build_model(config), 0).eval()
    texts = ["short", "a longer text of twenty"]
    with torch.no_grad():
        ids, mask = encode_padded(ByteTokenizer(), texts, 24)
        wide_ids, wide_mask = encode_padded(ByteTokenizer(), texts, 64)
        logits = model(ids, attention_mask=mask)
        wide = model(wide_ids, attention_mask=wide_mask)
        alone = torch.cat([model(torch.tensor([list(text.encode())])) for text in texts])
        unmasked = model(wide_ids)
    torch.testing.assert_close(wide, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)  # the same as the text alone, unpadded
    assert (unmasked - alone).abs().max() > 1e-2  # without the mask, padding would change the answer


def test_the_classification_objective_passes_the_attention_mask(tmp_path, randomize):
    path = tmp_path / "data.jsonl"
    write_records(path, ["neg", "pos"] * 5)
    recipe = load_recipe("jsonl-classify").with_overrides({
        "data.path": str(path), "data.seq_len": 8, "model.config.width": 32, "model.config.num_layers": 1,
        "model.config.attention.num_heads": 2})
    bundle = build_data(recipe.data)
    model = randomize(build_model(recipe.model.resolve(bundle.model_fields)), 1).eval()
    objective = make_objective(recipe.objective, bundle)
    split = bundle.train.tensors
    with torch.no_grad():
        metrics = objective.evaluate(model, bundle.train.eval_batches(3))
        logits = torch.cat([model(torch.tensor([list(TEXTS[row].encode())[:8]]))
                            for row in (0, 1, 2, 3, 6, 7, 8, 9)])  # each text alone, unpadded
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, split["labels"]).item(), rel=1e-5)
    assert metrics["accuracy"] == (logits.argmax(-1) == split["labels"]).float().mean().item()


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "fine"}', r"data\.jsonl, line 11: no field 'label' \(data\.label_field\); the object has \['text'\]"),
    ('{"label": "neg"}', r"data\.jsonl, line 11: no field 'text' \(data\.text_field\)"),
    ('{"text": "fine", "label": 1.5}', r"data\.jsonl, line 11: field 'label' \(data\.label_field\) holds float, "
                                       r"expected a string or an integer \(the class\)"),
    ('{"text": "fine", "label": true}', r"line 11: field 'label' \(data\.label_field\) holds bool"),
    ('{"text": "fine", "label": 3}', r"line 11: field 'label' \(data\.label_field\) holds 3, but earlier lines "
                                     r"hold strs; use one type"),
    ('{"text": "  ", "label": "neg"}', r"line 11: field 'text' \(data\.text_field\) is blank"),
])
def test_a_bad_line_names_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    write_records(path, ["neg", "pos"] * 5, extra_lines=[line])
    with pytest.raises(DataError, match=message):
        build_data(config_for(path))


def test_one_class_or_too_few_records_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    write_records(path, ["neg"] * 10)
    with pytest.raises(DataError, match=r"every record has the class 'neg' \(data\.label_field 'label'\); a "
                                        r"classifier needs at least two classes"):
        build_data(config_for(path))
    write_records(path, ["neg", "pos"], texts=["a", "b"])
    with pytest.raises(DataError, match=r"too few records for a test split \(every class has one record\)"):
        build_data(config_for(path))


def test_label_field_and_classification_go_together_and_the_keys_are_named():
    with pytest.raises(ConfigError, match=r"^data\.label_field: expected null with objective\.kind 'causal_lm', "
                                          r"got 'label' \(a label field trains a text classifier: set "
                                          r"objective\.kind: classification\)$"):
        load_recipe("jsonl-lm").with_overrides({"data.label_field": "label"})
    with pytest.raises(ConfigError, match=r"^data\.label_field: expected the field holding each line's class for "
                                          r"objective\.kind classification on data\.source 'jsonl', got None"):
        load_recipe("jsonl-classify").with_overrides({"data.label_field": None})
    with pytest.raises(ConfigError, match=r"data\.label_field.*data\.source='image_folder'"):
        TrainConfig.from_dict({**load_recipe("image-folder").to_dict(),
                               "data": {**load_recipe("image-folder").data.to_dict(), "label_field": "label"}})


@pytest.mark.slow
def test_a_text_classifier_trains_evaluates_and_predicts_its_own_softmax(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    path = tmp_path / "reviews.jsonl"
    words = {"good": "great lovely fine superb", "bad": "awful dull poor bleak", "meh": "okay plain so-so fair"}
    lines = [json.dumps({"review": f"the {word} film number {i}", "stars": label})
             for i in range(8) for label, choices in words.items() for word in [choices.split()[i % 4]]]
    path.write_text("\n".join(lines) + "\n")
    assert main(["recipes", "jsonl-classify"]) == 0
    copy = tmp_path / "my.yaml"
    copy.write_text(capsys.readouterr().out)
    out = tmp_path / "run"
    overrides = {**tiny("jsonl-classify"), "data.path": str(path), "data.text_field": "review",
                 "data.label_field": "stars"}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert main(["train", str(copy), "--out", str(out), *sets]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"jsonl {path}: 18 training and 6 test texts, 3 classes (bad, good, meh)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert main(["eval", str(out), "--json", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-6)
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    model = formerkit.load(out / "model").eval()
    assert formerkit.load_extra(out / "model")["preprocessing"]["classes"] == ["bad", "good", "meh"]
    assert (model.config.head.num_classes, model.config.stem.vocab_size, model.config.max_seq_len) == (3, 256, 32)

    texts = ["the superb film", "a dull and bleak film that goes on and on past the thirty-two byte context"]
    ids, mask = zip(*(padded(text, 32) for text in texts))
    with torch.no_grad():
        expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).softmax(-1)
    assert main(["predict", str(out), *texts, "--json", str(tmp_path / "answers.json")]) == 0
    table = capsys.readouterr().out
    answers = json.loads((tmp_path / "answers.json").read_text())
    predictor = formerkit.load_run(out)
    assert predictor.task == "classify_text"
    assert predictor(texts) == answers and predictor(texts[0]) == answers[0]
    classes = ["bad", "good", "meh"]
    for text, answer, row in zip(texts, answers, expected):
        assert answer["input"] == text and answer["label"] == classes[int(row.argmax())]
        assert list(answer["probabilities"]) == classes
        assert [answer["probabilities"][name] for name in classes] == pytest.approx(row.tolist(), abs=1e-6)
        assert math.isclose(sum(answer["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert f"{text}  " in table and answer["label"] in table
    with pytest.raises(InputError, match=r"text: expected a non-blank text, got ''"):
        predictor("")
    assert main(["predict", str(out), "good", "--seed", "1"]) == 2
    assert "--seed: options of language models; this run classifies texts" in capsys.readouterr().err
