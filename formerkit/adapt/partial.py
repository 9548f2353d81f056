"""Partial tuning: no new modules, some of the base's own tensors made trainable.

which="norms_biases": every norm's weight and bias and every bias (BitFit: Ben Zaken et al. 2022, extended to the
norms); "attention": the attention projections (self- and cross-attention: qkv / q, kv and out, weights and biases;
tuning attention only: Touvron et al. 2022, "Three things everyone should know about Vision Transformers");
"head": the head only (linear probing, or the LM head; with tied embeddings that is the token embedding too).

``layers`` limits norms_biases and attention to the blocks it names (then the final and embedding norms and the head's
biases are left frozen); "head" takes no ``layers``. The adapter saved for partial tuning is the trainable tensors.
"""

from __future__ import annotations

from torch import nn

from formerkit.adapt.blocks import chosen_blocks, model_stacks
from formerkit.adapt.methods import register_method
from formerkit.errors import InputError
from formerkit.nn.norms import RMSNorm

__all__ = ["PARTS", "apply_partial", "partial_parameters"]

PARTS = ("norms_biases", "attention", "head")


def partial_parameters(model, which: str, layers=None) -> list[nn.Parameter]:
    """The parameters ``which`` names (see the module's docstring), each once."""
    if which not in PARTS:
        raise InputError(f"add_adapters(method='partial'): which: expected one of {list(PARTS)}, got {which!r}")
    if which == "head":
        if layers is not None:
            raise InputError("add_adapters(method='partial'): which='head' takes no layers")
        model_stacks(model)  # refuses what is not a formerkit model
        modules = [model.head]
    else:
        modules = [model] if layers is None and which == "norms_biases" else chosen_blocks(model, layers, "partial")
    chosen: dict[int, nn.Parameter] = {}
    for root in modules:
        for module in root.modules():
            if which == "attention":
                wanted = ([getattr(module, n, None) for n in ("qkv", "q", "kv", "out")] if _is_attention(module)
                          else [])
                wanted = [part for part in wanted if part is not None]
                if any(not isinstance(part, nn.Linear) for part in wanted):
                    raise InputError(f"add_adapters(method='partial'): which='attention': the projections are "
                                     f"{type(wanted[0]).__name__} layers (a quantized model?), which cannot be trained")
                params = [p for part in wanted if part is not None for p in part.parameters()]
            elif which == "norms_biases":
                params = list(module.parameters(recurse=False)) if isinstance(module, (nn.LayerNorm, RMSNorm)) else [
                    p for n, p in module.named_parameters(recurse=False) if n == "bias"]
            else:
                params = list(module.parameters(recurse=False))
            for parameter in params:
                chosen[id(parameter)] = parameter
    frozen = [p for p in chosen.values() if not p.is_floating_point()]
    if frozen:
        raise InputError(f"add_adapters(method='partial'): which={which!r}: the model holds {tuple(frozen[0].shape)} "
                         f"{frozen[0].dtype} weights there (a quantized model?), which cannot be trained")
    if not chosen:
        raise InputError(f"add_adapters(method='partial'): which={which!r} names no parameter of this model")
    return list(chosen.values())


def _is_attention(module: nn.Module) -> bool:
    from formerkit.nn.attention import Attention

    return isinstance(module, Attention)


@register_method("partial")
def apply_partial(model, *, targets=None, layers=None, name: str = "default", which: str = "norms_biases") -> None:
    """Makes trainable the parameters ``which`` names (``partial_parameters``); adds nothing. ``targets`` is not
    read."""
    for parameter in partial_parameters(model, which, layers):
        parameter.requires_grad_(True)
