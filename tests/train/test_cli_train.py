"""The training commands of the CLI: recipes, train, eval, generate."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit
from formerkit.cli import main


def _set(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def test_recipes_lists_every_shipped_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("char-lm", "cct-digits", "vit-digits", "mae-digits", "seq2seq-reverse"):
        assert name[:10] in out


@pytest.mark.slow
def test_train_then_eval_reproduces_the_final_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "cct-digits", "--out", str(out), *_set(tiny("cct-digits"))]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert abs(metrics["test_loss"] - summary["test_loss"]) < 1e-6
    assert main(["eval", str(out / "model"), "--split", "test"]) == 0


def _naive_greedy_text(model_dir, prompt: str, new_tokens: int) -> str:
    """Greedy continuation by recomputing every step without a cache; past the context, from the last half context
    (the rule ``formerkit generate`` documents)."""
    from formerkit.data import load_tokenizer

    model = formerkit.load(model_dir).eval()
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    context = model.config.max_seq_len
    ids = tokenizer.encode(prompt)
    start, window = len(ids), ids[-context:]
    with torch.no_grad():
        for _ in range(new_tokens):
            if len(window) > context:
                window = window[-(context // 2):]  # the last half context (newest token included), re-encoded
            token = int(model(torch.tensor([window]))[0, -1].argmax())
            ids.append(token)
            window = window + [token]
    return tokenizer.decode(ids[start:])


@pytest.mark.slow
def test_generate_streams_the_greedy_continuation_of_a_language_model_run(tiny, tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["train", "char-lm", "--out", str(out), *_set(tiny("char-lm"))]) == 0
    capsys.readouterr()
    context = formerkit.load(out / "model").config.max_seq_len
    # Longer than the context, so generation continues past it.
    count = context + 20
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", str(count), "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed == _naive_greedy_text(out / "model", "def ", count) + "\n"
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", str(count), "--temperature", "0",
                 "--compile"]) == 0
    assert capsys.readouterr().out == printed
    assert main(["sample", str(out / "model"), "--prompt", "x", "--max-new-tokens", "5", "--top-k", "3"]) == 0
    assert main(["generate", str(out), "--prompt", "x", "--stop", "ab"]) == 2
    assert "one" in capsys.readouterr().err


def test_train_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["train", "cct-digit", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'cct-digits'" in capsys.readouterr().err
    assert main(["train", "cct-digits", "--out", str(tmp_path / "r"), "--set", "optim.lrate=1"]) == 2
    assert "optim.lrate" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert main(["sample", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
