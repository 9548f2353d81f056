"""LoRA and DoRA adapters in Hugging Face PEFT's layout, out and in (the ``peft`` package is not needed for either).

A PEFT LoRA directory holds ``adapter_config.json`` (peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
use_dora, ...) and ``adapter_model.safetensors`` with, per adapted Hugging Face Linear ``M`` (its name in the
``transformers`` model), ``base_model.model.M.lora_A.weight`` [r, in], ``base_model.model.M.lora_B.weight``
[out, r] and, for DoRA, ``base_model.model.M.lora_magnitude_vector`` [out].

The Hugging Face names come from the interop family's weight rules (``formerkit.interop.engine``): a rule maps
``decoder.blocks.0.attention.qkv.weight`` to q_proj, k_proj and v_proj stacked, so the adapter of target q (rows
0:q_rows of qkv) is q_proj's, and GPT-2's Conv1D ``c_attn`` (q, k and v fused, transposed) is the adapter of target
qkv (written with ``fan_in_fan_out``, PEFT's flag for Conv1D weights). A target whose rows are not one whole Hugging
Face tensor (q alone of GPT-2's ``c_attn``, qkv of LLaMA's three projections, GPT-NeoX's interleaved
``query_key_value``) has no PEFT equivalent and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from formerkit.adapt.api import active_adapters, adapter_modules, adapter_records, add_adapters, set_adapter
from formerkit.adapt.targets import TARGETS, resolve_sites
from formerkit.errors import InputError, InteropError

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "load_peft", "save_peft"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _family(model: nn.Module, where: str):
    """The interop family that writes ``model``, and the weight-name prefix its transformers class uses."""
    from formerkit.interop.hf import FAMILIES

    config = getattr(model, "config", None)
    found = FAMILIES.family_for(config) if config is not None else None
    if found is None:
        raise InteropError(f"{where}: to_hf cannot write this model as a Hugging Face checkpoint, so its adapters "
                           "have no PEFT layout")
    family, data = found
    return family, data, ("" if config.head.kind == "none" else family.prefix)


def _their_modules(model: nn.Module, family, base: str) -> dict[tuple[str, int, int], tuple[str, bool]]:
    """(formerkit Linear path, first row, end row) -> (the Hugging Face module holding exactly those rows, whether it
    is a GPT-2-style Conv1D), for the weights the family keeps in PEFT-expressible layouts: copied whole, transposed
    whole (a Conv1D: PEFT's lora_A and lora_B have a Linear's shapes there too, with fan_in_fan_out set), or stacked
    whole tensors."""
    found = {}
    for rule in family.rules(model.config, base):
        if not rule.ours.endswith(".weight") or rule.layout not in ("same", "transposed", "stacked"):
            continue
        layer = rule.ours.removesuffix(".weight")
        rows = getattr(model.get_submodule(layer), "out_features", None)
        if rows is None:  # an embedding or a norm: not a Linear
            continue
        if rule.layout in ("same", "transposed"):
            found[(layer, 0, rows)] = (rule.theirs[0].removesuffix(".weight"), rule.layout == "transposed")
            continue
        start = 0
        for name, rows in zip(rule.theirs, rule.sizes):
            found[(layer, start, start + rows)] = (name.removesuffix(".weight"), False)
            start += rows
    return found


def save_peft(model: nn.Module, directory, name: str | None) -> Path:
    from safetensors.torch import save_file

    where = "save_adapters(format='peft')"
    records = adapter_records(model)
    if name is None:
        candidates = list(records) if len(records) == 1 else active_adapters(model)
        if len(candidates) != 1:
            raise InputError(f"{where}: a PEFT directory holds one adapter; name one of "
                             f"{', '.join(map(repr, records)) or '(none: add_adapters first)'}")
        name = candidates[0]
    if name not in records:
        raise InputError(f"{where}: no adapter named {name!r} (adapters: {', '.join(map(repr, records))})")
    record = records[name]
    if record["method"] not in ("lora", "dora"):
        raise InputError(f"{where}: adapter {name!r} is {record['method']!r}; the PEFT layout holds LoRA and DoRA")
    family, data, base = _family(model, where)
    theirs = _their_modules(model, family, base)
    tensors, modules, conv1d = {}, [], set()
    for path, lora in adapter_modules(model, name):
        layer = path.rsplit(".adapters.", 1)[0]
        module, transposed = theirs.get((layer, lora.start, lora.stop), (None, False))
        if module is None:
            raise InteropError(f"{where}: target {lora.target!r} at {layer} has no PEFT equivalent: a "
                               f"{data['architectures'][0]} does not keep those rows as a Linear of their own")
        modules.append(module)
        conv1d.add(transposed)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora.lora_A.detach()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora.lora_B.detach()
        if lora.magnitude is not None:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = lora.magnitude.detach()
    # Short names (q_proj) when they pick exactly the adapted modules; the full names otherwise (PEFT matches a name
    # as a whole module path or a suffix after a dot).
    if len(conv1d) > 1:
        raise InteropError(f"{where}: adapter {name!r} adapts both Linear and Conv1D modules of a "
                           f"{data['architectures'][0]}; one PEFT adapter sets fan_in_fan_out for all its targets")
    every = {module for module, _ in theirs.values()}
    leaves = sorted({module.rsplit(".", 1)[-1] for module in modules})
    exact = {module for module in every if module.rsplit(".", 1)[-1] in leaves} == set(modules)
    options = record["options"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if model.config.head.kind == "lm" else None,
        "base_model_name_or_path": None, "r": options["rank"], "lora_alpha": options["alpha"],
        "lora_dropout": options["dropout"], "use_rslora": options.get("rslora", False),
        "use_dora": record["method"] == "dora", "target_modules": leaves if exact else sorted(modules),
        "layers_to_transform": None, "bias": "none", "fan_in_fan_out": conv1d == {True}, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({key: value.to("cpu").contiguous().clone() for key, value in tensors.items()},
              str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InteropError(f"load_adapters: {path}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InteropError(f"load_adapters: {path}: peft_type: expected 'LORA' (formerkit reads PEFT's LoRA and DoRA "
                           f"adapters), got {config.get('peft_type') if isinstance(config, dict) else config!r}")
    refused = {"bias": ("none", "formerkit's LoRA trains no biases"),
               "modules_to_save": (None, "whole modules saved beside the adapter"),
               "lora_bias": (False, "a bias on lora_B"),
               "trainable_token_indices": (None, "trained token embeddings"),
               "layer_replication": (None, "replicated layers")}
    for field, (expected, what) in refused.items():
        value = config.get(field, expected)
        if value != expected and value not in ([], {}):
            raise InteropError(f"load_adapters: {path}: {field}: expected {expected!r}, got {value!r} ({what}: not "
                               "supported)")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise InteropError(f"load_adapters: {path}: {field}: {config[field]!r}; formerkit adapters have one rank "
                               "and one alpha for all their targets")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InteropError(f"load_adapters: {path}: {field}: expected a number, got {value!r}")
    return config


def _sites_by_rows(model: nn.Module) -> dict[tuple[str, int, int], tuple[str, int]]:
    """(Linear path, first row, end row) -> (target, depth) for every target of every block of ``model``."""
    found = {}
    for target in TARGETS:
        try:
            sites = resolve_sites(model, (target,), None, rank=None, where="load_adapters")
        except InputError:
            continue  # a target this model does not have (gate without a gated MLP, cross-attention)
        for site in sites:
            depth = int(site.layer.split(".blocks.", 1)[1].split(".", 1)[0])
            found[(site.layer, site.start, site.stop)] = (target, depth)
    return found


def load_peft(model: nn.Module, directory: Path, name: str | None) -> nn.Module:
    from safetensors.torch import load_file

    config = _read_config(directory)
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise InteropError(f"load_adapters: {weights} is missing (a pickled adapter_model.bin is not read)")
    saved = load_file(str(weights))
    family, data, base = _family(model, "load_adapters")
    # Which modules are adapted: the tensors say it (target_modules is a pattern; the file is what was trained).
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
            if key.startswith(PREFIX) and key.endswith(suffix):
                parts.setdefault(key[len(PREFIX):-len(suffix)], {})[suffix] = value
                break
        else:
            raise InteropError(f"load_adapters: {weights}: unexpected tensor {key!r} (formerkit reads lora_A, lora_B "
                               "and lora_magnitude_vector tensors)")
    ours = {module: (rows, conv1d) for rows, (module, conv1d) in _their_modules(model, family, base).items()}
    if not any(module in ours for module in parts):
        other = family.prefix if base == "" else ""  # a base model's adapter carries no "model." prefix
        ours = {module: (rows, conv1d) for rows, (module, conv1d) in _their_modules(model, family, other).items()}
    sites = _sites_by_rows(model)
    placed: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
    for module, tensors in parts.items():
        rows, conv1d = ours.get(module, (None, False))
        # fan_in_fan_out only says how the base weight is stored (PEFT sets it itself for a Conv1D); on a Linear it
        # would read the weight transposed: another model
        if rows is not None and config.get("fan_in_fan_out", False) and not conv1d:
            raise InteropError(f"load_adapters: {directory / PEFT_CONFIG}: fan_in_fan_out is true, but {module} "
                                   "is a Linear (fan_in_fan_out is for GPT-2-style Conv1D weights)")
        if rows is None or rows not in sites:
            raise InteropError(f"load_adapters: {weights}: {module} is not a Linear formerkit adapts in a "
                               f"{data['architectures'][0]} (its LoRA targets: {', '.join(TARGETS)})")
        placed[rows] = tensors
    dora = bool(config.get("use_dora", False))
    for module, tensors in parts.items():
        needed = {".lora_A.weight", ".lora_B.weight"} | ({".lora_magnitude_vector"} if dora else set())
        if set(tensors) != needed:
            raise InteropError(f"load_adapters: {weights}: {module} has {sorted(tensors)}, expected {sorted(needed)}")
    targets = sorted({sites[rows][0] for rows in placed}, key=TARGETS.index)
    depths = sorted({sites[rows][1] for rows in placed})
    layers = None if set(depths) == {depth for _, depth in sites.values()} else depths
    expected = {(site.layer, site.start, site.stop)
                for site in resolve_sites(model, targets, layers, rank=None, where="load_adapters")}
    if set(placed) != expected:
        raise InteropError(f"load_adapters: {weights}: the adapted layers do not all have the same targets; a "
                           "formerkit adapter takes one list of targets for all its layers")
    ranks = {tensors[".lora_A.weight"].shape[0] for tensors in placed.values()}
    if ranks != {config["r"]}:
        raise InteropError(f"load_adapters: {weights}: lora_A ranks {sorted(ranks)} differ from r={config['r']}")
    name = name or "default"
    add_adapters(model, "dora" if dora else "lora", targets, rank=int(config["r"]), alpha=config["lora_alpha"],
                 dropout=float(config.get("lora_dropout", 0.0) or 0.0), layers=layers, name=name,
                 rslora=bool(config.get("use_rslora", False)))
    with torch.no_grad():
        for path, lora in adapter_modules(model, name):
            layer = path.rsplit(".adapters.", 1)[0]
            tensors = placed[(layer, lora.start, lora.stop)]
            for suffix, parameter in ((".lora_A.weight", lora.lora_A), (".lora_B.weight", lora.lora_B),
                                      (".lora_magnitude_vector", lora.magnitude)):
                if parameter is None:
                    continue
                value = tensors[suffix]
                if value.shape != parameter.shape:
                    raise InteropError(f"load_adapters: {weights}: {suffix.lstrip('.')} of target {lora.target!r} "
                                       f"at {layer} has shape {list(value.shape)}, expected {list(parameter.shape)}")
                parameter.copy_(value)
    set_adapter(model, name)
    return model
