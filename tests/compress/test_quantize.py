"""Quantization: int8 layers against explicit references, save/load round trips, the CLI, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import formerkit
from formerkit.checkpoint import load, save
from formerkit.cli import main
from formerkit.compress.quantize import quantize
from formerkit.errors import FormerkitError
from formerkit.nn.int8 import Int8WeightLinear, is_quantized
from formerkit.runs import evaluate_run

from ..conftest import token_config


def _model(kind: str, randomize) -> torch.nn.Module:
    if kind == "lm":  # a decoder whose head is tied to the embedding
        config = token_config(vocab_size=40, head={"kind": "lm", "tie_embeddings": True})
    else:  # an encoder classifier with mean pooling and a gated feed-forward
        config = token_config("encoder", vocab_size=40, feedforward={"activation": "swiglu"},
                              head={"kind": "classification", "num_classes": 5, "pooling": "mean"})
    model = formerkit.build_model(config)
    randomize(model, 3)
    return model.eval()


def _inputs(batch: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(5))


def _dequantized_reference(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """The float model with each quantized layer's weight replaced by its int8 values times their scales."""
    reference = copy.deepcopy(model)
    for name in quantized.quantization["modules"]:
        layer = quantized.get_submodule(name)
        weight = (layer.weight_int8.float() * layer.weight_scale.unsqueeze(1) if isinstance(layer, Int8WeightLinear)
                  else layer._weight_bias()[0].dequantize())
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(weight)
    return reference


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_weight_int8_equals_the_float_model_with_dequantized_weights(kind, randomize):
    model = _model(kind, randomize)
    quantized = quantize(model, "weight-int8")
    x = _inputs()
    with torch.no_grad():
        expected = _dequantized_reference(model, quantized)(x)
        got = quantized(x)
        original = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Every Linear of the blocks, and nothing else, is int8; rounding to int8 moves the outputs, a little.
    names = quantized.quantization["modules"]
    assert names and all(name.startswith(("encoder.blocks.", "decoder.blocks.")) for name in names)
    assert all(isinstance(quantized.get_submodule(name), Int8WeightLinear) for name in names)
    assert (got - original).abs().max() > 0
    assert (got - original).abs().max() < 0.05 * original.abs().max()
    # The weights differ from the float ones by at most half a step of their channel's scale.
    for name in names:
        layer = quantized.get_submodule(name)
        step = layer.weight_scale.unsqueeze(1)
        assert ((model.get_submodule(name).weight - layer.weight_int8.float() * step).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_dynamic_int8_matches_its_weights_up_to_activation_rounding(kind, randomize):
    model = _model(kind, randomize)
    quantized = quantize(model, "dynamic-int8")
    assert type(quantized.get_submodule(quantized.quantization["modules"][0])).__name__ == "Linear"  # torch.ao's
    x = _inputs()
    with torch.no_grad():
        expected = _dequantized_reference(model, quantized)(x)
        got = quantized(x)
    # Activations are rounded to 8 bits per tensor on the way into each layer: a small relative error remains.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert not torch.equal(got, expected)
    assert model.get_submodule(quantized.quantization["modules"][0]).weight.dtype == torch.float32  # untouched


@pytest.mark.parametrize("mode", ["dynamic-int8", "weight-int8"])
@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_quantized_models_save_and_load_to_identical_outputs(mode, kind, randomize, tmp_path):
    quantized = quantize(_model(kind, randomize), mode)
    save(quantized, tmp_path / "q", extra={"note": "kept"})
    document = json.loads((tmp_path / "q" / "config.json").read_text())
    assert document["quantization"] == {"mode": mode, "modules": quantized.quantization["modules"]}
    assert document["extra"] == {"note": "kept"}
    loaded = load(tmp_path / "q")
    assert is_quantized(loaded) and loaded.quantization == quantized.quantization
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    if kind == "lm":  # the tied head was saved once and is tied again
        assert loaded.head.projection.weight is loaded.stem.tokens.weight
    # int8 weights: the file is about a quarter of the float one (the float embedding and norms remain).
    save(_model(kind, randomize), tmp_path / "f")
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("q", "f")]
    assert sizes[0] < 0.6 * sizes[1]


def test_a_quantized_file_missing_a_layer_is_refused(randomize, tmp_path):
    from safetensors.torch import load_file, save_file

    save(quantize(_model("classifier", randomize), "weight-int8"), tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["encoder.blocks.0.attention.qkv.weight_int8"]
    save_file(tensors, str(weights))
    document = json.loads((tmp_path / "q" / "config.json").read_text())
    document["weights"].pop("sha256"), document["weights"].pop("bytes")
    (tmp_path / "q" / "config.json").write_text(json.dumps(document))
    with pytest.raises(FormerkitError, match="encoder.blocks.0.attention.qkv"):
        load(tmp_path / "q")


def test_quantize_refuses_what_it_cannot_do(randomize):
    model = _model("classifier", randomize)
    with pytest.raises(FormerkitError, match="one of dynamic-int8, weight-int8"):
        quantize(model, "int4")
    with pytest.raises(FormerkitError, match="already quantized \\(weight-int8\\)"):
        quantize(quantize(model, "weight-int8"), "dynamic-int8")
    with pytest.raises(FormerkitError, match="CPU only"):
        quantize(copy.deepcopy(model).to("meta"), "dynamic-int8")
    with pytest.raises(FormerkitError, match="formerkit model"):
        quantize(torch.nn.Linear(2, 2), "weight-int8")
    from formerkit.export import export

    with pytest.raises(FormerkitError, match="quantized model \\(weight-int8\\) cannot be exported"):
        export(quantize(model, "weight-int8"), "never.onnx")


@pytest.mark.slow
def test_cli_quantize_gives_a_model_directory_eval_and_compare_accept(tiny_classifier_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(tiny_classifier_run), "--mode", "dynamic-int8", "--out", str(out)]) == 0
    model = load(out)
    assert model.quantization["mode"] == "dynamic-int8"
    # eval on the directory is the run's own evaluation of the quantized model.
    expected = quantize(load(tiny_classifier_run / "model"), "dynamic-int8")
    metrics = evaluate_run(out, ["test"])
    with torch.no_grad():
        from formerkit.data import build_data
        from formerkit.runs import load_run_model

        _, recipe, _ = load_run_model(tiny_classifier_run)
        test = build_data(recipe.data).test
        logits = expected(test.tensors["inputs"])
    assert metrics["test_accuracy"] == pytest.approx((logits.argmax(-1) == test.tensors["labels"]).float().mean()
                                                     .item())
    assert main(["compare", str(tiny_classifier_run), str(out), "--out", str(tmp_path / "cmp"), "--repeats", "1",
                 "--batch-sizes", "4"]) == 0
    assert "(dynamic-int8)" in (tmp_path / "cmp" / "compare.md").read_text()
    # A quantized directory is not quantized twice.
    capsys.readouterr()
    assert main(["quantize", str(out), "--mode", "weight-int8", "--out", str(tmp_path / "twice")]) != 0
    assert "already quantized (dynamic-int8); quantize the float run" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
