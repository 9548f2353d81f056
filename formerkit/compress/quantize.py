"""Int8 quantization of a trained model's Linear layers, saved and loaded like any model.

Two modes, both with int8 weights, one scale per output channel (symmetric, zero point 0):

- ``dynamic-int8``: PyTorch's dynamic quantization (``torch.ao``): activations are quantized on the fly, row by row,
  and the products run in int8 through the CPU's quantized engine (fbgemm/oneDNN). CPU only. Fastest on CPUs with int8
  instructions (AVX-512 VNNI / AMX).
- ``weight-int8``: weight-only: activations stay in floating point; the int8 weights are dequantized at each call
  and multiplied by the float kernels. Any device. A quarter of the weight bytes on disk and in memory at rest, the
  activations' precision unchanged; not faster (dequantizing costs a little on every call): it is for size.

What is quantized: the Linear layers of the Transformer's blocks (attention projections, feed-forward layers and
experts). The stem (embeddings, patch and convolutional tokenizers), norms and the head stay in floating point: they
are a small share of the work, and an LM head tied to the embedding must stay one tensor.

This module is the tool (choosing the layers, rounding the weights, the ``quantize`` command); the int8 layers and
how a quantized model is stored and rebuilt are ``formerkit.nn.int8``, which ``formerkit.checkpoint`` uses to save and
load quantized models like any other.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from torch import nn

from formerkit.checkpoint import load, load_extra, read_document, save
from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.nn.int8 import MODES, install_int8_layers, is_quantized, per_channel_int8
from formerkit.runs import model_dir

__all__ = ["per_channel_int8", "quantize", "quantize_run"]


def _target_names(model: nn.Module) -> list[str]:
    """The Linear layers quantization replaces: those inside the encoder's and decoder's blocks."""
    names = []
    for stack in ("encoder", "decoder"):
        part = getattr(model, stack, None)
        if part is None:
            continue
        names += [f"{stack}.{name}" for name, module in part.named_modules() if type(module) is nn.Linear]
    return names


def _check_model(model: nn.Module, mode: str) -> None:
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise InputError(f"quantize: expected a formerkit model (with a .config), got {type(model).__name__}")
    if mode not in MODES:
        raise InputError(f"quantize: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if is_quantized(model):
        raise InputError(f"quantize: this model is already quantized ({model.quantization['mode']}); quantize the "
                         "float model (the run it came from) instead")
    device = next(model.parameters()).device
    if mode == "dynamic-int8" and device.type != "cpu":
        raise InputError(f"quantize: dynamic-int8 runs on the CPU only, the model is on {device}; move it to the CPU "
                         "first or use weight-int8")
    if not _target_names(model):
        raise InputError("quantize: the model has no Linear layers in its blocks to quantize")


def quantize(model: nn.Module, mode: str = "dynamic-int8") -> nn.Module:
    """A quantized copy of ``model`` (a formerkit model; left unchanged), in eval mode. See the module docstring."""
    _check_model(model, mode)
    quantized = copy.deepcopy(model)
    layers = {}
    for name in _target_names(quantized):
        linear = quantized.get_submodule(name)
        layers[name] = (*per_channel_int8(linear.weight), linear.bias)
    return install_int8_layers(quantized, mode, layers)


def quantize_run(target: str | Path, mode: str, out: str | Path) -> Path:
    """Quantizes the model of a run directory (or a model directory a run saved) into the model directory ``out``,
    with the run's recipe and preprocessing (and tokenizer) beside it, so ``eval``, ``generate``, ``compare`` accept
    it. Returns ``out``."""
    if mode not in MODES:
        raise InputError(f"quantize: --mode must be one of {', '.join(MODES)}, got {mode!r}")
    directory = model_dir(target)
    record = read_document(directory).get("quantization")
    if record:
        raise InputError(f"quantize: {directory} is already quantized ({record.get('mode')}); quantize the float "
                         "run it came from instead")
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise InputError(f"quantize: --out {out} is the model being quantized; choose another directory")
    model = quantize(load(directory).eval(), mode)
    save(model, out, extra=load_extra(directory))
    tokenizer = directory / "tokenizer.json"
    if tokenizer.exists():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out
