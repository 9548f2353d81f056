"""Tiny trained runs for the compression tools' tests (trained once per test session)."""

from __future__ import annotations

import pytest

TINY_CLASSIFIER = {"run.progress": False, "run.log_every": 1, "schedule.warmup_steps": 1, "schedule.steps": 6,
                   "schedule.batch_size": 16, "eval.every": 3, "model.num_layers": 2, "model.width": 32,
                   "model.num_heads": 2, "model.conv_layers": 1}


@pytest.fixture(scope="session")
def tiny_classifier_run(tmp_path_factory):
    """A cct-digits run shrunk to 2 layers of width 32 and 6 steps: its directory."""
    from formerkit.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "cct"
    train("cct-digits", out, overrides=TINY_CLASSIFIER)
    return out
