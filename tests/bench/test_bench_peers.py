"""Smoke tests of ``formerkit bench lm``, ``bench vision`` and ``bench lora`` on tiny configs: the records follow the
schema, and every library present ran the same work (same shapes, parameter counts within 1%). No timing is
asserted."""

import json
import math

import pytest
import torch

from formerkit.bench.lm import LIBRARIES as LM_LIBRARIES
from formerkit.bench.lm import LMSpec, format_lm, lm_benchmark
from formerkit.bench.lora import LoRASpec, format_lora, lora_benchmark
from formerkit.bench.vision import VisionSpec, format_vision, vision_benchmark
from formerkit.errors import InputError

SCHEMA = {"bench": str, "library": str, "precision": str, "metric": str, "value": float, "unit": str, "params": int,
          "shape": str}
TINY_LM = LMSpec(layers=2, heads=2, width=128, context=32, vocab=65, batch=2, prompt=4, new_tokens=6)


def _check_schema(records):
    json.loads(json.dumps(records))  # plain JSON
    for item in records:
        assert set(item) == set(SCHEMA)
        for key, kind in SCHEMA.items():
            assert isinstance(item[key], kind), (key, item)
        assert math.isfinite(item["value"]) and item["value"] >= 0


def _check_same_work(records, metrics):
    """Every library present has every metric, on the same shape, with parameters within 1% of formerkit's."""
    by_metric = {}
    for item in records:
        by_metric.setdefault((item["bench"], item["precision"], item["metric"]), []).append(item)
    for metric in metrics:
        groups = [group for key, group in by_metric.items() if key[2] == metric]
        assert groups, metric
        for group in groups:
            reference = next(item for item in group if item["library"] == "formerkit")
            assert reference["value"] > 0
            for item in group:
                assert item["shape"] == reference["shape"]
                assert abs(item["params"] - reference["params"]) <= 0.01 * reference["params"], item


@pytest.mark.slow
def test_the_lm_bench_measures_every_present_peer_on_the_same_work():
    records, notes = lm_benchmark(TINY_LM, rounds=1, decode_rounds=1, decode_compile=False,
                                  precisions=("fp32", "bf16-autocast"))
    _check_schema(records)
    _check_same_work(records, ["train_tok_per_s", "infer_tok_per_s", "train_matmul_utilization", "peak_rss_mb",
                               "decode_tok_per_s"])
    ran = {item["library"] for item in records if item["metric"] == "train_tok_per_s"}
    skipped = {note.split()[1].rstrip(":") for note in notes}
    assert {"formerkit", "nanogpt", "transformers"} <= ran  # transformers comes with the dev extra
    assert ran | skipped == set(LM_LIBRARIES) and not ran & skipped
    limits = [item for item in records if item["metric"] == "matmul_gflops"]
    assert {item["precision"] for item in limits} == {"fp32", "bf16-autocast"}
    table = format_lm(records)
    assert "| formerkit | fp32 |" in table and "GFLOP/s" in table


@pytest.mark.slow
def test_the_vision_bench_measures_every_present_peer_on_the_same_work():
    specs = [VisionSpec("CCT", "cct", 16, 64, 2, 2, 2.0, 10, batch=2),
             VisionSpec("ViT", "vit", 32, 64, 2, 2, 4.0, 10, batch=2, patch=8)]
    records, notes = vision_benchmark(specs, rounds=1, precisions=("fp32",))
    _check_schema(records)
    _check_same_work(records, ["train_img_per_s", "infer_img_per_s", "peak_rss_mb"])
    assert {item["bench"] for item in records} == {"vision CCT", "vision ViT"}
    assert "**CCT**" in format_vision(records)


@pytest.mark.slow
def test_the_lm_bench_cli_writes_a_json_list(tmp_path, capsys):
    from formerkit.cli import main

    out = tmp_path / "lm.json"
    assert main(["bench", "lm", "--layers", "1", "--heads", "2", "--width", "64", "--context", "16", "--batch", "2",
                 "--new-tokens", "4", "--rounds", "1", "--precisions", "fp32", "--libraries", "formerkit,nanogpt",
                 "--no-memory", "--no-decode", "--quiet", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    _check_schema(records)
    assert {item["library"] for item in records if item["metric"] == "infer_tok_per_s"} == {"formerkit", "nanogpt"}
    assert "Machine:" in capsys.readouterr().out


def test_bad_bench_settings_are_refused_before_any_work():
    with pytest.raises(InputError, match="divisible"):
        lm_benchmark(LMSpec(width=100, heads=6))
    with pytest.raises(InputError, match="exceed the context"):
        lm_benchmark(LMSpec(context=16, prompt=8, new_tokens=10))
    with pytest.raises(InputError, match="unknown libraries"):
        lm_benchmark(TINY_LM, libraries=("formerkit", "keras"))
    with pytest.raises(InputError, match="rounds"):
        lm_benchmark(TINY_LM, rounds=0)
    with pytest.raises(InputError, match="kind"):
        vision_benchmark([VisionSpec("x", "resnet", 32, 64, 2, 2, 2.0, 10, batch=2)])
    with pytest.raises(InputError, match="patch"):
        vision_benchmark([VisionSpec("x", "vit", 30, 64, 2, 2, 2.0, 10, batch=2, patch=8)])


def test_the_nanogpt_reference_generates_what_its_forward_predicts():
    from formerkit.bench.nanogpt import NanoGPT

    torch.manual_seed(0)
    model = NanoGPT(vocab_size=11, context=8, width=16, layers=1, heads=2).eval()
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, 7)  # runs past the context: only the last 8 tokens are read
    for step in range(7):
        window = out[:, : 3 + step][:, -8:]
        assert out[0, 3 + step] == model(window)[0, -1].argmax()


_LOADED_ONCE = []


def test_training_memory_counts_what_the_warm_up_loads_as_imports():
    """What a library loads on first use (here: 200 MB kept by a warm-up, standing for a lazily imported module) is
    not charged to the model measured after it, while the same memory taken while building is."""
    from formerkit.bench.common import training_memory

    def build():
        model = torch.nn.Linear(8, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def warm_up():
        _LOADED_ONCE.append(torch.ones(50 * 2**20))  # 200 MB, touched
        model, optimizer = build()
        return model, optimizer, torch.randn(4, 8), torch.tensor([0, 1, 0, 1])

    def build_loading():
        _LOADED_ONCE.append(torch.ones(50 * 2**20))
        return build()

    inputs, targets = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    try:
        assert training_memory(build, inputs, targets, "fp32", 1, warm_up) < 50
        assert training_memory(build_loading, inputs, targets, "fp32", 1) > 150
    finally:
        _LOADED_ONCE.clear()


TINY_LORA = LoRASpec(layers=2, heads=4, kv_heads=2, width=64, hidden=96, context=16, vocab=97, batch=2, rank=4,
                     alpha=8, targets=("q", "v", "fc_out"))


@pytest.mark.slow
def test_the_lora_bench_trains_the_same_adapters_in_formerkit_and_peft():
    records, notes = lora_benchmark(TINY_LORA, rounds=1)
    _check_schema(records)
    _check_same_work(records, ["train_tok_per_s", "peak_rss_mb"])
    trainable = {item["library"]: item["value"] for item in records if item["metric"] == "trainable_params"}
    # rank 4 on q [64 -> 64], v [64 -> 32] and fc_out [96 -> 64] in each of 2 layers, in both libraries
    assert trainable == {"formerkit": 2 * 4 * ((64 + 64) + (64 + 32) + (96 + 64)),
                         "transformers+peft": 2 * 4 * ((64 + 64) + (64 + 32) + (96 + 64))}
    assert "| formerkit | fp32 |" in format_lora(records)


def test_bad_lora_bench_settings_are_refused_before_any_work():
    with pytest.raises(InputError, match="targets"):
        lora_benchmark(LoRASpec(targets=("query",)))
    with pytest.raises(InputError, match="kv_heads"):
        lora_benchmark(LoRASpec(heads=8, kv_heads=3))


def test_formerkit_trains_in_bench_lm_as_its_trainer_does():
    """formerkit's contender clips the gradient norm as ``optim.grad_clip`` does by default; the peers do not."""
    from formerkit.bench.common import train_step
    from formerkit.bench.lm import _build
    from formerkit.train.config import OptimConfig

    tiny = LMSpec(layers=1, heads=2, width=16, context=8, vocab=11, batch=2, prompt=1, new_tokens=1)
    assert _build("formerkit", tiny, False).grad_clip == OptimConfig().grad_clip == 1.0
    assert _build("nanogpt", tiny, False).grad_clip is None
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 5)
    inputs, targets = torch.randn(4, 1, 3) * 100, torch.randint(0, 5, (4, 1))
    reference = torch.nn.Linear(3, 5)
    reference.load_state_dict(model.state_dict())
    stepped = []

    class Recording:  # what the optimizer step sees
        def step(self):
            stepped.extend(p.grad.clone() for p in model.parameters())

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    train_step(model, Recording(), inputs, targets, "fp32", grad_clip=0.5)
    loss = torch.nn.functional.cross_entropy(reference(inputs).reshape(-1, 5), targets.reshape(-1))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    assert norm > 0.5  # (the clip does something)
    for got, grad in zip(stepped, grads, strict=True):
        torch.testing.assert_close(got, grad * 0.5 / norm, rtol=1e-5, atol=1e-6)
