"""The trainer: every objective end to end on shrunken recipes, the run directory, schedules, determinism."""

from __future__ import annotations

import json
import math

import pytest
import torch

import formerkit
from formerkit.train import TrainConfig, list_recipes, load_recipe, train
from formerkit.train.trainer import build_optimizer, lr_factor


@pytest.mark.parametrize("recipe", ["cct-digits", "vit-digits", "seq2seq-reverse", "char-lm", "mlm-stdlib",
                                    "timeseries-forecast"])
@pytest.mark.slow
def test_each_shipped_objective_trains_and_leaves_a_complete_run_directory(recipe, tiny, tmp_path):
    result = train(recipe, tmp_path / "run", overrides=tiny(recipe))
    run = tmp_path / "run"
    assert result.summary["status"] == "completed"
    assert result.summary["steps"] == load_recipe(recipe).with_overrides(tiny(recipe)).schedule.steps
    for name in ("recipe.yaml", "model.yaml", "metrics.jsonl", "summary.json", "model/config.json",
                 "model/model.safetensors", "plots/loss.png"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, result.summary["steps"] + 1))
    assert any(r["kind"] == "eval" for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    # The saved model is the trained one, and carries its preprocessing and recipe.
    loaded = formerkit.load(run / "model")
    for (name, a), (_, b) in zip(result.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    extra = formerkit.load_extra(run / "model")
    assert extra["recipe"]["name"] == recipe and extra["preprocessing"]
    assert TrainConfig.from_file(run / "recipe.yaml") == TrainConfig.from_dict(extra["recipe"])
    assert formerkit.ModelConfig.from_file(run / "model.yaml") == loaded.config


@pytest.mark.slow
def test_bf16_autocast_runs_train_in_bfloat16_matmuls_with_finite_losses(tiny, tmp_path):
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(output.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        result = train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits", **{"run.precision": "bf16"}))
    finally:
        hook.remove()
    assert torch.bfloat16 in seen
    assert result.summary["status"] == "completed" and math.isfinite(result.summary["test_loss"])


@pytest.mark.slow
def test_mae_pretraining_then_finetuning_starts_from_the_pretrained_encoder(tiny, tmp_path):
    result = train("mae-digits", tmp_path / "run", overrides=tiny("mae-digits"))
    assert result.summary["objective"] == "classification"
    assert result.summary["previous_stage"]["objective"] == "mae"
    pretrained = formerkit.load(tmp_path / "run" / "stage1" / "model").state_dict()
    # Fine-tuning moved the weights, but they started from the pretrained encoder: with zero fine-tuning steps the
    # encoder tensors are equal.
    frozen = train("mae-digits", tmp_path / "zero", overrides=tiny(
        "mae-digits", then={"objective": {"kind": "classification"},
                            "schedule": {"steps": 1, "batch_size": 16, "warmup_steps": 0},
                            "optim": {"lr": 1e-12, "weight_decay": 0.0}}))
    stage1 = formerkit.load(tmp_path / "zero" / "stage1" / "model").state_dict()
    finetuned = frozen.model.state_dict()
    shared = [name for name in stage1 if not name.startswith("head.")]
    assert shared and all(torch.allclose(stage1[n], finetuned[n], atol=1e-6) for n in shared)
    assert set(pretrained) == set(stage1)


@pytest.mark.slow
def test_the_same_seed_gives_bitwise_identical_runs(tiny, tmp_path):
    first = train("cct-digits", tmp_path / "a", overrides=tiny("cct-digits"))
    second = train("cct-digits", tmp_path / "b", overrides=tiny("cct-digits"))
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    other = train("cct-digits", tmp_path / "c", overrides=tiny("cct-digits", **{"run.seed": 1}))
    assert any(not torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                     other.model.state_dict().values()))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    warmup, total, floor = 10, 110, 0.1
    assert [lr_factor(s, warmup, total, floor) for s in range(warmup)] == pytest.approx(
        [(s + 1) / warmup for s in range(warmup)])
    assert lr_factor(warmup, warmup, total, floor) == pytest.approx(1.0)
    middle = warmup + (total - warmup) // 2
    assert lr_factor(middle, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(total, warmup, total, floor) == pytest.approx(floor)


def test_weight_decay_skips_norms_biases_embeddings_and_positions():
    model = formerkit.create_model("char_gpt", num_layers=1)
    recipe = TrainConfig()
    optimizer = build_optimizer(model, recipe.optim)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == recipe.optim.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    for pid, name in names.items():
        expect_decay = name.endswith("weight") and ("qkv" in name or ".out." in name or "fc_" in name)
        assert (pid in decayed) == expect_decay, name


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tiny, tmp_path):
    whole = train("cct-digits", tmp_path / "a", overrides=tiny("cct-digits", **{"model.dropout": 0.0,
                                                                                 "model.drop_path": 0.0,
                                                                                 "model.attention.dropout": 0.0}))
    split = train("cct-digits", tmp_path / "b", overrides=tiny("cct-digits", **{
        "model.dropout": 0.0, "model.drop_path": 0.0, "model.attention.dropout": 0.0, "schedule.grad_accum": 4}))
    # Compare what the models compute: the sequence-pooling score bias has a zero gradient in exact arithmetic
    # (softmax ignores a shared shift), so Adam turns rounding noise into arbitrary steps there, harmlessly.
    images = torch.randn(8, 1, 8, 8)
    assert torch.allclose(whole.model.eval()(images), split.model.eval()(images), atol=1e-4)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), split.model.state_dict().items()):
        if name != "head.pooling.score.bias":
            assert torch.allclose(a, b, atol=1e-4), name


@pytest.mark.slow
def test_ema_weights_are_what_gets_saved(tiny, tmp_path):
    result = train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits", **{"optim.ema_decay": 0.5}))
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    from safetensors.torch import load_file

    ema = load_file(str(checkpoint / "ema.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    saved = formerkit.load(tmp_path / "run" / "model").state_dict()
    key = next(k for k in raw if k.endswith("qkv.weight"))
    assert torch.equal(saved[key], ema[f"module.{key}"])
    assert not torch.equal(saved[key], raw[key])
    assert result.summary["status"] == "completed"


@pytest.mark.slow
def test_early_stopping_stops_when_the_metric_stalls(tiny, tmp_path):
    overrides = tiny("seq2seq-reverse", **{"schedule.steps": 40, "eval.every": 1, "eval.metric": "valid_loss",
                                           "eval.patience": 2, "optim.lr": 1e-9})
    result = train("seq2seq-reverse", tmp_path / "run", overrides=overrides)
    assert result.summary["status"] == "stopped_early"
    assert result.summary["steps"] < 40


def test_every_shipped_recipe_is_valid_and_listed():
    names = list_recipes()
    for required in ("char-lm", "cct-digits", "vit-digits", "mae-digits", "seq2seq-reverse", "timeseries-forecast",
                     "mlm-stdlib"):
        assert required in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert TrainConfig.from_dict(recipe.to_dict()) == recipe


@pytest.mark.slow
def test_char_lm_long_trains_with_local_attention_blocks_experts_and_packed_rows(tmp_path, tiny, monkeypatch):
    from formerkit.nn.attention import Attention

    blockwise = []
    original = Attention._blockwise
    monkeypatch.setattr(Attention, "_blockwise", lambda self, *args: blockwise.append(1) or original(self, *args))
    result = train("char-lm-long", tmp_path / "run", overrides=tiny("char-lm-long"))
    assert blockwise  # the window layers ran block by block on 160-token rows
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) and "moe_load_max" in r for r in trained)
    assert math.isfinite(result.summary["test_loss"] if "test_loss" in result.summary else result.summary[
        "valid_loss"])


@pytest.mark.slow
def test_soft_causal_mask_fades_in_over_the_training_steps(tmp_path, tiny, monkeypatch):
    from formerkit.models.transformer import Transformer

    strengths = []
    original = Transformer.set_training_step

    def record(self, step):
        original(self, step)
        strengths.append(self.soft_causal_strength)

    monkeypatch.setattr(Transformer, "set_training_step", record)
    # iLLaMA's setting: a causal (decoder) ViT classifying from its last token.
    overrides = tiny("vit-digits", **{"model.arch": "decoder", "model.pooling": "last",
                                      "model.attention.soft_causal_steps": 4})
    train("vit-digits", tmp_path / "run", overrides=overrides)
    assert strengths == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(formerkit.train.trainer.RunError, match="soft_causal_steps"):
        train("vit-digits", tmp_path / "long", overrides={**overrides, "model.attention.soft_causal_steps": 50})


@pytest.mark.slow
def test_an_interrupted_first_stage_does_not_start_the_second(tmp_path, tiny, monkeypatch):
    from formerkit.train import trainer

    stages = []
    real = trainer.train_stage

    def stopping(config, run_dir, **kwargs):
        result = real(config, run_dir, **kwargs)
        stages.append(run_dir.name)
        if run_dir.name == "stage1" and len(stages) == 1:
            result.summary["status"] = "interrupted"  # as after SIGTERM: checkpointed, stopped
        return result

    monkeypatch.setattr(trainer, "train_stage", stopping)
    result = train("mae-digits", tmp_path / "run", overrides=tiny("mae-digits"))
    assert stages == ["stage1"] and result.summary["status"] == "interrupted"
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # the fine-tuning stage never began
