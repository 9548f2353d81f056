"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Each chosen self-attention layer gets ``num_virtual_tokens`` learned keys and values placed before the sequence's own:
every query attends to them, whatever the causal order or the padding (the prefix is part of the layer, not of the
input). The sequence keeps its own positions (0, 1, 2, ...); the prefix keys are learned as they are used, without
rotary positions. The outputs have one row per real token, as without the prefix.

Caches and generation: the prefix is never written to a ``KVCache``; each pass (the prompt, then every step, the
compiled step too) prepends it again, so cached decoding computes what a full recompute does. Sliding-window layers
see the prefix besides their window; long inputs then take the dense windowed mask instead of the blockwise one.
Not supported (refused): linear attention, the Gaussian-mixture mask. With ``output_attentions`` the probabilities
have the prefix's columns first.

Li & Liang train the prefix through a reparameterizing MLP for stability (``projection_hidden``): a learned
embedding [num_virtual_tokens, width] -> Linear -> tanh -> Linear -> keys and values; here one MLP per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from formerkit.adapt.blocks import chosen_blocks, float_like
from formerkit.adapt.methods import AdapterModule, register_method
from formerkit.adapt.slots import PrefixSlot, check_name, slot
from formerkit.errors import InputError

__all__ = ["KeyValuePrefix", "apply_prefix"]


class KeyValuePrefix(AdapterModule):
    """Learned keys and values of one attention layer: ``forward(batch)`` returns keys and values
    [batch, kv_heads, num_virtual_tokens, head_dim]."""

    def __init__(self, num_virtual_tokens: int, num_kv_heads: int, head_dim: int, *, width: int,
                 projection_hidden: int | None = None, init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        size = 2 * num_kv_heads * head_dim
        if projection_hidden is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, size, device=device, dtype=dtype) * init_std)
            self.embedding, self.projection = None, None
        else:
            self.prefix = None
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, width, device=device, dtype=dtype)
                                          * init_std)
            self.projection = nn.Sequential(nn.Linear(width, projection_hidden, device=device, dtype=dtype), nn.Tanh(),
                                            nn.Linear(projection_hidden, size, device=device, dtype=dtype))

    def keys_values(self) -> Tensor:
        """[num_virtual_tokens, 2 * kv_heads * head_dim]: the keys, then the values, of each virtual token."""
        return self.prefix if self.projection is None else self.projection(self.embedding)

    def forward(self, batch: int) -> tuple[Tensor, Tensor]:
        flat = self.keys_values()
        tokens = flat.shape[0]
        k, v = flat.view(tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        return k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)


@register_method("prefix")
def apply_prefix(model, *, targets=None, layers=None, name: str = "default", num_virtual_tokens: int = 20,
                 projection_hidden: int | None = None, init_std: float = 0.02) -> None:
    """Gives the self-attention of each block at ``layers`` (every block by default) ``num_virtual_tokens`` learned
    keys and values (``KeyValuePrefix``), through an MLP of ``projection_hidden`` units when given. ``targets`` is not
    read. A block shared across depths shares its prefix. Several active prefixes on a layer are attended one after
    another."""
    check_name(name, "prefix")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise InputError(f"add_adapters(method='prefix'): num_virtual_tokens: expected an integer >= 1, got "
                         f"{num_virtual_tokens!r}")
    if projection_hidden is not None and (isinstance(projection_hidden, bool) or not isinstance(projection_hidden, int)
                                          or projection_hidden < 1):
        raise InputError(f"add_adapters(method='prefix'): projection_hidden: expected an integer >= 1 or None, got "
                         f"{projection_hidden!r}")
    attention = model.config.attention
    if attention.kind == "linear" and attention.kind_layers is None:
        raise InputError("add_adapters(method='prefix'): the model's attention is linear (attention.kind linear), "
                         "which has no keys to put a prefix before")
    if attention.gaussian_mixture:
        raise InputError("add_adapters(method='prefix'): not supported with attention.gaussian_mixture (its mask is "
                         "over the image grid)")
    blocks = chosen_blocks(model, layers, "prefix")
    if any(block.attention.key_value_prefix is not None and name in block.attention.key_value_prefix
           for block in blocks):
        raise InputError(f"add_adapters(method='prefix'): a layer already has a prefix named {name!r}")
    for block in blocks:
        layer = block.attention
        device, dtype = float_like(layer)
        prefix = KeyValuePrefix(num_virtual_tokens, layer.num_kv_heads, layer.head_dim, width=model.config.width,
                                projection_hidden=projection_hidden, init_std=init_std, device=device, dtype=dtype)
        prefix.adapter_name = name
        slot(layer, "key_value_prefix", PrefixSlot)[name] = prefix
