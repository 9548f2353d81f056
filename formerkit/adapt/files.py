"""formerkit's adapter format: ``adapter.safetensors`` (the adapters' trained tensors, by their names in the adapted
model) and ``adapter.json`` (how to rebuild them: each adapter's add_adapters call, and the identity of the base they
were trained on).

The base's identity is a hash of its config and a checksum of each of its frozen tensors (SHA-256 of the bytes,
per tensor, so a refusal names the tensors that differ). Tensors an adapter trains (partial tuning's norms and biases)
are saved with it and left out of the identity. An adapter trained on a ``weight-int8`` base also loads onto the float
model that base was quantized from (its weights quantized again must give the same int8 tensors), where it can be
merged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from formerkit.adapt.api import adapter_modules, adapter_records, add_adapters, set_adapter
from formerkit.errors import CheckpointError, InputError

__all__ = ["MANIFEST", "TENSORS", "base_identity", "load_formerkit", "save_formerkit"]

MANIFEST = "adapter.json"
TENSORS = "adapter.safetensors"
FORMAT_VERSION = 1


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().flatten()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def config_hash(model: nn.Module) -> str:
    return hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def base_identity(model: nn.Module, skip: set[str]) -> dict:
    """The config hash, the quantization mode and a checksum per tensor of ``model``'s base: its state minus the
    adapters' tensors and the names in ``skip`` (base parameters an adapter trains)."""
    prefixes = tuple(f"{path}." for path, _ in adapter_modules(model))
    tensors = {}
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor) and not key.startswith(prefixes) and key not in skip:
            tensors[key] = _digest(value)
    quantization = getattr(model, "quantization", None)
    dtypes = sorted({str(value.dtype).removeprefix("torch.") for value in model.state_dict().values()
                     if isinstance(value, Tensor) and value.is_floating_point()})
    return {"config_hash": config_hash(model), "quantization": None if quantization is None else quantization["mode"],
            "dtypes": dtypes, "tensors": tensors}


def adapter_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The trained tensors of adapter ``name``: its modules' parameters and the base parameters it trains."""
    tensors = {}
    for path, module in adapter_modules(model, name):
        for key, parameter in module.named_parameters():
            tensors[f"{path}.{key}"] = parameter
    parameters = dict(model.named_parameters())
    for key in adapter_records(model)[name]["base_parameters"]:
        tensors[key] = parameters[key]
    return tensors


def save_formerkit(model: nn.Module, directory, name: str | None) -> Path:
    from safetensors.torch import save_file

    records = adapter_records(model)
    if not records:
        raise InputError("save_adapters: this model has no adapters (add_adapters or load_adapters first)")
    names = list(records) if name is None else [name]
    if name is not None and name not in records:
        raise InputError(f"save_adapters: no adapter named {name!r} (adapters: {', '.join(map(repr, records))})")
    tensors, entries = {}, []
    for adapter in names:
        record = records[adapter]
        own = adapter_tensors(model, adapter)
        tensors.update({key: value.detach().to("cpu").contiguous().clone() for key, value in own.items()})
        entries.append({"name": adapter, "method": record["method"], "targets": record["targets"],
                        "layers": record["layers"], "options": record["options"],
                        "base_parameters": record["base_parameters"], "tensors": sorted(own)})
    skip = {key for record in records.values() for key in record["base_parameters"]}
    manifest = {"format": "formerkit-adapter", "version": FORMAT_VERSION, "adapters": entries,
                "base": base_identity(model, skip)}
    try:
        json.dumps(manifest)
    except TypeError as error:
        raise InputError(f"save_adapters: an adapter's options are not JSON values ({error})") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TENSORS), metadata={"format": "formerkit-adapter"})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _as_quantized(model: nn.Module, ours: dict, saved: dict) -> dict:
    """``ours`` (a float model's identity) as the identity of its ``weight-int8`` copy (``formerkit quantize``), for
    the layers the adapter's int8 base had quantized: an adapter trained on an int8 base (QLoRA-style) then loads
    onto the float model it was quantized from, to be merged there."""
    from formerkit.nn.int8 import per_channel_int8

    tensors = dict(ours["tensors"])
    for key in saved.get("tensors", {}):
        layer = key.removesuffix(".weight_int8")
        if layer == key or f"{layer}.weight" not in tensors:
            continue
        weight_int8, weight_scale = per_channel_int8(model.get_submodule(layer).weight)
        del tensors[f"{layer}.weight"]
        tensors[f"{layer}.weight_int8"], tensors[f"{layer}.weight_scale"] = _digest(weight_int8), _digest(weight_scale)
    return {**ours, "quantization": "weight-int8", "tensors": tensors}


def _check_base(model: nn.Module, saved: dict, skip: set[str], source: Path) -> None:
    """Refuses a base other than the adapter's, naming what differs. A float model is the base of an adapter trained
    on its int8 copy."""
    ours = base_identity(model, skip)
    if saved.get("quantization") == "weight-int8" and ours["quantization"] is None:
        ours = _as_quantized(model, ours, saved)
    differences = []
    if saved.get("config_hash") != ours["config_hash"]:
        differences.append(f"the config (hash {ours['config_hash']}, the adapter's base {saved.get('config_hash')})")
    if saved.get("quantization") != ours["quantization"]:
        differences.append(f"the quantization ({ours['quantization'] or 'float'}, the adapter's base "
                           f"{saved.get('quantization') or 'float'})")
    if saved.get("dtypes", ours["dtypes"]) != ours["dtypes"]:
        differences.append(f"the floating-point dtypes ({', '.join(ours['dtypes'])}, the adapter's base "
                           f"{', '.join(saved['dtypes'])}: convert the model with .to(dtype) first)")
        saved = {**saved, "tensors": {}}  # every tensor differs then: the dtype says it all
        ours = {**ours, "tensors": {}}
    theirs = saved.get("tensors", {})
    missing = sorted(set(theirs) - set(ours["tensors"]))
    extra = sorted(set(ours["tensors"]) - set(theirs))
    changed = sorted(key for key in set(theirs) & set(ours["tensors"]) if theirs[key] != ours["tensors"][key])
    for label, keys in (("tensors the adapter's base has and this model lacks", missing),
                        ("tensors this model has and the adapter's base lacks", extra),
                        ("weights that differ", changed)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            differences.append(f"{label}: {', '.join(keys[:3])}{more}")
    if differences:
        raise CheckpointError(f"load_adapters: {source} was made for another base model; differs in "
                              + "; ".join(differences))


def load_formerkit(model: nn.Module, directory: Path, name: str | None) -> nn.Module:
    from safetensors.torch import load_file

    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        entries, base = manifest["adapters"], manifest["base"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"load_adapters: {manifest_path} is not a formerkit adapter manifest ({error})") from None
    if manifest.get("format") != "formerkit-adapter" or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"load_adapters: {manifest_path}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r} is not one this formerkit reads")
    if name is not None and len(entries) != 1:
        raise InputError(f"load_adapters: name renames a single adapter; {directory} holds {len(entries)}")
    if not (directory / TENSORS).is_file():
        raise CheckpointError(f"load_adapters: {directory / TENSORS} is missing")
    skip = {key for entry in entries for key in entry.get("base_parameters", [])}
    _check_base(model, base, skip, directory)
    tensors = load_file(str(directory / TENSORS))
    taken = [entry["name"] if name is None else name for entry in entries]
    clash = [adapter for adapter in taken if adapter in adapter_records(model)]
    if clash:
        raise InputError(f"load_adapters: the model already has an adapter named {clash[0]!r}; pass name= to load "
                         "this one under another")
    for entry, adapter in zip(entries, taken):
        options = dict(entry["options"])
        lora_style = {key: options.pop(key) for key in ("rank", "alpha", "dropout") if key in options}
        add_adapters(model, entry["method"], entry["targets"], layers=entry["layers"], name=adapter,
                     **lora_style, **options)
        own = adapter_tensors(model, adapter)
        renamed = {key.replace(f".{entry['name']}.", f".{adapter}.") if adapter != entry["name"] else key: key
                   for key in entry["tensors"]}
        if set(renamed) != set(own):
            saved_only, expected = sorted(set(renamed) - set(own))[:3], sorted(set(own) - set(renamed))[:3]
            raise CheckpointError(f"load_adapters: {directory}: the saved tensors of adapter {entry['name']!r} do not "
                                  f"match the adapter rebuilt from {MANIFEST} (saved only: {saved_only}, expected: "
                                  f"{expected})")
        with torch.no_grad():
            for key, parameter in own.items():
                value = tensors.get(renamed[key])
                if value is None or value.shape != parameter.shape:
                    raise CheckpointError(f"load_adapters: {directory / TENSORS}: {renamed[key]} is missing or has "
                                          f"shape {None if value is None else list(value.shape)}, expected "
                                          f"{list(parameter.shape)}")
                parameter.copy_(value)
    set_adapter(model, taken)
    return model
