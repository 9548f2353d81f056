"""The places of a model where the block-level methods put their modules, one container per place, holding each
named adapter's module: several adapters of one kind share a place, and only the active ones (``set_adapter``,
``use_adapter``) take part. A container's call returns None when no adapter in it is active: the model then runs as
if the place were empty.

- ``BesideSlot`` (a block's ``feedforward_beside``): the sum of the active bottleneck adapters' outputs;
- ``PrefixSlot`` (an attention layer's ``key_value_prefix``): the active prefixes' keys and values, one after another;
- ``PromptSlot`` (the model's ``input_prompt``): the active prompts' virtual tokens, one after another.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BesideSlot", "PrefixSlot", "PromptSlot", "check_name", "slot"]


class _Slot(nn.ModuleDict):
    def active(self) -> list[nn.Module]:
        return [module for module in self.values() if getattr(module, "active", True)]


class BesideSlot(_Slot):
    def forward(self, x: Tensor) -> Tensor | None:
        out = None
        for module in self.active():
            y = module(x)
            out = y if out is None else out + y
        return out


class PrefixSlot(_Slot):
    def forward(self, batch: int) -> tuple[Tensor, Tensor] | None:
        import torch

        parts = [module(batch) for module in self.active()]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)


class PromptSlot(_Slot):
    def forward(self) -> Tensor | None:
        import torch

        parts = [module() for module in self.active()]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def check_name(name: str, method: str) -> None:
    """Refuses an adapter name a container cannot hold: one of its own attributes (``keys``, ``forward``, ...)."""
    from formerkit.errors import InputError

    if hasattr(_Slot(), name):
        raise InputError(f"add_adapters(method={method!r}): name: {name!r} is the name of a container attribute "
                         "(keys, values, items, forward, ...); choose another")


def slot(owner: nn.Module, attribute: str, kind: type[_Slot]) -> _Slot:
    """``owner``'s container at ``attribute``, made (and attached) if the place is empty."""
    existing = getattr(owner, attribute)
    if existing is None:
        existing = kind()
        setattr(owner, attribute, existing)
    return existing
