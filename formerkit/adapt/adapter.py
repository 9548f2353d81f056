"""Parallel bottleneck adapters (AdaptFormer: Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable
Visual Recognition").

Beside a block's feed-forward, a small bottleneck reads the feed-forward's input (the normed stream with pre-norm) and
adds its output to the feed-forward's output:

    ffn_out(x) = ffn(x) + scale * up(act(down(x)))

``up`` starts at zero, so a fresh adapter leaves the model's outputs exactly as they were. The sum then goes through
the block's residual merge as the feed-forward alone did (sandwich norm, LayerScale, dropout, stochastic depth).
"""

from __future__ import annotations

from torch import Tensor, nn

from formerkit.adapt.blocks import chosen_blocks, float_like
from formerkit.adapt.methods import AdapterModule, register_method
from formerkit.adapt.slots import BesideSlot, check_name, slot
from formerkit.errors import InputError

__all__ = ["BottleneckAdapter", "apply_adapter"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(AdapterModule):
    """x -> scale * up(act(down(x))), ``width`` -> ``bottleneck`` -> ``width``, ``up`` zero-initialized."""

    def __init__(self, width: int, bottleneck: int, *, scale: float = 0.1, activation: str = "relu",
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, device=device, dtype=dtype)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.activation(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


@register_method("adapter")
def apply_adapter(model, *, targets=None, layers=None, name: str = "default", bottleneck: int = 64,
                  scale: float = 0.1, activation: str = "relu") -> None:
    """Adds a ``BottleneckAdapter`` beside the feed-forward of each block at ``layers`` (every block by default),
    in the block's ``feedforward_beside`` (a ``BesideSlot``, under ``name``). AdaptFormer's defaults: bottleneck 64,
    scale 0.1, ReLU. ``targets`` is not read (the adapter sits beside the whole feed-forward)."""
    check_name(name, "adapter")
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise InputError(f"add_adapters(method='adapter'): bottleneck: expected an integer >= 1, got {bottleneck!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InputError(f"add_adapters(method='adapter'): scale: expected a number, got {scale!r}")
    if activation not in ACTIVATIONS:
        raise InputError(f"add_adapters(method='adapter'): activation: expected one of {sorted(ACTIVATIONS)}, got "
                         f"{activation!r}")
    blocks = chosen_blocks(model, layers, "adapter")
    if any(block.feedforward_beside is not None and name in block.feedforward_beside for block in blocks):
        raise InputError(f"add_adapters(method='adapter'): a block already has an adapter named {name!r}")
    width = model.config.width
    for block in blocks:
        device, dtype = float_like(block)
        adapter = BottleneckAdapter(width, bottleneck, scale=float(scale), activation=activation,
                                    device=device, dtype=dtype)
        adapter.adapter_name = name
        slot(block, "feedforward_beside", BesideSlot)[name] = adapter
