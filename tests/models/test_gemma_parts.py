"""Gemma's model-level parts against their formulas: token embeddings scaled by sqrt(width) rounded to the hidden
dtype, and the sliding-window layers' rotary tables of their own base (Gemma 3's rope_local_base_freq)."""

from __future__ import annotations

import math

import torch

import formerkit
from formerkit.nn.stems import TokenEmbedding


def test_scaled_embeddings_multiply_the_table_by_sqrt_width_rounded_to_its_dtype():
    torch.manual_seed(0)
    stem = TokenEmbedding(11, 3072, 8, scale_embeddings=True)
    ids = torch.tensor([[1, 5, 10]])
    table = stem.tokens.weight.detach()
    torch.testing.assert_close(stem(ids), table[ids] * math.sqrt(3072), rtol=0, atol=0)
    # In bfloat16 the factor itself is rounded first: sqrt(3072) = 55.43 becomes 55.5, as Gemma computes it.
    stem = stem.to(torch.bfloat16)
    table = stem.tokens.weight.detach()
    assert torch.tensor(math.sqrt(3072), dtype=torch.bfloat16).item() == 55.5
    assert torch.equal(stem(ids), table[ids] * torch.tensor(55.5, dtype=torch.bfloat16))
    assert not torch.equal(stem(ids), (table[ids].float() * math.sqrt(3072)).to(torch.bfloat16))
    plain = TokenEmbedding(11, 3072, 8)
    assert torch.equal(plain(ids), plain.tokens.weight[ids])


def _rotary_table(base: float, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """cos(p / base^(2i / dim)) for i < dim / 2, repeated for both halves (the half-split layout)."""
    frequency = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    angles = positions.to(torch.float64).unsqueeze(-1) * frequency
    return torch.cat([angles, angles], dim=-1).cos().float()


def test_window_layers_rotate_by_the_local_base_and_the_others_by_rope_base():
    model = formerkit.build_model(dict(
        arch="decoder", width=32, num_layers=3, max_seq_len=16,
        attention={"num_heads": 2, "sliding_window": 4, "sliding_window_layers": [0, 2]},
        position={"kind": "rope", "rope_base": 10000.0, "rope_local_base": 20.0},
        stem={"kind": "tokens", "vocab_size": 13}))
    ids = torch.randint(0, 13, (2, 9))
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, :3] = 0  # left padding: positions count real tokens
    prepared = model.prepare(ids, attention_mask=keep)
    positions = (keep.cumsum(1) - 1).clamp(min=0)
    for index, layer in enumerate(prepared.layers):
        base = 20.0 if index in (0, 2) else 10000.0
        cos = layer.rotary[0].squeeze(1)
        torch.testing.assert_close(cos, _rotary_table(base, positions, 16), rtol=1e-6, atol=1e-6)
    # Without a local base every layer shares the one table.
    plain = formerkit.build_model(model.config.replace(**{"position.rope_local_base": None}))
    assert plain.local_positions is None
    layers = plain.prepare(ids, attention_mask=keep).layers
    assert all(layer.rotary is layers[0].rotary for layer in layers)
