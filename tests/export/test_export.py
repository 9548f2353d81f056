"""Export to ONNX (run by onnxruntime in a process that never imports formerkit) and to torch.export programs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import formerkit
from formerkit.errors import ExportError
from formerkit.export import export

from ..conftest import token_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Runs an ONNX file on the inputs of an .npz (one array per name, suffixed #case) with onnxruntime alone.
_RUNNER = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1])
inputs = np.load(sys.argv[2])
cases = sorted({key.split("#")[1] for key in inputs.files}, key=int)
outputs = {}
for case in cases:
    feed = {key.split("#")[0]: inputs[key] for key in inputs.files if key.endswith("#" + case)}
    outputs["logits#" + case] = session.run(["logits"], feed)[0]
assert not any(name.startswith("formerkit") for name in sys.modules), "formerkit was imported"
np.savez(sys.argv[3], **outputs)
"""


def _run_onnx_alone(path: Path, cases: list[dict[str, torch.Tensor]], tmp_path: Path) -> list[np.ndarray]:
    arrays = {f"{name}#{index}": tensor.numpy() for index, case in enumerate(cases) for name, tensor in case.items()}
    np.savez(tmp_path / "inputs.npz", **arrays)
    subprocess.run([sys.executable, "-c", _RUNNER, str(path), str(tmp_path / "inputs.npz"),
                    str(tmp_path / "outputs.npz")], check=True, cwd=tmp_path)
    outputs = np.load(tmp_path / "outputs.npz")
    return [outputs[f"logits#{index}"] for index in range(len(cases))]


def _decoder(position: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = token_config(vocab_size=50, max_seq_len=64, attention={"num_kv_heads": 2}, position=position)
    return formerkit.build_model(config.replace(**overrides)).eval()


def _token_cases() -> list[dict[str, torch.Tensor]]:
    """Two batch sizes and two lengths (the axes are dynamic), without and with right padding."""
    generator = torch.Generator().manual_seed(1)
    cases = []
    for batch, length, padded in [(2, 9, False), (3, 23, True), (1, 5, False), (4, 40, True)]:
        ids = torch.randint(0, 50, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        if padded:
            mask[0, length - 4:] = 0
            mask[-1, length // 2:] = 0
        cases.append({"input_ids": ids, "attention_mask": mask})
    return cases


def _assert_matches_on_real_tokens(model, cases, outputs) -> None:
    for case, output in zip(cases, outputs):
        expected = model(case["input_ids"], attention_mask=case["attention_mask"]).detach().numpy()
        real = case["attention_mask"].bool().numpy()  # padded positions predict nothing anyone reads
        assert output.shape == expected.shape
        np.testing.assert_allclose(output[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("position", ["rope", "learned", "relative"])
@pytest.mark.slow
def test_decoder_lm_onnx_runs_in_onnxruntime_alone_with_dynamic_batch_and_length(position, tmp_path):
    model = _decoder(position)
    info = export(model, tmp_path / "lm.onnx")
    assert info["inputs"] == ["input_ids", "attention_mask"] and info["outputs"] == ["logits"]
    assert info["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    cases = _token_cases()
    _assert_matches_on_real_tokens(model, cases, _run_onnx_alone(tmp_path / "lm.onnx", cases, tmp_path))


@pytest.mark.slow
def test_gemma_style_decoder_exports_to_onnx(tmp_path):
    # Capped scores (written out, not SDPA), offset norms, scaled embeddings, the window layers' own rotary tables.
    model = _decoder("rope", **{"norm.kind": "rmsnorm", "norm.weight_offset": 1.0, "norm.placement": "sandwich",
                                "stem.scale_embeddings": True, "attention.softcap": 2.0, "attention.qk_norm": True,
                                "attention.sliding_window": 8, "attention.sliding_window_layers": [0],
                                "position.rope_local_base": 100.0, "feedforward.activation": "geglu_tanh",
                                "head.logit_softcap": 5.0})
    export(model, tmp_path / "gemma.onnx")
    cases = _token_cases()
    _assert_matches_on_real_tokens(model, cases, _run_onnx_alone(tmp_path / "gemma.onnx", cases, tmp_path))


@pytest.mark.slow
def test_sliding_window_decoder_exports_to_onnx(tmp_path):
    # The blockwise window path is plain tensor code in eval mode (its custom backward is for training only).
    model = _decoder("rope", **{"attention.sliding_window": 8})
    export(model, tmp_path / "window.onnx")
    cases = _token_cases()
    _assert_matches_on_real_tokens(model, cases, _run_onnx_alone(tmp_path / "window.onnx", cases, tmp_path))


@pytest.mark.slow
def test_vit_classifier_onnx_takes_pixel_values_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = formerkit.create_model("vit_tiny_patch16_224", image_size=16, patch_size=4, num_classes=5, width=32,
                                   num_layers=2, **{"attention.num_heads": 4}).eval()
    info = export(model, tmp_path / "vit.onnx")
    assert info["inputs"] == ["pixel_values"] and info["dynamic_axes"]["pixel_values"] == {"0": "batch"}
    cases = [{"pixel_values": torch.randn(batch, 3, 16, 16)} for batch in (2, 5)]
    for case, output in zip(cases, _run_onnx_alone(tmp_path / "vit.onnx", cases, tmp_path)):
        assert output.shape == (case["pixel_values"].shape[0], 5)
        np.testing.assert_allclose(output, model(case["pixel_values"]).detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_encoder_onnx_matches_pytorch_with_padding(tmp_path):
    torch.manual_seed(0)
    config = token_config("encoder", vocab_size=50, max_seq_len=64, position="learned", head="masked_lm")
    model = formerkit.build_model(config).eval()
    export(model, tmp_path / "encoder.onnx")
    cases = _token_cases()
    _assert_matches_on_real_tokens(model, cases, _run_onnx_alone(tmp_path / "encoder.onnx", cases, tmp_path))


@pytest.mark.slow
def test_torch_export_round_trip_gives_the_same_logits(tmp_path):
    model = _decoder("rope")
    info = export(model, tmp_path / "lm.pt2", format="torch-export")
    assert info["format"] == "torch-export"
    program = torch.export.load(tmp_path / "lm.pt2")
    for case in _token_cases():
        expected = model(case["input_ids"], attention_mask=case["attention_mask"])
        got = program.module()(case["input_ids"], case["attention_mask"])
        real = case["attention_mask"].bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("overrides", "part"), [
    ({"attention.kind": "linear"}, "attention.kind"),
    ({"feedforward.num_experts": 4, "feedforward.experts_per_token": 2}, "feedforward.num_experts"),
])
@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_parts_the_exporters_cannot_hold_are_refused_by_name(overrides, part, format, tmp_path):
    model = _decoder("rope", **overrides)
    with pytest.raises(ExportError, match=part):
        export(model, tmp_path / "model.file", format=format)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ExportError, match="expected one of onnx, torch-export, got 'tflite'"):
        export(_decoder("rope"), tmp_path / "model.tflite", format="tflite")


@pytest.mark.slow
def test_cli_export_writes_the_file_next_to_the_model_dir_and_a_sidecar(tmp_path):
    from formerkit.cli import main

    model = _decoder("learned")
    preprocessing = {"tokenizer": {"kind": "byte"}, "seq_len": 32}
    formerkit.save(model, tmp_path / "run" / "model", extra={"preprocessing": preprocessing, "objective": "causal_lm"})
    assert main(["export", str(tmp_path / "run"), "--format", "onnx"]) == 0
    assert (tmp_path / "run" / "model.onnx").exists()
    sidecar = json.loads((tmp_path / "run" / "model.onnx.json").read_text())
    assert sidecar["inputs"] == ["input_ids", "attention_mask"]
    assert sidecar["preprocessing"] == preprocessing and sidecar["opset"] == 18
    assert main(["export", str(tmp_path / "run" / "model"), "--format", "torch-export",
                 "--out", str(tmp_path / "x" / "lm.pt2")]) == 0
    assert (tmp_path / "x" / "lm.pt2").exists() and (tmp_path / "x" / "lm.pt2.json").exists()


@pytest.mark.slow
def test_torch_export_file_loads_and_runs_without_formerkit(tmp_path):
    export(_decoder("learned"), tmp_path / "lm.pt2", format="torch-export")
    script = ("import sys, torch\n"
              "program = torch.export.load(sys.argv[1])\n"
              "logits = program.module()(torch.randint(0, 50, (3, 11)), torch.ones(3, 11, dtype=torch.long))\n"
              "assert logits.shape == (3, 11, 50), logits.shape\n"
              "assert not any(name.startswith('formerkit') for name in sys.modules)\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "lm.pt2")], check=True, cwd=tmp_path)


@pytest.mark.slow
def test_a_pruned_decoder_exports_to_onnx(tmp_path):
    """Pruning leaves layers with fewer heads and narrower feed-forward layers (per-layer config fields): the
    exported graph must carry them, giving the pruned model's logits."""
    from formerkit.compress.prune import prune

    model = _decoder("rope", **{"attention.num_kv_heads": 4})
    pruned, record = prune(model, heads=0.25, ffn=0.5)
    pruned.eval()
    assert pruned.config.to_dict() != model.config.to_dict()
    export(pruned, tmp_path / "pruned.onnx")
    cases = _token_cases()
    _assert_matches_on_real_tokens(pruned, cases, _run_onnx_alone(tmp_path / "pruned.onnx", cases, tmp_path))


@pytest.mark.slow
def test_onnx_files_record_their_length_limit_and_run_onnx_refuses_longer_inputs_by_name(tmp_path):
    import onnxruntime

    from formerkit.errors import InputError
    from formerkit.export import MAX_SEQ_LEN_KEY, export_run, run_onnx

    model = _decoder("rope", max_seq_len=16)
    formerkit.save(model, tmp_path / "run" / "model", extra={"objective": "causal_lm"})
    path, sidecar = export_run(tmp_path / "run")
    info = json.loads(sidecar.read_text())
    assert info["max_seq_len"] == 16 and "at most 16 tokens" in info["limits"]
    session = onnxruntime.InferenceSession(str(path))
    assert session.get_modelmeta().custom_metadata_map[MAX_SEQ_LEN_KEY] == "16"
    ids = np.random.default_rng(0).integers(0, 50, (2, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    expected = model(torch.as_tensor(ids)).detach().numpy()
    np.testing.assert_allclose(run_onnx(path, feed, session=session), expected, atol=1e-4, rtol=0)
    longer = {name: np.concatenate([value, value[:, :1]], axis=1) for name, value in feed.items()}
    with pytest.raises(InputError, match=r"input_ids: 17 tokens, but model\.onnx takes at most 16 \(the model's "
                                         r"max_seq_len\)"):
        run_onnx(path, longer, session=session)
