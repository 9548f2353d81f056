"""Training and evaluating with adaptive inference: the deep-supervision loss for early exits
(objective.exit_loss_weight) and ``formerkit eval --merge-tokens / --exit-threshold``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import formerkit
from formerkit import ConfigError, InputError
from formerkit.cli import main
from formerkit.data import build_data
from formerkit.models.early_exit import early_exit, exit_logits
from formerkit.runs import evaluate_run
from formerkit.train import train
from formerkit.train.config import ObjectiveConfig, TrainConfig
from formerkit.train.objectives import Classification


def test_exit_loss_adds_the_mean_loss_of_the_intermediate_exits():
    model = formerkit.create_model("vit_tiny_patch16_224", image_size=8, patch_size=2, in_channels=1, width=16,
                                   num_heads=2, num_layers=3, num_classes=4)
    batch = {"inputs": torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 2, 3, 1])}
    plain = Classification(ObjectiveConfig(kind="classification", label_smoothing=0.1), None)
    deep = Classification(ObjectiveConfig(kind="classification", label_smoothing=0.1, exit_loss_weight=0.5), None)
    with torch.no_grad():
        states = model(batch["inputs"], output_hidden_states=True).hidden_states
        by_hand = [F.cross_entropy(exit_logits(model, state), batch["labels"], label_smoothing=0.1)
                   for state in states[1:]]
        expected = by_hand[-1] + 0.5 * (by_hand[0] + by_hand[1]) / 2
        assert torch.allclose(deep.loss(model, batch, None), expected, atol=1e-6)
        assert torch.allclose(plain.loss(model, batch, None), by_hand[-1], atol=1e-6)


def test_exit_loss_weight_is_validated():
    with pytest.raises(ConfigError, match="objective.exit_loss_weight: expected a number >= 0"):
        ObjectiveConfig(kind="classification", exit_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="0 unless objective.kind is classification"):
        ObjectiveConfig(kind="causal_lm", exit_loss_weight=0.3)


def _by_hand(run, predict) -> dict[str, float]:
    """The test accuracy, loss and mean layers (the mean of the per-sample counts) of ``predict(model, inputs) ->
    (logits, counts)``, in a plain loop over the batches of the run's test split that the recipe evaluates."""
    recipe = TrainConfig.from_file(run / "recipe.yaml")
    model = formerkit.load(run / "model").eval()
    correct = samples = counted = 0
    loss = 0.0
    with torch.no_grad():
        for batch in build_data(recipe.data).test.eval_batches(recipe.eval.batch_size, recipe.eval.batches):
            logits, counts = predict(model, batch["inputs"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            samples += len(batch["labels"])
            counted += int(counts.sum())
    return {"accuracy": correct / samples, "loss": loss / samples, "mean_layers": counted / samples}


@pytest.mark.slow
def test_eval_with_token_merging_and_early_exit(tiny, tmp_path, capsys):
    run = tmp_path / "vit"
    train("vit-digits", run, overrides=tiny("vit-digits", **{"model.num_layers": 2,
                                                              "objective.exit_loss_weight": 0.5}))
    assert TrainConfig.from_file(run / "recipe.yaml").objective.exit_loss_weight == 0.5
    plain = evaluate_run(run)
    assert evaluate_run(run, merge_tokens=0) == plain
    merged = evaluate_run(run, merge_tokens=4)
    assert set(merged) == set(plain)
    # The merged model's metrics, computed here (merging changes the loss: the metrics are not the plain ones).
    by_hand = _by_hand(run, lambda model, x: (model(x, merge_tokens=4), torch.zeros(len(x))))
    assert merged["test_accuracy"] == by_hand["accuracy"]
    assert merged["test_loss"] == pytest.approx(by_hand["loss"], rel=1e-6, abs=0)
    assert merged["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-4, abs=0)
    full = evaluate_run(run, exit_threshold=1.0)
    assert full["test_mean_layers"] == 2.0 and full["test_accuracy"] == plain["test_accuracy"]
    assert evaluate_run(run, exit_threshold=0.0)["test_mean_layers"] == 1.0
    capsys.readouterr()
    assert main(["eval", str(run), "--merge-tokens", "4", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == merged
    capsys.readouterr()
    assert main(["eval", str(run), "--exit-threshold", "0.5"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    by_hand = _by_hand(run, lambda model, x: early_exit(model, x, 0.5))
    assert metrics["test_mean_layers"] == by_hand["mean_layers"]
    assert metrics["test_accuracy"] == by_hand["accuracy"]
    # The per-sample exits the metric averages are early_exit's.
    model = formerkit.load(run / "model").eval()
    assert early_exit(model, torch.zeros(2, 1, 8, 8), 0.0).layers_used.tolist() == [1, 1]
    assert main(["eval", str(run), "--merge-tokens", "4,0"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == evaluate_run(run, merge_tokens=[4, 0])[
        "test_accuracy"]
    assert main(["eval", str(run), "--merge-tokens", "9"]) == 2
    assert "layer 1 of 2 cannot merge 9 tokens" in capsys.readouterr().err
    assert main(["eval", str(run), "--exit-threshold", "-1"]) == 2
    assert "threshold: expected a probability >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not both
        main(["eval", str(run), "--merge-tokens", "1", "--exit-threshold", "0.5"])
    with pytest.raises(InputError, match="choose one"):
        evaluate_run(run, merge_tokens=1, exit_threshold=0.5)


@pytest.mark.slow
def test_eval_refuses_adaptive_inference_for_other_objectives(tiny, tmp_path):
    run = tmp_path / "lm"
    train("char-lm", run, overrides=tiny("char-lm"))
    with pytest.raises(InputError, match="serve classification runs, this run trained 'causal_lm'"):
        evaluate_run(run, exit_threshold=0.5)
