"""Structured pruning: removals equal masking in the original model, configs match weights, scores by hand, the
CLI, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import formerkit
from formerkit.checkpoint import load, save
from formerkit.cli import main
from formerkit.compress.prune import prune, structure_scores
from formerkit.errors import FormerkitError
from formerkit.runs import evaluate_run
from formerkit.summary import count_parameters

from ..conftest import token_config


def _model(randomize, arch: str = "encoder", **overrides) -> torch.nn.Module:
    head = ({"kind": "classification", "num_classes": 5, "pooling": "mean"} if arch == "encoder"
            else {"kind": "lm"})
    config = token_config(arch, vocab_size=40, num_layers=3, head=head)
    if overrides:
        config = config.replace(**overrides)
    model = formerkit.build_model(config)
    randomize(model, 7)
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(2))


def _scores_removing(model, layer: int, heads=(), channels=(), layers=()):
    """Scores that make prune remove exactly the given heads/channels of ``layer`` (and the given layers)."""
    scores = structure_scores(model, "magnitude")
    scores = {"heads": [torch.ones_like(h) for h in scores["heads"]],
              "channels": [torch.ones_like(c) for c in scores["channels"]], "layers": torch.ones(len(scores["layers"]))}
    for h in heads:
        scores["heads"][layer][h] = 0.0
    for c in channels:
        scores["channels"][layer][c] = 0.0
    for index in layers:
        scores["layers"][index] = 0.0
    return scores


def test_ratio_zero_changes_nothing(randomize):
    model = _model(randomize)
    pruned, record = prune(model)
    assert pruned.config == model.config
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(pruned(_inputs()), model(_inputs()))
    assert record["parameters_after"] == record["parameters_before"]


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_removing_a_head_equals_masking_it_in_the_original(arch, randomize):
    model = _model(randomize, arch)
    # One head of four per layer goes (25%): head 2 of layer 1 by these scores, the last head elsewhere by ties.
    pruned, record = prune(model, heads=0.25, scores=_scores_removing(model, 1, heads=[2]))
    masked = copy.deepcopy(model)
    dim = model.config.head_dim
    stack = masked.encoder if arch == "encoder" else masked.decoder
    removed = {int(k): v for k, v in record["removed_heads"].items()}
    assert removed[1] == [2] and all(len(v) == 1 for v in removed.values())
    with torch.no_grad():
        for layer, heads in removed.items():
            for h in heads:  # the head's output never reaches the stream
                stack.blocks[layer].attention.out.weight[:, h * dim:(h + 1) * dim] = 0.0
        torch.testing.assert_close(pruned(_inputs()), masked(_inputs()), atol=1e-5, rtol=1e-5)
    assert pruned.config.attention.layer_heads == (3, 3, 3)


def test_removing_channels_equals_zeroing_them(randomize):
    model = _model(randomize, feedforward={"activation": "swiglu"})
    hidden = model.config.feedforward_size
    cut = round(0.5 * hidden)
    chosen = list(range(0, 2 * cut, 2))  # layer 0 loses its even channels; the others (tied scores) their first
    pruned, _ = prune(model, ffn=0.5, scores=_scores_removing(model, 0, channels=chosen))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, removed in ((0, chosen), (1, list(range(cut))), (2, list(range(cut)))):
            fc_in = reference.encoder.blocks[layer].feedforward.fc_in
            fc_in.weight[removed] = 0.0  # the gate rows: silu(0) * up = 0, the channel adds nothing
            fc_in.bias[removed] = 0.0
        torch.testing.assert_close(pruned(_inputs()), reference(_inputs()), atol=1e-5, rtol=1e-5)
    assert pruned.config.feedforward.layer_hidden_sizes == (hidden - cut,) * 3
    assert pruned.encoder.blocks[0].feedforward.fc_in.weight.shape == (2 * (hidden - cut), 32)


def test_removing_a_layer_equals_skipping_it(randomize):
    model = _model(randomize, position={"kind": "rope"}, attention={"num_heads": 4, "sliding_window": 4,
                                                                    "sliding_window_layers": [1, 2]})
    pruned, record = prune(model, layers=1, scores=_scores_removing(model, 0, layers=[1]))
    assert record["removed_layers"] == [1]
    # The window stays on what was layer 2, now layer 1.
    assert pruned.config.num_layers == 2 and pruned.config.attention.sliding_window_layers == (1,)
    skipping = formerkit.build_model(model.config.replace(num_layers=2, **{"attention.sliding_window_layers": [1]}))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.blocks.")}
    for new, old in ((0, 0), (1, 2)):
        state.update({f"encoder.blocks.{new}.{k}": v for k, v in model.encoder.blocks[old].state_dict().items()})
    skipping.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(pruned(_inputs()), skipping.eval()(_inputs()), atol=1e-6, rtol=1e-6)


def test_pruned_models_save_load_and_their_config_matches_their_weights(randomize, tmp_path):
    model = _model(randomize, arch="decoder", position={"kind": "rope"})
    pruned, _ = prune(model, heads=0.5, ffn=0.25)
    save(pruned, tmp_path / "p")
    loaded = load(tmp_path / "p")
    assert loaded.config.attention.layer_heads == (2, 2, 2)
    assert loaded.config.feedforward.layer_hidden_sizes == (96, 96, 96)
    assert count_parameters(loaded.config) == sum(p.numel() for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), pruned(_inputs()))
    # The key/value cache follows the per-layer head counts: cached greedy decoding equals recomputing.
    prompt = _inputs()[:1, :4]
    out = loaded.generate(prompt, 6, temperature=0)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, loaded(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)
    # A Hugging Face GPT-2 has one size for every layer: writing one is refused, naming the fields.
    gpt2_like, _ = prune(_model(randomize, arch="decoder"), heads=0.25, ffn=0.5)
    with pytest.raises(FormerkitError, match="attention.layer_heads .*feedforward.layer_hidden_sizes"):
        formerkit.to_hf(gpt2_like, tmp_path / "hf")


@pytest.mark.slow
def test_taylor_scores_equal_weight_times_gradient_by_hand(tiny_classifier_run):
    from formerkit.data import build_data
    from formerkit.runs import load_run_model
    from formerkit.train.objectives import make_objective

    model, recipe, _ = load_run_model(tiny_classifier_run)
    bundle = build_data(recipe.data)
    objective = make_objective(recipe.objective, bundle)
    batches = [bundle.train.take(torch.arange(0, 16)), bundle.train.take(torch.arange(16, 32))]
    scores = structure_scores(model, "taylor", batches, objective)
    # By hand: the gradients of the two batches' losses, summed; then |sum of w * g| over head 1 of layer 0.
    reference = copy.deepcopy(model).eval()  # scores are taken without dropout or stochastic depth
    for batch in batches:
        objective.loss(reference, batch, torch.Generator().manual_seed(0)).backward()
    attention = reference.encoder.blocks[0].attention
    dim, heads = attention.head_dim, attention.num_heads
    rows = [part * heads * dim + dim + o for part in range(3) for o in range(dim)]
    total = (attention.qkv.weight[rows] * attention.qkv.weight.grad[rows]).sum()
    if attention.qkv.bias is not None:
        total = total + (attention.qkv.bias[rows] * attention.qkv.bias.grad[rows]).sum()
    total = total + (attention.out.weight[:, dim:2 * dim] * attention.out.weight.grad[:, dim:2 * dim]).sum()
    assert scores["heads"][0][1].item() == pytest.approx(total.abs().item(), rel=1e-4, abs=1e-7)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"heads": 1.0}, "in \\[0, 1\\)"), ({"ffn": -0.1}, "in \\[0, 1\\)"), ({"layers": 3}, "in \\[0, 3\\)"),
    ({"heads": 0.9}, "remove all 4 heads of layer 0"),
])
def test_bad_ratios_are_refused(kwargs, message, randomize):
    with pytest.raises(FormerkitError, match=message):
        prune(_model(randomize), **kwargs)


@pytest.mark.parametrize("overrides, message", [
    ({"attention.num_kv_heads": 2}, "grouped-query"), ({"position.kind": "alibi"}, "alibi"),
    ({"num_unique_layers": 1}, "shared layers"),
])
def test_models_pruning_cannot_reduce_are_refused_with_the_reason(overrides, message, randomize):
    model = _model(randomize, arch="decoder", **overrides)
    with pytest.raises(FormerkitError, match=message):
        prune(model, heads=0.25)


@pytest.mark.slow
def test_cli_prune_with_finetune_gives_runs_eval_accepts(tiny_classifier_run, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_classifier_run), "--heads", "0.5", "--ffn", "0.5", "--score", "taylor",
                 "--finetune-steps", "3", "--out", str(out)]) == 0
    before = load(out / "pruned")
    after = load(out / "model")
    assert before.config == after.config and after.config.attention.layer_heads == (1, 1)
    record = json.loads((out / "pruned" / "config.json").read_text())["extra"]["pruning"]
    assert record["score"] == "taylor" and record["heads"] == 0.5
    # Fine-tuning started from the pruned weights, head included, and trained them.
    assert not torch.equal(before.head.projection.weight, after.head.projection.weight)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert evaluate_run(out, ["test"])["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    # Without fine-tuning: a model directory.
    assert main(["prune", str(tiny_classifier_run), "--ffn", "0.25", "--out", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "config.json").exists() and evaluate_run(tmp_path / "plain", ["test"])
