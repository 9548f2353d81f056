"""The adapter API on a model: add, switch, merge, count (``formerkit.adapt`` re-exports it; see its docstring)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

from torch import nn

from formerkit.adapt.lora import LoRA, merge_lora
from formerkit.adapt.methods import METHODS, AdapterModule
from formerkit.errors import InputError

__all__ = ["ParameterCounts", "active_adapters", "adapter_modules", "adapter_names", "add_adapters", "adapter_records",
           "merge_adapters", "parameter_counts", "set_adapter", "use_adapter"]

# add_adapters' LoRA-style arguments, with their defaults; passed to the methods whose apply takes them.
_LORA_ARGUMENTS = {"rank": 8, "alpha": 16, "dropout": 0.0}


def adapter_records(model: nn.Module) -> dict:
    """name -> the add_adapters call that made it (method, targets, layers, options, base parameters it trains)."""
    records = getattr(model, "adapter_records", None)
    if records is None:
        records = {}
        model.adapter_records = records
    return records


def adapter_modules(model: nn.Module, name: str | None = None) -> list[tuple[str, AdapterModule]]:
    """(path, module) of every adapter module of ``model`` (of adapter ``name`` only, if given); nested ones once."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule) and (name is None or module.adapter_name == name):
            if not any(path.startswith(f"{outer}.") for outer, _ in found):
                found.append((path, module))
    return found


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters added to ``model``, in the order they were added."""
    return list(adapter_records(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that take part in the forward pass."""
    return [name for name, record in adapter_records(model).items() if record["active"]]


def _names(model: nn.Module, names, where: str) -> list[str]:
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise InputError(f"{where}: no adapter named {name!r} on this model (adapters: "
                             f"{', '.join(map(repr, known)) or 'none'})")
    return names


def _activate(model: nn.Module, names: list[str]) -> None:
    for name, record in adapter_records(model).items():
        record["active"] = name in names
    for _, module in model.named_modules():
        if isinstance(module, AdapterModule):
            module.active = module.adapter_name in names


def _trainable(model: nn.Module, names: list[str]) -> None:
    """Only the parameters of adapters ``names`` (their modules, and the base parameters they train) train."""
    records = adapter_records(model)
    chosen = {id(p) for name in names for _, module in adapter_modules(model, name) for p in module.parameters()}
    base = {parameter_name for name in names for parameter_name in records[name]["base_parameters"]}
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in chosen or parameter_name in base)


_DEFAULT_TARGETS = ("q", "v")


def add_adapters(model: nn.Module, method: str = "lora", targets: Sequence[str] = _DEFAULT_TARGETS, rank: int = 8,
                 alpha: float = 16, dropout: float = 0.0, layers=None, name: str = "default", **options) -> nn.Module:
    """Freezes ``model``'s base and adds the modules of ``method`` at ``targets`` of ``layers``; returns the model.

    ``targets``: projection names per block (q, k, v, qkv (the fused three, one adapter), out, fc_in, gate, fc_out;
    cross_q, cross_k, cross_v, cross_out in an encoder-decoder's decoder); ``layers``: None (every layer), an index,
    indices or a range (negative from the last). ``rank``, ``alpha``, ``dropout``: LoRA's (and DoRA's); ``options``:
    the method's own (LoRA/DoRA: ``rslora=True`` for the rank-stabilized scale alpha / sqrt(rank)). Bad targets,
    layers out of range and a rank larger than a projection are refused by name before any tensor is made.

    The new adapter becomes the active one and the only trainable parameters are its own; adapters added before stay
    on the model, inactive and frozen (see ``set_adapter``).
    """
    where = f"add_adapters(method={method!r})"
    if method not in METHODS:
        raise InputError(f"add_adapters: method: expected one of {', '.join(map(repr, sorted(METHODS)))}, got "
                         f"{method!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError(f"{where}: name: expected a name made of letters, digits and underscores, got {name!r}")
    records = adapter_records(model)
    if name in records:
        raise InputError(f"{where}: the model already has an adapter named {name!r}; give this one another name")
    apply = METHODS[method]
    accepted = inspect.signature(apply).parameters
    given = {"rank": rank, "alpha": alpha, "dropout": dropout}
    for key, value in given.items():
        if key in accepted:
            options[key] = value
        elif value != _LORA_ARGUMENTS[key]:
            raise InputError(f"{where}: {key} does not apply to this method (it takes "
                             f"{', '.join(k for k in accepted if k not in ('model', 'targets', 'layers', 'name'))})")
    if isinstance(layers, range):
        layers = list(layers)
    targets = [targets] if isinstance(targets, str) else list(targets) if targets is not None else None
    # Methods that place their modules per block (adapter, prefix, prompt) or pick parameters by kind (partial)
    # declare targets=None: a projection list given to them would be ignored, so it is refused instead.
    if accepted["targets"].default is None and targets not in (None, list(_DEFAULT_TARGETS)):
        raise InputError(f"{where}: targets does not apply to this method (it adapts no single projections: "
                         f"choose blocks with layers; partial tuning chooses with which), got {targets}")
    before = {parameter_name for parameter_name, p in model.named_parameters() if p.requires_grad}
    if not records:
        model.adapter_trainable_before = before
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    known = {id(module) for _, module in adapter_modules(model)}
    try:
        apply(model, targets=targets, layers=layers, name=name, **options)
    except Exception:
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name in before)
        raise
    added = {id(p) for _, module in adapter_modules(model, name) if id(module) not in known
             for p in module.parameters()}
    base_trained = [parameter_name for parameter_name, p in model.named_parameters()
                    if p.requires_grad and id(p) not in added]
    records[name] = {"method": method, "targets": targets, "layers": layers, "options": options,
                     "base_parameters": base_trained, "active": True}
    _activate(model, [name])
    _trainable(model, [name])
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str] | None) -> nn.Module:
    """Makes ``names`` (one name, several, or None for the bare base) the active adapters, and their parameters the
    only trainable ones; returns the model."""
    chosen = _names(model, names, "set_adapter")
    _activate(model, chosen)
    _trainable(model, chosen)
    return model


@contextlib.contextmanager
def use_adapter(model: nn.Module, names: str | Sequence[str] | None) -> Iterator[nn.Module]:
    """``with use_adapter(model, "b"): model(x)``: the calls inside run with adapter ``b`` only (several names: those;
    None: the bare base); the previous choice comes back after. Trainable parameters are left as they are."""
    chosen = _names(model, names, "use_adapter")
    previous = active_adapters(model)
    _activate(model, chosen)
    try:
        yield model
    finally:
        _activate(model, previous)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Adds the active LoRA/DoRA adapters into the base weights (the outputs stay the same, up to float rounding)
    and removes every adapter from the model; returns the model, whose parameters train as they did before the
    first ``add_adapters``. Refused, before anything changes, for a method that cannot be merged (a bottleneck adapter,
    prefixes, prompts: a nonlinear or attention-level change; they stay separate) and for int8 layers (merging would
    re-quantize)."""
    others = [(path, module) for path, module in adapter_modules(model) if not isinstance(module, LoRA)]
    if others:
        path, module = others[0]
        raise InputError(f"merge_adapters: {path} ({type(module).__name__}, adapter {module.adapter_name!r}) cannot "
                         "be merged into the weights; only LoRA and DoRA can")
    merge_lora(model)
    before = getattr(model, "adapter_trainable_before", None)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(before is None or parameter_name in before)
    for attribute in ("adapter_records", "adapter_trainable_before"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


class ParameterCounts:
    """Trainable and frozen parameter counts of a model (a tied weight counted once)."""

    def __init__(self, trainable: int, frozen: int, adapters: dict[str, int]):
        self.trainable, self.frozen, self.adapters = trainable, frozen, adapters

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def trainable_share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def format(self) -> str:
        lines = [f"trainable parameters: {self.trainable:,} ({100 * self.trainable_share:.2f}%)",
                 f"frozen parameters: {self.frozen:,}"]
        lines += [f"adapter {name!r}: {count:,} parameters" for name, count in self.adapters.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ParameterCounts(trainable={self.trainable}, frozen={self.frozen}, adapters={self.adapters})"


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable vs frozen parameters of ``model``, and the parameters of each adapter (its modules' and the base
    parameters it trains) — what ``formerkit summary`` shows for an adapted model."""
    trainable = frozen = 0
    for parameter in model.parameters():  # named once even when tied
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    per_adapter = {}
    parameters = dict(model.named_parameters())
    for name, record in adapter_records(model).items():
        count = sum(p.numel() for _, module in adapter_modules(model, name) for p in module.parameters())
        per_adapter[name] = count + sum(parameters[key].numel() for key in record["base_parameters"])
    return ParameterCounts(trainable, frozen, per_adapter)
