"""Layer-wise learning-rate decay (optim.layer_decay): the learning rate of every parameter, through the schedule and
across a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import formerkit
from formerkit import ConfigError
from formerkit.models.mae import MaskedAutoencoder
from formerkit.train import TrainConfig, load_recipe, train
from formerkit.train.config import OptimConfig
from formerkit.train.trainer import build_optimizer, lr_factor

LR, DECAY = 1e-3, 0.5


def _lrs(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter's (unique name's) current learning rate."""
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def _expected(name: str, blocks: int, *, block_of=lambda name: int(name.split(".")[2])) -> float:
    """The lr layer decay gives: embedding lr * d^(L+1), block i lr * d^(L-i), final norm and head lr."""
    if name.startswith(("stem.", "positions.")):
        return LR * DECAY ** (blocks + 1)
    if ".blocks." in name:
        return LR * DECAY ** (blocks - block_of(name))
    assert name.startswith(("encoder.final_norm.", "decoder.final_norm.", "head.")), name
    return LR


def test_each_block_trains_at_a_decayed_learning_rate_below_the_head():
    model = formerkit.create_model("vit_tiny_patch16_224", num_layers=3, num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(lr=LR, layer_decay=DECAY))
    lrs = _lrs(model, optimizer)
    assert lrs["encoder.blocks.0.attention.qkv.weight"] == pytest.approx(LR * DECAY ** 3)
    assert lrs["encoder.blocks.2.feedforward.fc_out.bias"] == pytest.approx(LR * DECAY)
    assert lrs["stem.class_token"] == lrs["positions.weight"] == pytest.approx(LR * DECAY ** 4)
    assert lrs["head.projection.weight"] == lrs["encoder.final_norm.weight"] == LR
    for name, lr in lrs.items():
        assert lr == pytest.approx(_expected(name, 3)), name
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(LR * group["lr_scale"])


def test_layer_decay_keeps_the_weight_decay_split():
    model = formerkit.create_model("vit_tiny_patch16_224", num_layers=2, num_classes=10)
    decayed = lambda optimizer: {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0  # noqa: E731
                                 for p in group["params"]}
    plain = build_optimizer(model, OptimConfig(lr=LR))
    layered = build_optimizer(model, OptimConfig(lr=LR, layer_decay=DECAY))
    assert decayed(layered) == decayed(plain) and decayed(plain)
    assert sum(len(g["params"]) for g in layered.param_groups) == len(list(model.parameters()))
    # Off: the two groups (decayed, not decayed) at the base lr, as before layer decay existed.
    assert [g["weight_decay"] for g in plain.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == LR and g["lr_scale"] == 1.0 for g in plain.param_groups)
    # 1: every scale is 1.
    ones = build_optimizer(model, OptimConfig(lr=LR, layer_decay=1.0))
    assert set(_lrs(model, ones).values()) == {LR}


def test_shared_blocks_count_once_in_the_depth():
    # 4 layers cycling 2 distinct blocks: the stack is 2 blocks deep for the decay.
    model = formerkit.create_model("vit_tiny_patch16_224", num_layers=4, num_unique_layers=2, num_classes=10)
    lrs = _lrs(model, build_optimizer(model, OptimConfig(lr=LR, layer_decay=DECAY)))
    assert not any(".blocks.2." in name for name in lrs)
    for name, lr in lrs.items():
        assert lr == pytest.approx(_expected(name, 2)), name


def test_an_encoder_decoder_numbers_the_decoder_blocks_after_the_encoder_and_a_tied_head_trains_at_the_top():
    config = load_recipe("seq2seq-reverse").model.resolve()
    model = formerkit.Transformer(config)  # 2 encoder + 2 decoder blocks, head tied to the token embedding
    lrs = _lrs(model, build_optimizer(model, OptimConfig(lr=LR, layer_decay=DECAY)))
    block_of = lambda name: int(name.split(".")[2]) + (2 if name.startswith("decoder.") else 0)  # noqa: E731
    assert lrs["decoder.blocks.1.feedforward.fc_in.weight"] == pytest.approx(LR * DECAY)
    assert lrs["encoder.blocks.0.feedforward.fc_in.weight"] == pytest.approx(LR * DECAY ** 4)
    assert lrs["stem.tokens.weight"] == LR  # the same tensor as the head's projection
    for name, lr in lrs.items():
        if name != "stem.tokens.weight":
            assert lr == pytest.approx(_expected(name, 4, block_of=block_of)), name


def test_mae_pretraining_decays_the_encoder_and_trains_its_decoder_at_the_base_rate():
    encoder = formerkit.create_model("vit_tiny_patch16_224", num_layers=2, image_size=8, patch_size=2, in_channels=1)
    mae = MaskedAutoencoder(encoder, decoder_width=32, decoder_layers=1, decoder_heads=2, mask_ratio=0.5)
    lrs = _lrs(mae, build_optimizer(mae, OptimConfig(lr=LR, layer_decay=DECAY)))
    assert lrs["encoder.encoder.blocks.0.attention.qkv.weight"] == pytest.approx(LR * DECAY ** 2)
    assert lrs["encoder.stem.projection.weight"] == pytest.approx(LR * DECAY ** 3)
    assert {lr for name, lr in lrs.items() if not name.startswith("encoder.")} == {LR}


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_outside_0_1_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"optim\.layer_decay"):
        OptimConfig(layer_decay=value)
    with pytest.raises(ConfigError, match=r"then\.optim\.layer_decay"):
        TrainConfig.from_dict({"then": {"optim": {"layer_decay": value}}})


def _group_lrs(checkpoint) -> list[float]:
    return [group["lr"] for group in json.loads((checkpoint / "state.json").read_text())["optimizer"]["param_groups"]]


@pytest.mark.slow
def test_the_schedule_scales_every_group_and_a_resumed_run_is_exact(tiny, tmp_path):
    overrides = tiny("vit-digits", **{"model.num_layers": 2, "optim.layer_decay": DECAY, "optim.lr": LR,
                                      "schedule.warmup_steps": 2, "run.checkpoint_every": 3, "eval.every": 3,
                                      "run.threads": 1})
    reference = train("vit-digits", tmp_path / "reference", overrides=overrides)
    steps = reference.summary["steps"]
    # Every group at base lr x its scale x the schedule, at the last step as at the first checkpoint.
    model = formerkit.load(tmp_path / "reference" / "model")
    scales = [g["lr_scale"] for g in build_optimizer(model, OptimConfig(lr=LR, layer_decay=DECAY)).param_groups]
    assert sorted(set(scales)) == pytest.approx([DECAY ** 3, DECAY ** 2, DECAY, 1.0])
    checkpoints = sorted((tmp_path / "reference" / "checkpoints").glob("step-*"))
    for checkpoint in checkpoints:
        factor = lr_factor(int(checkpoint.name[5:]), 2, steps, 0.1)
        assert _group_lrs(checkpoint) == pytest.approx([LR * scale * factor for scale in scales])
    # Resume from the first checkpoint (as if the run had stopped there): the same lrs and weights, bitwise.
    assert [c.name for c in checkpoints] == ["step-00000003", f"step-{steps:08d}"]
    shutil.copytree(tmp_path / "reference", tmp_path / "resumed")
    for path in (f"checkpoints/step-{steps:08d}", "model"):
        shutil.rmtree(tmp_path / "resumed" / path)
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = train("vit-digits", tmp_path / "resumed", overrides=overrides, resume=True)
    assert resumed.summary["status"] == "completed"
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.summary["test_loss"] == reference.summary["test_loss"]
    last = lambda run: tmp_path / run / "checkpoints" / f"step-{steps:08d}"  # noqa: E731
    assert _group_lrs(last("resumed")) == _group_lrs(last("reference"))
