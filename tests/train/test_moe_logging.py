"""Mixture-of-experts models log their experts' load with every training record; dense models' records are unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from formerkit.data import build_data
from formerkit.train import load_recipe, train
from formerkit.train.objectives import ExpertUsage, make_objective

from ..conftest import tiny_overrides

pytestmark = pytest.mark.slow  # every test trains a run

# conftest's tiny char-lm, 2 layers, 2 micro-batches a step; lr 1e-12 leaves the weights as initialized, so the
# passes can be redone by hand.
BASE = tiny_overrides("char-lm", **{"run.log_every": 2, "schedule.warmup_steps": 0, "schedule.steps": 4,
                                    "schedule.grad_accum": 2, "eval.every": 4, "eval.batches": 1,
                                    "data.max_bytes": 60_000, "model.num_layers": 2, "optim.lr": 1e-12})
MOE = {"model.num_experts": 4, "model.experts_per_token": 2, "model.aux_loss_weight": 0.1}
FIELDS = {"moe_load_max", "moe_load_entropy", "moe_aux_loss"}


def records_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_records_carry_the_expert_load_of_the_steps_since_the_last_record(tmp_path):
    result = train("char-lm", tmp_path / "run", overrides={**BASE, **MOE})
    logged = [r for r in records_of(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [2, 4]
    # By hand: the same forward passes (each step's micro-batches) through an ExpertUsage, one per log window.
    config = load_recipe("char-lm").with_overrides({**BASE, **MOE})
    bundle = build_data(config.data)
    objective = make_objective(config.objective, bundle)
    model = result.model.train()
    schedule = config.schedule
    with torch.no_grad():
        for record, steps in zip(logged, ([0, 1], [2, 3])):
            usage, aux_losses = ExpertUsage(), []
            for step in steps:
                batch = bundle.train.take(bundle.train.sample_indices(schedule.batch_size, config.run.seed, step))
                for rows in torch.arange(schedule.batch_size).view(schedule.grad_accum, -1):
                    _, aux_loss = objective.run(model, batch["tokens"][rows, :-1], usage=usage)
                    aux_losses.append(aux_loss.item())
            expected = usage.metrics()
            assert FIELDS <= set(record)
            assert record["moe_load_max"] == pytest.approx(expected["moe_load_max"], rel=1e-6)
            assert record["moe_load_entropy"] == pytest.approx(expected["moe_load_entropy"], rel=1e-6)
            # The mean of the passes' auxiliary losses: with equal passes per step, the mean of the steps' too.
            assert record["moe_aux_loss"] == pytest.approx(sum(aux_losses) / len(aux_losses), rel=1e-5)
            assert 1.0 <= record["moe_load_max"] <= 4 / 2
            assert 0.0 <= record["moe_load_entropy"] <= 1.0


def test_a_dense_model_logs_no_expert_fields(tmp_path):
    train("char-lm", tmp_path / "run", overrides=BASE)
    records = records_of(tmp_path / "run")
    assert records and not any(key.startswith(("moe_", "valid_moe_")) for r in records for key in r)


def test_the_progress_bar_shows_the_expert_load(tmp_path, console):
    result = train("char-lm", tmp_path / "run", overrides={**BASE, **MOE, "run.progress": True}, console=console)
    assert result.summary["status"] == "completed"
    assert "expert load" in console.file.getvalue()
