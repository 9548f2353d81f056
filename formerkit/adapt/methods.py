"""The registry of adaptation methods: ``formerkit.add_adapters(model, method=NAME, ...)`` looks NAME up here.

A method is a function ``apply(model, *, targets, layers, name, **options) -> None`` that adds its modules to
``model`` in place (each a subclass of ``AdapterModule``, or, for partial tuning, no module at all) and leaves
trainable exactly the parameters the method trains. ``add_adapters`` freezes the base first and records the call, so
``save_adapters``/``load_adapters`` can rebuild the same adapters on another copy of the base (the options must then
be JSON values). ``add_adapters``' ``rank``, ``alpha`` and ``dropout`` reach only the methods whose apply names them;
for the others, a value other than the default is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["METHODS", "AdapterModule", "register_method"]

# method name -> apply function
METHODS: dict[str, Callable[..., None]] = {}


def register_method(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: makes ``add_adapters(method=name)`` call the decorated function."""

    def register(apply: Callable[..., None]) -> Callable[..., None]:
        if name in METHODS:
            raise ValueError(f"formerkit.adapt: two methods named {name!r}")
        METHODS[name] = apply
        return apply

    return register


class AdapterModule(nn.Module):
    """Base of every module an adaptation method adds (LoRA around a Linear, a bottleneck adapter, learned prefixes):
    what ``merge_adapters``, ``save_adapters`` and the parameter summaries recognize as adapter weights.
    ``adapter_name`` is the name the adapter was added under (several adapters may share one base). ``active`` is
    whether it takes part in the forward pass: ``set_adapter``/``use_adapter`` switch it per name, and a switched-off
    module must act as if it were absent (its call site or its forward checks it)."""

    adapter_name: str = "default"
    active: bool = True
