"""Position schemes: how a Transformer knows where a token is.

Every scheme answers three questions, so the rest of the model never asks which one it has:
``encode_input`` adds absolute positions to the embeddings (learned, sinusoidal, 2-D sine-cosine), ``rotary`` gives the
cos/sin tables that rotate queries and keys (RoPE), and ``attention_bias`` gives an additive score bias (ALiBi, T5's
relative buckets).
``position_ids`` is a [batch, tokens] tensor of positions, or None for 0, 1, 2, ... in every row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "ALiBiPositions",
    "LearnedPositions",
    "NoPositions",
    "PositionScheme",
    "RelativePositions",
    "RotaryPositions",
    "SinCos2DPositions",
    "SinusoidalPositions",
    "alibi_slopes",
    "apply_rotary",
    "build_positions",
    "relative_buckets",
    "sinusoidal_table",
]


class PositionScheme(nn.Module):
    """Base class: a scheme that does nothing (no positions)."""

    def encode_input(self, hidden: Tensor, position_ids: Tensor | None) -> Tensor:
        return hidden

    def rotary(self, position_ids: Tensor | None, length: int) -> tuple[Tensor, Tensor] | None:
        return None

    def attention_bias(self, query_positions: Tensor, key_positions: Tensor) -> Tensor | None:
        return None

    @property
    def uses_bias(self) -> bool:
        return False


NoPositions = PositionScheme


class _AbsoluteTable(PositionScheme):
    """Adds row ``p`` of a [positions, width] table to the token at position ``p``."""

    table: Tensor

    def encode_input(self, hidden: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            return hidden + self.table[: hidden.shape[1]].to(hidden.dtype)
        return hidden + self.table[position_ids].to(hidden.dtype)


class LearnedPositions(_AbsoluteTable):
    """A trained table of absolute positions (GPT-2, BERT, ViT)."""

    def __init__(self, num_positions: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_positions, width))

    @property
    def table(self) -> Tensor:  # type: ignore[override]
        return self.weight


def sinusoidal_table(num_positions: int, width: int, base: float = 10000.0) -> Tensor:
    """The fixed table of "Attention Is All You Need": even channels sin(p / base^(2i/d)), odd channels cos."""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float64) * (-math.log(base) / width))
    table = torch.zeros(num_positions, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table.float()


class SinusoidalPositions(_AbsoluteTable):
    def __init__(self, num_positions: int, width: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(num_positions, width), persistent=False)


def _sincos_1d(positions: Tensor, width: int) -> Tensor:
    # MAE's 1-D half: the first width/2 channels are sines, the rest cosines, frequencies 1 / 10000^(k / (width/2)).
    frequency = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.to(torch.float64).unsqueeze(1) * frequency
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class SinCos2DPositions(_AbsoluteTable):
    """A fixed 2-D sine-cosine table over a grid of patches (He et al., "Masked Autoencoders"): the first half of the
    channels encodes the row, the second half the column. Prefix tokens (class token) get zeros."""

    def __init__(self, grid_size: tuple[int, int], width: int, num_prefix_tokens: int = 0):
        super().__init__()
        rows, cols = grid_size
        row = torch.arange(rows).repeat_interleave(cols)
        col = torch.arange(cols).repeat(rows)
        grid = torch.cat([_sincos_1d(row, width // 2), _sincos_1d(col, width // 2)], dim=1)
        table = torch.cat([torch.zeros(num_prefix_tokens, width, dtype=torch.float64), grid]).float()
        self.register_buffer("table", table, persistent=False)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (i, i + r/2) of ``x`` [batch, heads, tokens, head_dim] by each position's angles, where
    r is the tables' width: with partial rotary (r < head_dim) the channels from r on pass unrotated."""
    rotated = cos.shape[-1]
    if rotated == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x, rest = x[..., :rotated], x[..., rotated:]
    return torch.cat([x * cos + rotate_half(x) * sin, rest], dim=-1)


class RotaryPositions(PositionScheme):
    """Rotary position embeddings (Su et al., "RoFormer"), in the half-split channel layout of GPT-NeoX and Hugging
    Face LLaMA: channel i pairs with channel i + r/2, rotated by angle p / base^(2i/r), where r = ``rotary_dim``
    (by default head_dim; fewer with partial rotary, as in GPT-NeoX and Phi, which leave the other channels as they
    are). RoFormer's interleaved pairs (2i, 2i + 1), as in GPT-J, are the same rotation after a fixed permutation of
    the query and key channels, which a converter applies to the projection weights."""

    def __init__(self, num_positions: int, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        frequency = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1) * frequency
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def rotary(self, position_ids: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
        if position_ids is None:
            return self.cos[:length].view(1, 1, length, -1), self.sin[:length].view(1, 1, length, -1)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al., "Train Short, Test Long"): a geometric sequence starting at 2^(-8/n); for a
    head count that is not a power of two, the slopes of the nearest lower power plus every other slope of the next."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = geometric(num_heads)
    else:
        lower = 2 ** math.floor(math.log2(num_heads))
        slopes = geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBiPositions(PositionScheme):
    """Attention with linear biases: score(q, k) gets -slope_h * |position(q) - position(k)|."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)

    @property
    def uses_bias(self) -> bool:
        return True

    def attention_bias(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """[batch|1, heads, ..., queries, keys] from positions [batch|1, ..., queries] and [batch|1, ..., keys] (the
        middle dimensions, such as blocks of local attention, are kept)."""
        distance = (query_positions.unsqueeze(-1) - key_positions.unsqueeze(-2)).abs().unsqueeze(1)
        slopes = self.slopes.view((1, -1) + (1,) * (distance.dim() - 2))
        return -slopes * distance.to(self.slopes.dtype)


def relative_buckets(distance: Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> Tensor:
    """T5's bucket of each relative distance ``distance`` = key position - query position (Raffel et al., 2020).

    Bidirectional (an encoder), half the buckets are for keys before the query and half for keys after it; causal (a
    decoder), every bucket is for keys at or before the query and later keys share bucket 0 (the mask hides them).
    Within a direction the first half of its buckets hold the distances 0, 1, ... exactly; the rest cover distances
    up to ``max_distance`` in logarithmically growing steps, and every farther distance falls into the last bucket.
    """
    if bidirectional:
        num_buckets //= 2
        offset = (distance > 0).long() * num_buckets
        distance = distance.abs()
    else:
        offset = torch.zeros_like(distance)
        distance = (-distance).clamp(min=0)
    exact = num_buckets // 2
    # The same float32 arithmetic as the published implementation, so buckets agree at their boundaries too.
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class RelativePositions(PositionScheme):
    """T5's relative position bias: score(q, k) gets a learned per-head number for the bucket of the distance
    position(k) - position(q) (``relative_buckets``). One table [buckets, heads] serves every layer of a stack; T5
    keeps it in the first layer, formerkit with the stack's other positions. ``bidirectional`` for an encoder, causal
    buckets for a decoder."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, num_heads))

    @property
    def uses_bias(self) -> bool:
        return True

    def attention_bias(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """[batch|1, heads, ..., queries, keys] from positions [batch|1, ..., queries] and [batch|1, ..., keys]."""
        distance = key_positions.unsqueeze(-2) - query_positions.unsqueeze(-1)
        buckets = relative_buckets(distance, self.num_buckets, self.max_distance, self.bidirectional)
        return self.weight[buckets].movedim(-1, 1)

    def extra_repr(self) -> str:
        return (f"buckets={self.num_buckets}, heads={self.weight.shape[1]}, max_distance={self.max_distance}, "
                f"bidirectional={self.bidirectional}")


def build_positions(config, *, causal: bool | None = None) -> PositionScheme:
    """The position scheme a ModelConfig asks for; ``causal`` says which stack reads it (relative buckets are
    bidirectional in an encoder, causal in a decoder; by default the model's only stack, or an encoder_decoder's
    encoder)."""
    kind = config.position.kind
    if kind == "relative":
        position = config.position
        causal = config.arch == "decoder" if causal is None else causal
        return RelativePositions(config.attention.num_heads, position.relative_buckets,
                                 position.relative_max_distance, bidirectional=not causal)
    if kind == "learned":
        return LearnedPositions(config.num_positions, config.width)
    if kind == "sinusoidal":
        return SinusoidalPositions(config.num_positions, config.width)
    if kind == "sincos2d":
        return SinCos2DPositions(config.stem.grid_size, config.width, config.stem.num_positioned_prefix_tokens)
    if kind == "rope":
        return RotaryPositions(config.num_positions, config.head_dim, config.position.rope_base, config.rotary_dim)
    if kind == "alibi":
        return ALiBiPositions(config.attention.num_heads)
    return NoPositions()
