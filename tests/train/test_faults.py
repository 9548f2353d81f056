"""Faults and bad input: resume after a kill, SIGTERM, non-finite losses, corrupted checkpoints, bad recipes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from formerkit import ConfigError, UnknownFieldError
from formerkit.data import DataError
from formerkit.train import RunError, TrainConfig, load_recipe, train
from formerkit.train.state import latest_checkpoint

from .conftest import gated_train, wait_until_held

LONG = {"schedule.steps": 120, "run.checkpoint_every": 3, "eval.every": 40}


def _cli(recipe: str, out: Path, overrides: dict, *, step: int, action: str) -> subprocess.Popen:
    """``formerkit train`` in a subprocess, held after optimizer step ``step`` (conftest's gated_train)."""
    command = [sys.executable, *gated_train(step, out.with_name(out.name + "-gate"), action),
               "train", recipe, "--out", str(out)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ,
                                                                                          "OMP_NUM_THREADS": "1"})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
def test_resume_after_kill_9_equals_the_uninterrupted_run_bitwise(tiny, tmp_path):
    overrides = tiny("cct-digits", **LONG, **{"run.threads": 1})
    reference = train("cct-digits", tmp_path / "reference", overrides=overrides)
    # Killed during step 8: after the checkpoint of step 6 and the train record of step 7, which resuming drops.
    process = _cli("cct-digits", tmp_path / "killed", overrides, step=8, action="hold")
    try:
        wait_until_held(tmp_path / "killed-gate", process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    found = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert found is not None and found[1]["step"] == 6
    resumed = train("cct-digits", tmp_path / "killed", overrides=overrides, resume=True)
    assert resumed.summary["status"] == "completed"
    assert _same_weights(reference.model, resumed.model)
    for key in ("test_loss", "test_accuracy", "steps"):
        assert resumed.summary[key] == reference.summary[key], key
    train_losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                                if r["kind"] == "train"]  # noqa: E731
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "reference")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_resume_finishes(tiny, tmp_path):
    overrides = tiny("cct-digits", **{**LONG, "run.threads": 1, "run.checkpoint_every": 50})
    # SIGTERM during step 5, between checkpoints: the run finishes the step, checkpoints it and stops.
    process = _cli("cct-digits", tmp_path / "run", overrides, step=5, action="sigterm")
    try:
        wait_until_held(tmp_path / "run-gate", process)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err.decode()[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    found = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert found is not None and found[1]["step"] == summary["steps"]
    assert 5 <= summary["steps"] < 120
    assert summary["steps"] == 5  # the step the signal came in
    resumed = train("cct-digits", tmp_path / "run", overrides=overrides, resume=True)
    assert resumed.summary["status"] == "completed" and resumed.summary["steps"] == 120


@pytest.mark.slow
def test_a_corrupted_or_half_written_checkpoint_is_skipped_for_the_last_good_one(tiny, tmp_path):
    overrides = tiny("cct-digits", **{"run.checkpoint_every": 2, "run.keep_checkpoints": 3})
    train("cct-digits", tmp_path / "run", overrides=overrides)
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = sorted(checkpoints.glob("step-*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    (checkpoints / ".tmp-step-00000099-1").mkdir()  # a save killed half-way
    found = latest_checkpoint(checkpoints)
    assert found is not None and found[0] != newest and found[0].name < newest.name


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    overrides = tiny("cct-digits", **{"optim.lr": 1e6, "optim.grad_clip": None, "run.checkpoint_every": 1,
                                      "schedule.steps": 20})
    with pytest.raises(RunError, match=r"loss became (nan|inf) at step \d+.*last good checkpoint is .*step-") as raised:
        train("cct-digits", tmp_path / "run", overrides=overrides)
    failed = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
    found = latest_checkpoint(tmp_path / "run" / "checkpoints")
    # A checkpoint every step: the last good one is the step before, and the message names it.
    assert found is not None and found[1]["step"] == failed - 1 and str(found[0]) in str(raised.value)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(found[0] / "model.safetensors")).values())


@pytest.mark.slow
def test_a_run_directory_holding_another_run_is_refused_without_resume(tiny, tmp_path):
    train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits"))
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits"))
    with pytest.raises(RunError, match="the recipe differs"):
        train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits", **{"optim.lr": 0.5}), resume=True)
    with pytest.raises(RunError, match="holds no run to resume"):
        train("cct-digits", tmp_path / "empty", overrides=tiny("cct-digits"), resume=True)


@pytest.mark.slow
def test_resuming_a_completed_run_returns_it_without_training(tiny, tmp_path):
    first = train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits"))
    again = train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits"), resume=True)
    assert again.summary == first.summary


def test_recipe_files_with_unknown_keys_or_wrong_types_are_refused_naming_the_key(tmp_path):
    good = load_recipe("cct-digits").to_dict()
    typo = dict(good, optim={**good["optim"], "learning_rate": 0.1})
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(typo))
    with pytest.raises(UnknownFieldError, match=r"optim.learning_rate"):
        TrainConfig.from_file(path)
    wrong = dict(good, schedule={**good["schedule"], "steps": "many"})
    path.write_text(yaml.safe_dump(wrong))
    with pytest.raises(ConfigError, match=r"schedule.steps: expected an integer, got 'many'"):
        TrainConfig.from_file(path)
    path.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="a valid YAML document"):
        TrainConfig.from_file(path)
    with pytest.raises(ConfigError, match="did you mean 'cct-digits'"):
        load_recipe("cct-digit")
    with pytest.raises(ConfigError, match="data.path"):
        TrainConfig.from_dict({"data": {"source": "text"}})


def test_model_overrides_are_checked_before_training(tiny, tmp_path):
    with pytest.raises(ConfigError, match="num_heads"):
        train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits", **{"model.num_heads": 5}))
    with pytest.raises(ConfigError, match="objective.kind"):
        train("cct-digits", tmp_path / "run2", overrides=tiny("cct-digits", **{"objective.kind": "causal_lm"}))


def test_a_missing_data_path_is_refused_before_training(tiny, tmp_path):
    overrides = tiny("char-lm", **{"data.source": "text", "data.path": str(tmp_path / "nowhere.txt"),
                                   "data.max_bytes": None})
    with pytest.raises(DataError, match="nowhere.txt"):
        train("char-lm", tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run" / "checkpoints").exists()
