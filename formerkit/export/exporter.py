"""``export(model, path, format=...)``: one model to one file that runs without formerkit.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``: the graph is captured by ``torch.export`` (so Python
branches on tensor values are refused instead of being frozen at the example's values, as the legacy TorchScript
tracer did), then translated by onnxscript at opset 18. Token models take ``input_ids`` [batch, sequence] (and
``attention_mask``, 1 for a real token), image models ``pixel_values`` [batch, channels, height, width], numeric
sequence models ``inputs`` [batch, steps, input_dim]; every model gives ``logits``. Batch and sequence stay dynamic.

The sequence axis has a limit, the model's ``max_seq_len`` (its position table or rotary cache ends there). An ONNX
graph has no operator that refuses an input with a message, and onnxruntime fed a longer sequence fails deep inside
with an index error that names no limit. So the limit is written where runners look: in the ONNX file's metadata
(``formerkit.max_seq_len``, read with ``session.get_modelmeta().custom_metadata_map``), in the JSON sidecar
(``max_seq_len``), and ``run_onnx`` checks it before calling onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerkit.checkpoint import load, load_extra
from formerkit.errors import ExportError, InputError
from formerkit.runs import model_dir

__all__ = ["FORMATS", "MAX_SEQ_LEN_KEY", "export", "export_run", "run_onnx"]

FORMATS = ("onnx", "torch-export")
OPSET = 18
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
# The ONNX metadata key holding the longest sequence the graph takes.
MAX_SEQ_LEN_KEY = "formerkit.max_seq_len"


class _LogitsOnly(nn.Module):
    """The model called with named tensors only, returning the logits tensor (what an exported graph can hold)."""

    def __init__(self, model: nn.Module, with_mask: bool):
        super().__init__()
        self.model = model
        self.with_mask = with_mask

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.with_mask:
            return self.model(inputs, attention_mask=attention_mask)
        return self.model(inputs)


def _unsupported_parts(config) -> list[str]:
    """Parts whose forward an exported graph cannot hold, each with what to do instead."""
    parts = []
    if config.attention.kind == "linear":
        parts.append("attention.kind: expected 'softmax' or 'l2', got 'linear' (causal linear attention runs chunk by "
                     "chunk over the sequence, which fixes the sequence length in the graph); run it in PyTorch or "
                     "export a model with softmax attention")
    if config.feedforward.num_experts:
        parts.append(f"feedforward.num_experts: expected None, got {config.feedforward.num_experts} (mixture-of-"
                     "experts dispatch gathers each expert's tokens by their router values, a data-dependent shape "
                     "the exporters cannot hold); run it in PyTorch")
    if config.arch == "encoder_decoder":
        parts.append("arch 'encoder_decoder' (two inputs and a cross-attention cache): export is for encoders and "
                     "decoders; export a decoder-only or encoder model instead")
    return parts


def _input_name(config) -> str:
    return {"tokens": "input_ids", "linear": "inputs"}.get(config.stem.kind, "pixel_values")


def _default_example(config, batch: int = 2) -> Tensor:
    stem = config.stem
    if stem.kind == "tokens":
        return torch.randint(0, stem.vocab_size, (batch, min(8, config.max_seq_len)))
    if stem.kind == "linear":
        return torch.randn(batch, min(8, config.max_seq_len), stem.input_dim)
    if stem.image_size is None:
        raise ExportError(f"stem.image_size: expected the image size the model was built for, got None; pass "
                          f"example=<a [batch, {stem.in_channels}, height, width] tensor>")
    return torch.randn(batch, stem.in_channels, *stem.image_size)


def export(model: nn.Module, path: str | Path, format: str = "onnx", *, example: Tensor | None = None,
           attention_mask: bool | None = None) -> dict[str, Any]:
    """Writes ``model`` (eval mode) to ``path`` as ``format`` and returns a description of the file's interface:
    input names, output names, dynamic axes (by input, axis index -> name), format and opset.

    example: one input batch to trace with (default: random tokens [2, 8] or images of the configured size).
    attention_mask: give token models an ``attention_mask`` input too (default True for token models).
    """
    if format not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"model: expected a formerkit model (with a .config), got {type(model).__name__}")
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        raise ExportError(f"model: a quantized model ({quantization['mode']}) cannot be exported: its int8 layers are "
                          "torch.ao or formerkit modules the exporters do not hold; export the float run instead "
                          "(onnxruntime has its own int8 quantization for the exported file)")
    parts = _unsupported_parts(config)
    if parts:
        raise ExportError(f"{format}: cannot export " + "; ".join(parts))
    name = _input_name(config)
    tokens = config.stem.kind == "tokens"
    if attention_mask is None:
        attention_mask = tokens
    if attention_mask and not tokens:
        raise ExportError(f"attention_mask: expected False for a '{config.stem.kind}' stem (only token models take "
                          f"one), got True")
    example = _default_example(config) if example is None else example
    if example.shape[0] < 2 or (config.stem.kind != "patches" and config.stem.kind != "conv" and example.shape[1] < 2):
        # torch.export specializes sizes 0 and 1 to constants; an example of 2 or more keeps the axes dynamic.
        raise ExportError(f"example: expected at least 2 samples (and 2 tokens) so the axes stay dynamic, got shape "
                          f"{tuple(example.shape)}")
    batch = torch.export.Dim("batch")
    shapes: dict[int, Any] = {0: batch}
    axes = {0: "batch"}
    if config.stem.kind in ("tokens", "linear"):
        shapes[1] = torch.export.Dim("sequence", max=config.max_seq_len)
        axes[1] = "sequence"
    input_names, args, dynamic = [name], [example], [shapes]
    dynamic_axes = {name: dict(axes)}
    if attention_mask:
        input_names.append("attention_mask")
        args.append(torch.ones(example.shape[:2], dtype=torch.long))
        dynamic.append(dict(shapes))
        dynamic_axes["attention_mask"] = dict(axes)
    head = config.head.kind
    dynamic_axes["logits"] = dict(axes) if head in ("lm", "masked_lm", "none") else {0: "batch"}  # per token or pooled
    wrapper = _LogitsOnly(model, attention_mask)
    was_training = model.training
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if format == "onnx":
                _export_onnx(wrapper, tuple(args), path, input_names, tuple(dynamic),
                             config.max_seq_len if "sequence" in axes.values() else None)
            else:
                program = torch.export.export(wrapper, tuple(args), dynamic_shapes=tuple(dynamic))
                torch.export.save(program, path)
    except ExportError:
        raise
    except Exception as error:  # the exporters raise many kinds; name the model's parts that may be why
        raise ExportError(f"{format}: expected a model whose forward {format} can capture, but capturing it failed "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
                          f"parts of this model: {_describe(config)}") from error
    finally:
        model.train(was_training)
    return {"format": format, "file": path.name, "inputs": input_names, "outputs": ["logits"],
            "dynamic_axes": {key: {str(axis): value for axis, value in names.items()}
                             for key, names in dynamic_axes.items()},
            "opset": OPSET if format == "onnx" else None, "arch": config.arch, "stem": config.stem.kind,
            "head": head, "max_seq_len": config.max_seq_len}


def _export_onnx(wrapper: nn.Module, args: tuple, path: Path, input_names: list[str], dynamic: tuple,
                 max_seq_len: int | None) -> None:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)
    except ImportError:
        raise ExportError("onnx: expected the onnx and onnxscript packages, got neither installed; "
                          "pip install 'formerkit[export]'") from None
    import logging

    exporter_log = logging.getLogger("torch.onnx")  # quiet notes such as "torchvision is not installed"
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=["logits"], dynamic_shapes=dynamic, external_data=False,
                                    verbose=False, optimize=True)
    finally:
        exporter_log.setLevel(level)
    program.save(str(path))
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    if max_seq_len is not None:  # the limit the graph cannot check itself, where runners can read it
        onnx.helper.set_model_props(graph, {MAX_SEQ_LEN_KEY: str(max_seq_len)})
        graph.doc_string = (f"formerkit model: the sequence axis (axis 1 of {input_names[0]}) takes at most "
                            f"{max_seq_len} tokens; longer inputs fail inside onnxruntime with an index error")
        onnx.save(graph, str(path))
    # A safety net: an axis the graph fixed (a size-dependent Python branch) would make other shapes fail at run time.
    for value in graph.graph.input:
        dims = value.type.tensor_type.shape.dim
        fixed = [index for index in dynamic[input_names.index(value.name)] if dims[index].HasField("dim_value")]
        if fixed:
            path.unlink()
            raise ExportError(f"onnx: expected input {value.name!r} to keep axes {fixed} dynamic, got them fixed to "
                              f"{[dims[index].dim_value for index in fixed]} by the graph; a part of this model "
                              "depends on that size")


def run_onnx(path: str | Path, inputs: dict[str, Any], session=None):
    """Runs an exported ONNX file with onnxruntime on ``inputs`` (name -> array) and returns its logits, after
    checking the sequence length against the limit the file records (``formerkit.max_seq_len``): a longer input is
    an ``InputError`` naming the limit instead of onnxruntime's index error. ``session``: an
    ``onnxruntime.InferenceSession`` of ``path`` to reuse."""
    import numpy as np

    if session is None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
    limit = session.get_modelmeta().custom_metadata_map.get(MAX_SEQ_LEN_KEY)
    feed = {name: np.asarray(value) for name, value in inputs.items()}
    for name, value in feed.items():
        if limit is not None and value.ndim >= 2 and value.shape[1] > int(limit):
            raise InputError(f"{name}: {value.shape[1]} tokens, but {Path(path).name} takes at most {limit} (the "
                             f"model's max_seq_len); cut the input to its last {limit} tokens")
    return session.run(["logits"], feed)[0]


def _describe(config) -> str:
    attention, feedforward = config.attention, config.feedforward
    parts = [f"arch={config.arch}", f"attention.kind={attention.kind}", f"position={config.position.kind}"]
    if attention.sliding_window:
        parts.append(f"attention.sliding_window={attention.sliding_window}")
    if getattr(feedforward, "num_experts", None):
        parts.append(f"feedforward.num_experts={feedforward.num_experts}")
    return ", ".join(parts)


def export_run(target: str | Path, format: str = "onnx", out: str | Path | None = None) -> tuple[Path, Path]:
    """Exports the model of a run directory (or a model directory) and writes a JSON sidecar beside the file with
    its interface and the run's preprocessing (image normalization, tokenizer path), so it runs without formerkit.
    The file goes next to the model directory by default (``runs/x/model.onnx``). Returns (file, sidecar)."""
    if format not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    directory = model_dir(target)
    model = load(directory).eval()
    path = Path(out) if out is not None else directory.with_name(directory.name + _SUFFIX[format])
    info = export(model, path, format)
    extra = load_extra(directory)
    info["preprocessing"] = extra.get("preprocessing")
    info["objective"] = extra.get("objective")
    tokenizer = directory / "tokenizer.json"
    info["tokenizer"] = str(tokenizer.resolve()) if tokenizer.exists() else None
    if info["max_seq_len"] is not None and "sequence" in info["dynamic_axes"].get(info["inputs"][0], {}).values():
        info["limits"] = (f"the sequence axis takes at most {info['max_seq_len']} tokens (max_seq_len); onnxruntime "
                          "fails on longer inputs with an index error, so cut them first (formerkit.export.run_onnx "
                          "checks)")
    sidecar = path.with_name(path.name + ".json")
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return path, sidecar
