"""``formerkit bench recipes``: the training clock read from a run's metrics log leaves evaluations out, the time to
target is the first evaluation that meets it, the peers are built at the recipe model's size, and the peer's
byte-level measure is the cross-entropy written out."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from formerkit.bench.nanogpt import NanoGPT
from formerkit.bench.recipes import (
    TARGETS,
    Target,
    curve_from_log,
    format_recipes,
    nanogpt_char_model,
    nats_per_byte,
    recipes_benchmark,
    time_to_target,
    vit_pytorch_cct,
)
from formerkit.data.base import TokenSplit
from formerkit.errors import InputError
from formerkit.models.transformer import build_model
from formerkit.train.config import load_recipe

LOWER = Target("r", "valid_loss", 1.30, False, 300.0, "nanogpt", eval_every=2)
HIGHER = Target("r", "test_accuracy", 0.985, True, 30.0, "vit-pytorch", eval_every=2)


def _train(step, elapsed):
    return {"step": step, "kind": "train", "loss": 3.0, "elapsed": elapsed}


def _eval(step, elapsed, value):
    return {"step": step, "kind": "eval", "valid_loss": value, "elapsed": elapsed}


def test_the_training_clock_leaves_out_every_earlier_evaluation():
    # Steps 1-4 take 1 s each; the evaluation at step 2 takes 5 s, the one at step 4 takes 7 s.
    records = [_train(1, 1.0), _train(2, 2.0), _eval(2, 7.0, 1.5), _train(3, 8.0), _train(4, 9.0),
               _eval(4, 16.0, 1.2)]
    curve = curve_from_log(records, "valid_loss")
    assert curve == [{"step": 2, "train_s": 2.0, "eval_s": 5.0, "value": 1.5},
                     {"step": 4, "train_s": 4.0, "eval_s": 7.0, "value": 1.2}]


def test_an_evaluation_between_logged_steps_is_refused():
    with pytest.raises(InputError, match="log_every must divide eval.every"):
        curve_from_log([_train(2, 2.0), _eval(3, 4.0, 1.5)], "valid_loss")


def test_the_time_to_target_is_the_first_evaluation_that_meets_it():
    curve = [{"step": s, "train_s": 10.0 * s, "eval_s": 1.0, "value": v}
             for s, v in ((1, 1.5), (2, 1.30), (3, 1.35), (4, 1.2))]
    assert time_to_target(curve, LOWER) == 20.0  # 1.30 meets "<= 1.30"; the later 1.2 does not move it
    assert time_to_target(curve[:1], LOWER) is None
    accuracy = [{"step": 1, "train_s": 3.0, "eval_s": 0.1, "value": 0.98},
                {"step": 2, "train_s": 6.0, "eval_s": 0.1, "value": 0.99}]
    assert time_to_target(accuracy, HIGHER) == 6.0


def test_the_table_says_when_a_target_was_not_reached():
    curve = [{"step": 2, "train_s": 5.0, "eval_s": 1.0, "value": 1.4}]
    record = {"recipe": "char-lm", "library": "nanogpt", "metric": "valid_loss", "target": 1.3, "budget_s": 300.0,
              "time_to_target_s": None, "within_budget": False, "final": 1.4, "train_s": 5.0, "eval_s": 1.0,
              "params": 1_000_000, "steps": 2, "precision": "fp32", "curve": curve}
    table = format_recipes([record])
    assert "| char-lm | nanogpt | 1.00M | fp32 | valid_loss <= 1.3000 | not reached | no (<= 300 s) |" in table
    assert "- char-lm / nanogpt: 2: 5s 1.4000" in table


def test_unknown_recipes_and_libraries_are_refused_before_training():
    with pytest.raises(InputError, match="unknown recipes"):
        recipes_benchmark(("mae-digits",))
    with pytest.raises(InputError, match="unknown libraries"):
        recipes_benchmark(("cct-digits",), libraries=("timm",))


def test_the_nanogpt_peer_has_the_char_lm_models_size():
    config = load_recipe("char-lm").model.resolve({"vocab_size": 256, "max_seq_len": 256})
    peer = nanogpt_char_model(config)
    assert (len(peer.blocks), peer.wte.weight.shape, peer.wpe.weight.shape) == (
        config.num_layers, (256, config.width), (256, config.width))
    assert peer.blocks[0].heads == config.attention.num_heads
    ours = sum(p.numel() for p in build_model(config).parameters())
    theirs = sum(p.numel() for p in peer.parameters())
    # The same blocks; nanoGPT adds a learned position table where the recipe rotates (RoPE).
    assert abs(theirs - 256 * config.width - ours) <= 0.01 * ours


@pytest.mark.skipif(importlib.util.find_spec("vit_pytorch") is None, reason="vit-pytorch is not installed")
def test_the_vit_pytorch_peer_is_the_cct_digits_model():
    config = load_recipe("cct-digits").model.resolve({"image_size": [8, 8], "in_channels": 1, "num_classes": 10})
    torch.manual_seed(0)
    peer = vit_pytorch_cct(config).eval()
    ours = sum(p.numel() for p in build_model(config).parameters())
    theirs = sum(p.numel() for p in peer.parameters())
    assert abs(theirs - ours) <= 0.01 * ours
    with torch.no_grad():
        assert peer(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert peer.tokenizer.sequence_length(n_channels=1, height=8, width=8) == 64  # no pooling: 8x8 tokens


def test_nats_per_byte_is_the_cross_entropy_of_every_window_written_out():
    torch.manual_seed(0)
    model = NanoGPT(vocab_size=11, context=5, width=16, layers=1, heads=2).eval()
    split = TokenSplit(torch.randint(0, 11, (23,)), seq_len=5)
    total, count = 0.0, 0
    for start in range(0, len(split), 5):  # non-overlapping windows of 6 tokens: 5 predictions each
        window = split.tokens[start:start + 6]
        with torch.no_grad():
            log_probs = F.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
        for position in range(5):
            total -= log_probs[position, window[position + 1]].item()
            count += 1
    assert nats_per_byte(model, split, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_the_targets_are_the_issues():
    assert (TARGETS["cct-digits"].value, TARGETS["cct-digits"].budget_s) == (0.985, 30.0)
    assert (TARGETS["char-lm"].value, TARGETS["char-lm"].budget_s) == (1.30, 300.0)
    assert TARGETS["char-lm"].metric == "valid_loss" and not TARGETS["char-lm"].higher_is_better


@pytest.mark.slow
def test_a_short_bench_run_gives_both_contenders_a_curve_on_the_same_evaluations():
    short = {"cct-digits": {"schedule.steps": 8, "eval.every": 4, "schedule.warmup_steps": 2}}
    libraries = ("formerkit", "vit-pytorch") if importlib.util.find_spec("vit_pytorch") else ("formerkit",)
    records, _ = recipes_benchmark(("cct-digits",), libraries=libraries, threads=1, overrides=short)
    assert [item["library"] for item in records] == list(libraries)
    for item in records:
        assert [point["step"] for point in item["curve"]] == [4, 8]
        assert 0 < item["curve"][0]["train_s"] < item["curve"][1]["train_s"] == item["train_s"]
        assert all(point["eval_s"] > 0 and 0 <= point["value"] <= 1 for point in item["curve"])
        assert item["time_to_target_s"] == time_to_target(item["curve"], TARGETS["cct-digits"])
