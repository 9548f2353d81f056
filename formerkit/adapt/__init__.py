"""Adapting a trained or imported model cheaply: small trained modules on a frozen base.

    import formerkit
    model = formerkit.from_hf("path/to/llama")
    formerkit.add_adapters(model, method="lora", targets=("q", "v"), rank=8, alpha=16)   # base frozen
    ...train (formerkit.fit): only the adapter's parameters have requires_grad...
    formerkit.save_adapters(model, "out/adapter")                  # the adapter alone, with the base's identity
    formerkit.save_adapters(model, "out/peft", format="peft")      # Hugging Face PEFT's layout
    formerkit.load_adapters(other_copy_of_the_base, "out/adapter") # either format, detected
    formerkit.merge_adapters(model)                                # into the weights; the adapter modules are gone

Methods (``METHODS``, by name): ``lora`` and ``dora`` (``formerkit.adapt.lora``), ``adapter`` (parallel bottleneck
adapters, ``formerkit.adapt.adapter``), ``prefix`` and ``prompt`` (``formerkit.adapt.prefix``,
``formerkit.adapt.prompt``) and ``partial`` (``formerkit.adapt.partial``). Targets and layers:
``formerkit.adapt.targets``.

Several adapters on one base: add each under its own ``name``. The last one added is the active one (the others stay,
inactive and frozen); ``set_adapter(model, name)`` activates another (and makes it the trainable one), and
``with use_adapter(model, name):`` runs the calls inside with that adapter only (or with none: ``None``), restoring
the previous choice after. A list of names activates several at once.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from formerkit.adapt import adapter, partial, prefix, prompt  # noqa: F401  (each registers its method)
from formerkit.adapt.api import (
    ParameterCounts,
    active_adapters,
    adapter_names,
    add_adapters,
    merge_adapters,
    parameter_counts,
    set_adapter,
    use_adapter,
)
from formerkit.adapt.files import MANIFEST, load_formerkit, save_formerkit
from formerkit.adapt.methods import METHODS, AdapterModule, register_method
from formerkit.adapt.peft import PEFT_CONFIG, load_peft, save_peft
from formerkit.errors import CheckpointError, InputError

__all__ = ["METHODS", "AdapterModule", "ParameterCounts", "active_adapters", "add_adapters", "adapter_names",
           "load_adapters", "merge_adapters", "parameter_counts", "register_method", "save_adapters", "set_adapter",
           "use_adapter"]


def save_adapters(model: nn.Module, dir, format: str = "formerkit", *, name: str | None = None):
    """Writes the adapters of ``model`` to directory ``dir``; returns it. ``format="formerkit"``:
    ``adapter.safetensors`` (the adapters' trained tensors) and ``adapter.json`` (each adapter's method, targets,
    layers, options and name, and the base's identity: its config hash and the checksums of its frozen weights).
    ``format="peft"``: one LoRA/DoRA adapter in Hugging Face PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``) for a model ``to_hf`` can write. ``name`` picks one adapter (the only or active one
    by default for PEFT; every adapter for formerkit's format)."""
    if format == "formerkit":
        return save_formerkit(model, dir, name)
    if format == "peft":
        return save_peft(model, dir, name)
    raise InputError(f"save_adapters: format: expected 'formerkit' or 'peft', got {format!r}")


def load_adapters(model: nn.Module, dir, *, name: str | None = None) -> nn.Module:
    """Adds the adapters saved in ``dir`` to ``model`` (either format, detected by its files) with their trained
    weights; returns the model. A formerkit-format adapter made for another base (config or frozen weights) is
    refused naming what differs. ``name`` renames a single loaded adapter (to load two under different names)."""
    directory = Path(dir)
    if (directory / MANIFEST).is_file():
        return load_formerkit(model, directory, name)
    if (directory / PEFT_CONFIG).is_file():
        return load_peft(model, directory, name)
    raise CheckpointError(f"load_adapters: {directory} holds neither a formerkit adapter ({MANIFEST}) nor a PEFT one "
                          "(adapter_config.json)")
