"""Shrunken recipes for training tests: the shipped recipes with tiny models and a few steps."""

from __future__ import annotations

import pytest

QUIET = {"run.progress": False, "run.log_every": 1, "schedule.warmup_steps": 1}

TINY = {
    "cct-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2, "model.conv_layers": 1},
    "vit-digits": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2},
    "mae-digits": {"schedule.steps": 4, "schedule.batch_size": 16, "eval.every": 2, "model.num_layers": 1,
                   "model.width": 32, "model.num_heads": 2, "objective.decoder_width": 32,
                   "objective.decoder_layers": 1,
                   "then": {"objective": {"kind": "classification"},
                            "schedule": {"steps": 4, "batch_size": 16, "warmup_steps": 1}}},
    "seq2seq-reverse": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "data.num_examples": 64,
                        "data.seq_len": 6, "model.config.width": 32, "model.config.max_seq_len": 7},
    "mlm-stdlib": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.max_bytes": 120_000,
                   "data.seq_len": 32, "model.config.width": 32, "model.config.num_layers": 1,
                   "model.config.max_seq_len": 32, "eval.batches": 2},
    "timeseries-forecast": {"schedule.steps": 6, "schedule.batch_size": 16, "eval.every": 3, "data.window": 32,
                            "data.horizon": 8, "model.config.width": 32, "model.config.num_layers": 1,
                            "model.config.max_seq_len": 32},
    "char-lm-long": {"schedule.steps": 4, "schedule.batch_size": 2, "eval.every": 2, "data.max_bytes": 120_000,
                     "data.seq_len": 160, "model.width": 32, "model.num_heads": 2, "model.max_seq_len": 160,
                     "model.attention.sliding_window": 8, "eval.batches": 2, "eval.batch_size": 2},
    "char-lm": {"schedule.steps": 6, "schedule.batch_size": 4, "eval.every": 3, "data.max_bytes": 120_000,
                "data.seq_len": 32, "model.num_layers": 1, "model.width": 32, "model.num_heads": 2,
                "eval.batches": 2},
}


@pytest.fixture
def tiny():
    """tiny(recipe) -> the overrides that shrink a shipped recipe for a test."""

    def make(recipe: str, **extra) -> dict:
        return {**QUIET, **TINY[recipe], **extra}

    return make
