"""Which blocks a method adapts: ``layers`` read against the model's stacks (shared by the block-level methods)."""

from __future__ import annotations

from collections.abc import Iterable

from formerkit.errors import InputError

__all__ = ["chosen_blocks", "float_like", "model_stacks"]


def model_stacks(model) -> list[tuple[str, object]]:
    """(side, stack) for each stack of ``model``: the encoder first, then the decoder."""
    from formerkit.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise InputError(f"add_adapters: expected a formerkit Transformer, got {type(model).__name__}")
    return [(side, getattr(model, side)) for side in ("encoder", "decoder") if hasattr(model, side)]


def chosen_blocks(model, layers: int | Iterable[int] | None, method: str) -> list:
    """The distinct blocks at the depths ``layers`` names in every stack of ``model`` (None: every depth; an int or
    ints, negative ones counted from the last layer). A block shared across depths (``num_unique_layers``) appears
    once, however many of its depths are named."""
    chosen, seen = [], set()
    for _, stack in model_stacks(model):
        depth = stack.num_layers
        if layers is None:
            depths = list(range(depth))
        else:
            try:
                depths = [int(layers)] if isinstance(layers, int) else [int(i) for i in layers]
            except (TypeError, ValueError):
                raise InputError(f"add_adapters(method={method!r}): layers: expected None, a layer index or "
                                 f"indices, got {layers!r}") from None
            bad = [i for i in depths if not -depth <= i < depth]
            if bad:
                raise InputError(f"add_adapters(method={method!r}): layers: {bad} out of range for a stack of "
                                 f"{depth} layers (0..{depth - 1}, or negative from the last)")
            if not depths:
                raise InputError(f"add_adapters(method={method!r}): layers: names no layer")
        for index in depths:
            block = stack.block_at(index % depth)
            if id(block) not in seen:
                seen.add(id(block))
                chosen.append(block)
    return chosen


def float_like(module) -> tuple:
    """(device, dtype) for new weights beside ``module``: those of its first floating-point parameter."""
    import torch

    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return None, torch.get_default_dtype()
