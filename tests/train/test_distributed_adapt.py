"""An adapted recipe (adapt:) under torchrun: DDP and FSDP train the same LoRA as one process."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit
from formerkit.train import train

from .test_distributed import _run, _torchrun

pytestmark = pytest.mark.slow

ADAPTED = {"run.progress": False, "run.log_every": 1, "schedule.warmup_steps": 1, "schedule.steps": 4,
           "schedule.batch_size": 16, "eval.every": 4, "model.num_layers": 1, "model.width": 32,
           "model.num_heads": 2, "model.conv_layers": 1, "model.dropout": 0.0, "model.drop_path": 0.0,
           "model.attention.dropout": 0.0, "data.augment": False,
           "adapt": {"method": "lora", "targets": ["q", "v", "fc_in"], "rank": 4, "alpha": 8}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_adapted_run_under_torchrun_equals_one_process(tmp_path, strategy):
    single = train("cct-digits", tmp_path / "one", overrides=ADAPTED).model
    _run(_torchrun(tmp_path / "two", {**ADAPTED, "run.strategy": strategy}))
    two = formerkit.load(tmp_path / "two" / "model")  # the merged model
    one = formerkit.load(tmp_path / "one" / "model")
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(one(images), two(images), atol=1e-5)
        assert torch.allclose(single.eval()(images), one(images), atol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (tmp_path / "two" / "adapter" / "adapter.json").is_file()
