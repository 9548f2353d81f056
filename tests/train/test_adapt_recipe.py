"""A recipe with an adapt: section, and formerkit.fit on an adapted model: only the adapters train, resume is exact,
and the saved run (the adapters merged into its model, the adapter alone beside it) generates."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit
from formerkit.adapt import adapter_names
from formerkit.generation import generate
from formerkit.runs import generate_run
from formerkit.train import train
from formerkit.train.config import TrainConfig

from ..conftest import QUIET, stop_training_after, token_config

CHATS = [{"prompt": f"say {word}", "response": word} for word in ("yes", "no", "maybe", "ok", "fine", "sure")] * 3


def base_model(seed: int = 0):
    torch.manual_seed(seed)
    return formerkit.build_model(token_config(vocab_size=256, width=32, num_layers=2, max_seq_len=64, num_heads=2))


def adapted_recipe(tmp_path, steps: int = 6, **extra) -> TrainConfig:
    formerkit.save(base_model(), tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in CHATS))
    recipe = {"name": "adapted", "model": {"from": str(tmp_path / "base")},
              "data": {"source": "instruct", "path": str(data), "seq_len": 64, "pack": True, "valid_fraction": 0.2},
              "adapt": {"method": "lora", "targets": ["q", "v", "fc_in"], "rank": 4, "alpha": 8},
              "optim": {"lr": 0.01, "weight_decay": 0.0},
              "schedule": {"steps": steps, "batch_size": 2, "warmup_steps": 1}, "eval": {"every": 3}}
    return TrainConfig.from_dict(recipe).with_overrides({**QUIET, **extra})


def test_an_adapted_recipe_trains_the_adapters_only_and_its_run_generates(tmp_path, capsys):
    result = train(adapted_recipe(tmp_path), tmp_path / "run")
    trained, base = result.model, base_model()
    assert adapter_names(trained) == ["default"]
    # the base weights are the start's, bit for bit; the LoRA B matrices (zero at the start) moved
    state = trained.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert all(state[name].abs().sum() > 0 for name in state if name.endswith("lora_B"))
    # the run's model is the merged one: a plain model whose logits match the adapted model's
    saved = formerkit.load(tmp_path / "run" / "model")
    assert not adapter_names(saved)
    tokens = torch.randint(256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(saved(tokens), trained.eval()(tokens), atol=1e-5)
    # the adapter alone, beside it, loads back onto the base to the same logits
    formerkit.load_adapters(base, tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.allclose(base.eval()(tokens), trained(tokens), atol=1e-6)
    # formerkit generate RUN: greedy text equals greedy decoding with the adapted model
    prompt = "<|user|>\nsay yes<|end|>\n<|assistant|>\n"
    text = "".join(generate_run(tmp_path / "run", prompt, max_new_tokens=6, temperature=0.0))
    ids = torch.tensor([list(prompt.encode())])
    reference = generate(trained, ids, max_new_tokens=6, temperature=0.0)[0, ids.shape[1]:]
    assert text.encode("utf-8", "replace") == bytes(reference.tolist()).decode("utf-8", "replace").encode(
        "utf-8", "replace")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and "valid_loss" in summary
    # formerkit summary RUN: the recipe's adapters counted on the run's model (layers x projections x r x (in + out))
    from formerkit.cli import main

    capsys.readouterr()
    assert main(["summary", str(tmp_path / "run")]) == 0
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 32) + 4 * (32 + 4 * 32))  # q, v and fc_in (out: 4 x 32) per layer
    assert f"trainable parameters: {lora:,}" in capsys.readouterr().out


def test_an_adapted_recipe_resumes_exactly(tmp_path):
    whole = train(adapted_recipe(tmp_path, steps=6), tmp_path / "whole").model
    with stop_training_after(3):
        first = train(adapted_recipe(tmp_path, steps=6), tmp_path / "parts")
    assert first.summary["status"] == "interrupted" and first.summary["steps"] == 3
    resumed = train(adapted_recipe(tmp_path, steps=6), tmp_path / "parts", resume=True).model
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_fit_on_an_adapted_model_changes_only_the_adapters_and_resumes_exactly(tmp_path):
    rows = torch.randint(256, (16, 17), generator=torch.Generator().manual_seed(1))
    options = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=100)

    def adapted():
        model = base_model()
        torch.manual_seed(7)
        return formerkit.add_adapters(model, method="lora", targets=("q", "v"), rank=4, alpha=8)

    whole = adapted()
    before = {name: tensor.clone() for name, tensor in whole.state_dict().items()}
    formerkit.fit(whole, rows, out_dir=tmp_path / "whole", **options)
    changed = {name for name, tensor in whole.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all("lora_" in name for name in changed)

    parts = adapted()
    formerkit.fit(parts, rows, out_dir=tmp_path / "parts", stop_after=2, **options)
    again = adapted()
    formerkit.fit(again, rows, out_dir=tmp_path / "parts", **options)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # the run's saved model is the merged one
    merged = formerkit.load(tmp_path / "whole" / "model")
    with torch.no_grad():
        assert torch.allclose(merged(rows[:, :-1]), whole.eval()(rows[:, :-1]), atol=1e-5)


def test_the_shipped_instruct_recipe_adapts_a_char_lm_run(tmp_path, trained_run):
    """formerkit train instruct-lm --set model.from=RUN (replacing the recipe's start) --set data.path=...: LoRA on
    the run's weights, trained on the response tokens, and the run generates."""
    from formerkit.train import load_recipe

    run = trained_run("char-lm")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in CHATS))
    overrides = {**QUIET, "model.from": str(run), "data.path": str(data), "data.seq_len": 32, "schedule.steps": 4,
                 "schedule.batch_size": 2, "eval.every": 2, "eval.batches": 1}
    recipe = load_recipe("instruct-lm").with_overrides(overrides)
    result = train(recipe, tmp_path / "run")
    start = formerkit.load(run / "model")
    state = result.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in start.state_dict().items())
    assert adapter_names(result.model) == ["default"]
    prompt = "<|assistant|>\n"  # (the run reads 32 tokens at most)
    text = "".join(generate_run(tmp_path / "run", prompt, max_new_tokens=4, temperature=0.0))
    ids = torch.tensor([list(prompt.encode())])
    reference = generate(result.model.eval(), ids, max_new_tokens=4, temperature=0.0)[0, ids.shape[1]:]
    assert text == bytes(reference.tolist()).decode("utf-8", "replace")


def test_lora_on_an_int8_base_keeps_the_adapter_separate_and_the_run_puts_it_back(tmp_path):
    """QLoRA's idea on formerkit's int8 weights: merging would re-quantize, so the run saves the int8 base in
    model/ and the adapter beside it; loading the run puts the adapter back on (the same logits and greedy text)."""
    from formerkit.compress.quantize import quantize
    from formerkit.runs import load_run_model

    recipe = adapted_recipe(tmp_path).to_dict()
    formerkit.save(quantize(base_model(), "weight-int8"), tmp_path / "int8")
    recipe["model"] = {"from": str(tmp_path / "int8")}
    result = train(TrainConfig.from_dict(recipe), tmp_path / "run")
    assert formerkit.load_extra(tmp_path / "run" / "model")["adapters"] == "../adapter"
    loaded, _, _ = load_run_model(tmp_path / "run")
    assert adapter_names(loaded) == ["default"]
    tokens = torch.randint(256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), result.model.eval()(tokens))
    prompt = "<|user|>\nsay yes<|end|>\n<|assistant|>\n"
    text = "".join(generate_run(tmp_path / "run", prompt, max_new_tokens=6, temperature=0.0))
    ids = torch.tensor([list(prompt.encode())])
    reference = generate(result.model, ids, max_new_tokens=6, temperature=0.0)[0, ids.shape[1]:]
    assert text == bytes(reference.tolist()).decode("utf-8", "replace")


@pytest.mark.parametrize("adapt", [
    {"method": "adapter", "bottleneck": 8},
    {"method": "prefix", "num_virtual_tokens": 4},
])
def test_adapters_that_cannot_be_merged_are_saved_beside_the_base_and_put_back_on(tmp_path, adapt):
    """A bottleneck adapter (AdaptFormer) or prefixes change the computation, not a weight: the run saves the base
    in model/ and the adapter beside it; loading the run puts it back (the same logits, the same greedy text)."""
    from formerkit.runs import load_run_model

    recipe = adapted_recipe(tmp_path).to_dict()
    recipe["adapt"] = adapt
    result = train(TrainConfig.from_dict(recipe), tmp_path / "run")
    base = formerkit.load(tmp_path / "run" / "model")
    assert not adapter_names(base)
    loaded, _, _ = load_run_model(tmp_path / "run")
    assert adapter_names(loaded) == ["default"]
    tokens = torch.randint(256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), result.model.eval()(tokens))
        assert not torch.allclose(base.eval()(tokens), loaded(tokens))  # the adapter does something
    prompt = "<|user|>\nsay yes<|end|>\n<|assistant|>\n"
    text = "".join(generate_run(tmp_path / "run", prompt, max_new_tokens=6, temperature=0.0))
    ids = torch.tensor([list(prompt.encode())])
    reference = generate(result.model, ids, max_new_tokens=6, temperature=0.0)[0, ids.shape[1]:]
    assert text == bytes(reference.tolist()).decode("utf-8", "replace")


@pytest.mark.parametrize("method, options", [("adapter", {"bottleneck": 8}), ("prefix", {"num_virtual_tokens": 3}),
                                             ("prompt", {"num_virtual_tokens": 3})])
def test_fit_with_a_block_level_adapter_saves_the_bare_base_beside_the_adapter(tmp_path, method, options):
    """A bottleneck adapter, a prefix or a prompt cannot be merged: the run's model/ is the base without them (the
    same weights as before fit) and its adapter/ loaded onto it gives the trained model's outputs."""
    rows = torch.randint(256, (16, 17), generator=torch.Generator().manual_seed(1))
    model = formerkit.add_adapters(base_model(), method=method, **options)
    formerkit.fit(model, rows, out_dir=tmp_path / "run", steps=3, batch_size=4, lr=1e-2, checkpoint_every=100)
    saved = formerkit.load(tmp_path / "run" / "model")
    assert not adapter_names(saved)
    for name, tensor in base_model().state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    loaded = formerkit.load_adapters(saved, tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(rows[:, :-1]), model.eval()(rows[:, :-1]), atol=1e-6)
