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
    "dynamic_frequencies",
    "longrope_attention_factor",
    "relative_buckets",
    "rope_frequencies",
    "sinusoidal_table",
    "yarn_attention_factor",
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


class _Rotation(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin without forming rotate_half(x) (a negation and a concatenation, forward and
    backward): x * cos, then each half gains the other half times its sines in place. A rotation's gradient is the
    opposite rotation: grad * cos with the sines' signs swapped. The tables take no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_x = grad * cos
        grad_x[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (i, i + r/2) of ``x`` [batch, heads, tokens, head_dim] by each position's angles, where
    r is the tables' width: with partial rotary (r < head_dim) the channels from r on pass unrotated."""
    rotated = cos.shape[-1]
    if rotated == x.shape[-1]:
        if (cos.requires_grad or sin.requires_grad or x.shape[-1] % 2 or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):  # a compiler fuses the written-out form itself
            return x * cos + rotate_half(x) * sin
        return _Rotation.apply(x, cos, sin)
    x, rest = x[..., :rotated], x[..., rotated:]
    return torch.cat([x * cos + rotate_half(x) * sin, rest], dim=-1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's scale of the cos/sin tables (Peng et al., 2023, "YaRN", eq. 22: sqrt(1/t) = 0.1 ln(s) + 1), which
    multiplies every attention logit by its square: longer contexts spread attention, this sharpens it back."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def longrope_attention_factor(factor: float, original_max_len: int) -> float:
    """LongRoPE's scale of the cos/sin tables (Phi-3's default): sqrt(1 + ln(factor) / ln(original length))."""
    return math.sqrt(1 + math.log(factor) / math.log(original_max_len)) if factor > 1 else 1.0


def rope_frequencies(rotary_dim: int, base: float = 10000.0, scaling: str | None = None, *, factor: float = 1.0,
                     original_max_len: int | None = None, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0,
                     pair_factors: tuple[float, ...] | None = None) -> Tensor:
    """The rotation frequency of each channel pair i < r/2 (float64), theta_i = base^(-2i/r), stretched by a RoPE
    scaling scheme for contexts longer than the pre-training one:

    - linear (Chen et al., 2023, "Extending Context Window ... via Positional Interpolation"): theta_i / factor, i.e.
      positions divided by the factor;
    - llama3 (Llama 3.1's published rule): with wavelength w_i = 2 pi / theta_i and L the original length, keep
      theta_i where w_i < L / high_freq_factor, divide it by factor where w_i > L / low_freq_factor, and in between
      blend (1 - s) theta_i / factor + s theta_i with s = (L / w_i - low_freq_factor) / (high - low);
    - yarn (Peng et al., 2023, "YaRN", "NTK-by-parts"): pair i is interpolated (theta_i / factor) or kept by a
      linear ramp over i between the pairs that turn beta_fast and beta_slow times over L, the bounds rounded
      outwards (floor, ceil) and clipped to [0, r - 1] as in the YaRN reference code;
    - longrope (Ding et al., 2024, "LongRoPE"): theta_i / pair_factors[i], one searched factor per pair (the short
      or the long set, which ``RotaryPositions`` picks per call);
    - dynamic: these are the frequencies up to the original length; ``dynamic_frequencies`` grows the base beyond.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    frequency = 1.0 / base ** exponents
    if scaling == "linear":
        return frequency / factor
    if scaling == "longrope":
        return frequency / torch.tensor(pair_factors, dtype=torch.float64)
    if scaling == "llama3":
        wavelength = 2 * math.pi / frequency
        smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * frequency / factor + smooth * frequency
        long = wavelength > original_max_len / low_freq_factor
        short = wavelength < original_max_len / high_freq_factor
        return torch.where(long, frequency / factor, torch.where(short, frequency, blended))
    if scaling == "yarn":
        def pair_turning(rotations: float) -> float:
            # The (fractional) pair index whose wavelength fits ``rotations`` times into the original length:
            # L / (2 pi base^(2i/r)) = rotations, solved for i.
            return rotary_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(pair_turning(beta_fast)), 0)
        high = min(math.ceil(pair_turning(beta_slow)), rotary_dim - 1)
        span = high - low if high != low else 0.001  # one pair: a step, not a division by zero
        interpolated = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
        return frequency / factor * interpolated + frequency * (1 - interpolated)
    return frequency


def dynamic_frequencies(rotary_dim: int, base: float, factor: float, original_max_len: int, seen: Tensor) -> Tensor:
    """Dynamic NTK scaling (bloc97 and emozilla, 2023; as transformers computes it): once a call sees ``seen`` =
    max position + 1 > L positions, the base grows to base * (factor * seen / L - (factor - 1))^(r / (r - 2)),
    which stretches the slowest pair by about seen / L while leaving the fastest almost unchanged. ``seen`` is a
    0-d tensor, so no Python branch depends on it (the compiled decode step traces this). float32, as transformers."""
    seen = torch.clamp(seen.to(torch.float32), min=float(original_max_len))
    grown = base * (factor * seen / original_max_len - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=seen.device) / rotary_dim
    return 1.0 / grown ** exponents


class RotaryPositions(PositionScheme):
    """Rotary position embeddings (Su et al., "RoFormer"), in the half-split channel layout of GPT-NeoX and Hugging
    Face LLaMA: channel i pairs with channel i + r/2, rotated by angle p / base^(2i/r), where r = ``rotary_dim``
    (by default head_dim; fewer with partial rotary, as in GPT-NeoX and Phi, which leave the other channels as they
    are). RoFormer's interleaved pairs (2i, 2i + 1), as in GPT-J, are the same rotation after a fixed permutation of
    the query and key channels, which a converter applies to the projection weights.

    ``scaling`` stretches the frequencies for longer contexts (see ``rope_frequencies``; yarn also scales the cos/sin
    tables by ``attention_factor``, by default YaRN's 0.1 ln(factor) + 1). With "dynamic" the frequencies depend on
    the positions a call sees, so its tables are computed per call from that call's max position + 1 (over the whole
    batch, as transformers does): stateless, where transformers caches the grown frequencies across calls and keeps
    them until a call is shorter than the original length again. Both agree whenever the positions seen only grow
    from a call shorter than the original length, as in one prefill and its decode steps; with a KV cache the cached
    keys keep the rotation of the call that computed them, as in transformers. "longrope" picks, per call and by the
    same max position + 1, its short factors (within the original length) or its long ones (beyond), as transformers
    does; both tables are scaled by ``attention_factor`` (by default LongRoPE's, see ``longrope_attention_factor``)."""

    def __init__(self, num_positions: int, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None, *,
                 scaling: str | None = None, factor: float = 1.0, original_max_len: int | None = None,
                 low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, attention_factor: float | None = None,
                 short_factors: tuple[float, ...] | None = None, long_factors: tuple[float, ...] | None = None):
        super().__init__()
        rotary_dim = rotary_dim or head_dim
        self.rotary_dim, self.base, self.scaling = rotary_dim, base, scaling
        self.factor, self.original_max_len = factor, original_max_len
        scale = 1.0
        if scaling == "yarn":
            scale = attention_factor if attention_factor is not None else yarn_attention_factor(factor)
        elif scaling == "longrope":
            scale = (attention_factor if attention_factor is not None
                     else longrope_attention_factor(factor, original_max_len))
        frequency = rope_frequencies(rotary_dim, base, scaling, factor=factor, original_max_len=original_max_len,
                                     low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                                     beta_fast=beta_fast, beta_slow=beta_slow, pair_factors=short_factors)
        self._register_tables("", num_positions, frequency, scale)
        if scaling == "longrope":
            self._register_tables("long_", num_positions, rope_frequencies(
                rotary_dim, base, scaling, pair_factors=long_factors), scale)

    def _register_tables(self, prefix: str, num_positions: int, frequency: Tensor, scale: float) -> None:
        angles = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1) * frequency
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer(f"{prefix}cos", (angles.cos() * scale).float(), persistent=False)
        self.register_buffer(f"{prefix}sin", (angles.sin() * scale).float(), persistent=False)

    def rotary(self, position_ids: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
        if self.scaling == "dynamic":
            return self._dynamic_tables(position_ids, length)
        if self.scaling == "longrope":
            return self._longrope_tables(position_ids, length)
        if position_ids is None:
            return self.cos[:length].view(1, 1, length, -1), self.sin[:length].view(1, 1, length, -1)
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)

    def _longrope_tables(self, position_ids: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
        if position_ids is None:
            cos, sin = (self.long_cos, self.long_sin) if length > self.original_max_len else (self.cos, self.sin)
            return cos[:length].view(1, 1, length, -1), sin[:length].view(1, 1, length, -1)
        # A tensor condition, not a Python branch: the compiled decode step traces this.
        long = (position_ids.max() + 1 > self.original_max_len).view(1, 1, 1, 1)
        cos = torch.where(long, self.long_cos[position_ids].unsqueeze(1), self.cos[position_ids].unsqueeze(1))
        sin = torch.where(long, self.long_sin[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1))
        return cos, sin

    def _dynamic_tables(self, position_ids: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
        device = self.cos.device
        positions = torch.arange(length, device=device).unsqueeze(0) if position_ids is None else position_ids
        frequency = dynamic_frequencies(self.rotary_dim, self.base, self.factor, self.original_max_len,
                                        positions.max() + 1)
        angles = positions.to(torch.float32).unsqueeze(-1) * frequency
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()


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
        position = config.position
        return RotaryPositions(config.num_positions, config.head_dim, position.rope_base, config.rotary_dim,
                               scaling=position.rope_scaling, factor=position.rope_factor,
                               original_max_len=position.rope_original_max_len,
                               low_freq_factor=position.rope_low_freq_factor,
                               high_freq_factor=position.rope_high_freq_factor, beta_fast=position.rope_beta_fast,
                               beta_slow=position.rope_beta_slow, attention_factor=position.rope_attention_factor,
                               short_factors=position.rope_short_factors, long_factors=position.rope_long_factors)
    if kind == "alibi":
        return ALiBiPositions(config.attention.num_heads)
    return NoPositions()
