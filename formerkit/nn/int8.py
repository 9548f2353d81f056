"""The int8 storage format of quantized models: the int8 Linear layers, the tensors a quantized model is saved as, and
the rebuild of a saved one from its quantization record.

It lives below ``formerkit.checkpoint``, which saves and loads quantized models like any other;
``formerkit.compress.quantize`` (the tool that quantizes a float model) builds on it.

Two modes, both with int8 weights, one scale per output channel (symmetric, zero point 0):

- ``dynamic-int8``: PyTorch's dynamic quantization (``torch.ao``): activations are quantized on the fly, row by row,
  and the products run in int8 through the CPU's quantized engine (fbgemm/oneDNN). CPU only.
- ``weight-int8``: weight-only: activations stay in floating point; the int8 weights are dequantized at each call
  and multiplied by the float kernels. Any device.

On disk a quantized model is an ordinary model directory: ``config.json`` records ``"quantization": {"mode",
"modules"}`` beside the (float) model config, and ``model.safetensors`` holds each quantized layer's ``weight_int8``,
``weight_scale`` and ``bias`` and the float tensors of everything else.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from formerkit.errors import CheckpointError

__all__ = ["MODES", "Int8WeightLinear", "install_int8_layers", "is_quantized", "per_channel_int8", "quantized_state",
           "rebuild_quantized"]

MODES = ("dynamic-int8", "weight-int8")


def per_channel_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (int8 weight [out, in], float32 scale [out]) with weight ~ int8 * scale."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8), scale


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    """Where a tensor's data lives: two names with the same key are one tensor (a tied LM head and embedding)."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


class Int8WeightLinear(nn.Module):
    """A Linear layer with int8 weights and one float scale per output channel; activations stay float."""

    def __init__(self, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        # Dequantized per call and multiplied by the float kernels. (torch._weight_int8pack_mm, the fused kernel,
        # measured 2.6x slower than this at one row and 100x slower at 4096 rows with torch 2.13 on an AVX-512 CPU.)
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights per channel"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dynamic_linear(weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> nn.Module:
    """A torch.ao dynamic int8 Linear holding these weights, packed for oneDNN where torch has it: on this
    project's reference CPU (AVX-512 VNNI) oneDNN's int8 products made CCT-7 ~10% faster than the default x86
    engine (fbgemm). The packed weights carry their engine, so the global engine setting is restored after."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    try:
        if "onednn" in engines:
            torch.backends.quantized.engine = "onednn"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices: nothing the caller can act on
            layer = DynamicLinear(weight_int8.shape[1], weight_int8.shape[0], bias_=bias is not None,
                                  dtype=torch.qint8)
            qweight = torch._make_per_channel_quantized_tensor(
                weight_int8, weight_scale.double(), torch.zeros(len(weight_scale), dtype=torch.long), 0)
            layer.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    finally:
        torch.backends.quantized.engine = previous
    return layer


def install_int8_layers(model: nn.Module, mode: str,
                        layers: dict[str, tuple[Tensor, Tensor, Tensor | None]]) -> nn.Module:
    """Replaces each named Linear of ``model`` by its int8 layer of ``mode`` (from int8 weight, scale and bias), then
    puts the model in eval mode, frozen (int8 weights are not trained; the float rest is frozen with them), with its
    quantization record."""
    for name, (weight_int8, weight_scale, bias) in layers.items():
        layer = (_dynamic_linear(weight_int8, weight_scale, bias) if mode == "dynamic-int8"
                 else Int8WeightLinear(weight_int8, weight_scale, bias))
        _set_module(model, name, layer)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.quantization = {"mode": mode, "modules": list(layers)}
    return model


def _layer_tensors(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
    """(int8 weight, float scale, bias) of a quantized layer of either mode."""
    if isinstance(layer, Int8WeightLinear):
        return layer.weight_int8, layer.weight_scale, layer.bias
    weight, bias = layer._weight_bias()
    return weight.int_repr(), weight.q_per_channel_scales().float(), bias


def quantized_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a quantized model is saved as: each quantized layer's ``weight_int8``, ``weight_scale`` and
    ``bias``, and the float model's other tensors (a tensor shared by two names, such as a tied embedding, once)."""
    names = model.quantization["modules"]
    tensors: dict[str, Tensor] = {}
    for name in names:
        weight_int8, weight_scale, bias = _layer_tensors(model.get_submodule(name))
        tensors[f"{name}.weight_int8"] = weight_int8.contiguous()
        tensors[f"{name}.weight_scale"] = weight_scale.contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    inside = tuple(f"{name}." for name in names)
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        if key.startswith(inside) or not isinstance(tensor, Tensor):
            continue
        identity = _storage_key(tensor)
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.detach().contiguous()
    return tensors


def rebuild_quantized(model: nn.Module, record: dict, tensors: dict[str, Tensor], source: str) -> nn.Module:
    """Turns a freshly built float ``model`` into the quantized model saved as ``tensors`` (see ``quantized_state``).
    ``record`` is config.json's "quantization" entry; ``source`` names the file in errors."""
    mode, names = record.get("mode"), record.get("modules")
    if mode not in MODES or not isinstance(names, list):
        raise CheckpointError(f"{source}: the quantization record {record!r} is not one this formerkit reads "
                              f"(mode one of {', '.join(MODES)}, and a list of modules)")
    remaining = dict(tensors)
    layers = {}
    for name in names:
        try:
            linear = model.get_submodule(name)
            weight_int8 = remaining.pop(f"{name}.weight_int8")
            weight_scale = remaining.pop(f"{name}.weight_scale")
        except (AttributeError, KeyError) as error:
            raise CheckpointError(f"{source}: quantized layer {name!r} is missing or unknown ({error})") from None
        bias = remaining.pop(f"{name}.bias", None)
        if not isinstance(linear, nn.Linear) or tuple(weight_int8.shape) != tuple(linear.weight.shape) or \
                weight_int8.dtype != torch.int8 or (bias is None) != (linear.bias is None):
            raise CheckpointError(f"{source}: quantized layer {name!r} does not match the model config "
                                  f"(int8 weight {list(weight_int8.shape)} {weight_int8.dtype}, Linear "
                                  f"{list(getattr(linear, 'weight', torch.empty(0)).shape)})")
        layers[name] = (weight_int8, weight_scale, bias)
    # The float part first, into the float model (whose Linear layers then give way to the int8 ones).
    quantized_keys = tuple(f"{name}." for name in names)
    missing, unexpected = model.load_state_dict(remaining, strict=False)
    state = model.state_dict()
    # Names left out at saving because they share a tensor with a saved one (a tied LM head) are tied again here.
    loaded = {_storage_key(state[k]) for k in remaining if k in state}
    really_missing = [key for key in missing if not key.startswith(quantized_keys)
                      and _storage_key(state[key]) not in loaded]
    if really_missing or unexpected:
        raise CheckpointError(f"{source}: does not hold this quantized model's weights (missing "
                              f"{really_missing[:5]}, unexpected {unexpected[:5]})")
    return install_int8_layers(model, mode, layers)
