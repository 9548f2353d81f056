"""The key/value cache for step-by-step decoding.

When a decoder generates token after token, every step would recompute the keys and values of all earlier tokens.
The cache keeps them instead: one buffer per layer for keys and one for values, allocated once for the whole length
the generation can reach (no concatenation per step), filled as tokens arrive. Besides keys and values it keeps, for
every cached slot, whether the token is real or left padding and the token's position, so masks, ALiBi biases and
positions of later steps equal those of a full recompute.

An encoder-decoder's cache also keeps the encoder's output, its padding mask, and each cross-attention layer's keys and
values of that output: the source is encoded once.

A forward pass with a cache appends its tokens: it reads slots ``[0, length)``, writes ``[length, length + n)``, and
advances ``length`` only when the pass has finished (a failed pass leaves the cache as it was).
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerkit.errors import InputError

__all__ = ["KVCache", "StaticSlots"]


class KVCache:
    """Keys and values of every self-attention layer: ``keys[layer]`` and ``values[layer]`` are
    [batch, kv_heads, max_length, head_dim] buffers."""

    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size < 1 or max_length < 1:
            raise InputError(f"KVCache: batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Per slot: a real token (False for left padding) and its position.
        self.keep = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        # Real tokens seen so far in each row: the position the next real token gets.
        self.counts = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        # Whether any cached slot is padding (then every later step needs a key-padding mask).
        self.padded = False
        # encoder_decoder: the encoder's output and padding mask, and each cross-attention layer's keys and values.
        self.memory: Tensor | None = None
        self.memory_keep: Tensor | None = None
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self._end: int | None = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A cache sized for ``model``'s decoder (the model itself for arch decoder)."""
        config = model.config
        if config.arch == "encoder":
            raise InputError("KVCache: an encoder reads its whole input at once and has nothing to cache; "
                             "only decoder and encoder_decoder models decode step by step")
        if max_length > config.num_positions and config.position.kind in ("learned", "sinusoidal", "rope"):
            raise InputError(f"KVCache: max_length {max_length} exceeds the model's max_seq_len "
                             f"{config.num_positions} ({config.position.kind} positions have no row beyond it)")
        reference = next(model.parameters())
        layers = config.decoder_layers if config.arch == "encoder_decoder" else config.num_layers
        return cls(num_layers=layers, batch_size=batch_size, max_length=max_length,
                   num_kv_heads=config.attention.kv_heads, head_dim=config.head_dim,
                   dtype=dtype or reference.dtype, device=device or reference.device)

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    @property
    def max_length(self) -> int:
        return self.keep.shape[1]

    # ----- one forward pass -----

    def begin(self, keep: Tensor | None, num_tokens: int) -> Tensor:
        """Starts a pass over ``num_tokens`` new tokens (``keep`` [batch, n]: False at padding, None if all real).
        Records them and returns their positions [batch, n], counted over real tokens like a full recompute does."""
        batch = self.batch_size
        start, end = self.length, self.length + num_tokens
        if end > self.max_length:
            raise InputError(f"KVCache: {num_tokens} new tokens after {start} cached ones exceed the cache's "
                             f"max_length {self.max_length}")
        if keep is not None and keep.shape[0] != batch:
            raise InputError(f"KVCache: built for a batch of {batch}, the input has a batch of {keep.shape[0]}")
        if keep is None:
            steps = torch.arange(num_tokens, device=self.counts.device)
            positions = self.counts.unsqueeze(1) + steps
            self.keep[:, start:end] = True
            new_counts = self.counts + num_tokens
        else:
            # A padded slot gets the position of the real token before it (or 0), exactly as a recompute does.
            positions = (self.counts.unsqueeze(1) + keep.long().cumsum(dim=1) - 1).clamp(min=0)
            self.keep[:, start:end] = keep
            new_counts = self.counts + keep.long().sum(dim=1)
            self.padded = self.padded or not bool(keep.all())
        self.positions[:, start:end] = positions
        self._pending = new_counts
        self._end = end
        return positions

    @property
    def start(self) -> int:
        return self.length

    @property
    def end(self) -> int:
        if self._end is None:
            raise RuntimeError("KVCache: no pass in progress (begin() was not called)")
        return self._end

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Writes the pass's keys/values [batch, kv_heads, n, head_dim] of ``layer`` and returns all of that layer's
        keys/values so far [batch, kv_heads, end, head_dim]."""
        start, end = self.length, self.end
        key_buffer, value_buffer = self.keys[layer], self.values[layer]
        key_buffer.narrow(2, start, end - start).copy_(keys)
        value_buffer.narrow(2, start, end - start).copy_(values)
        return key_buffer.narrow(2, 0, end), value_buffer.narrow(2, 0, end)

    def key_keep(self) -> Tensor | None:
        """[batch, end]: which cached keys are real tokens, or None if none is padding."""
        return self.keep[:, : self.end] if self.padded else None

    def key_positions(self) -> Tensor:
        return self.positions[:, : self.end]

    def commit(self) -> None:
        """Ends the pass: the new tokens become part of the cache."""
        self.length = self.end
        self.counts = self._pending
        self._end = None

    def abort(self) -> None:
        self._end = None

    def reorder(self, index: Tensor) -> None:
        """Keeps rows ``index`` of the batch (for callers that drop finished rows or reorder beams)."""
        self.keys = [buffer[index] for buffer in self.keys]
        self.values = [buffer[index] for buffer in self.values]
        self.keep, self.positions, self.counts = self.keep[index], self.positions[index], self.counts[index]
        if self.memory is not None:
            self.memory = self.memory[index]
            self.memory_keep = None if self.memory_keep is None else self.memory_keep[index]
        self.cross = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross]

    def __repr__(self) -> str:
        return (f"KVCache(layers={len(self.keys)}, batch={self.batch_size}, length={self.length}, "
                f"max_length={self.max_length}, dtype={self.keys[0].dtype})")


class StaticSlots:
    """The cache as a compiled decode step sees it: every shape fixed, so one compiled graph serves every step.

    Each row's one new token goes to slot ``slot`` (a one-element tensor the caller sets before the step), and
    attention reads the whole buffers; slots not yet filled are masked out through ``KVCache.keep``.
    """

    def __init__(self, cache: KVCache):
        self.keys, self.values, self.cross = cache.keys, cache.values, cache.cross
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.keep.device)

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        key_buffer, value_buffer = self.keys[layer], self.values[layer]
        # index_put_ (not index_copy_): the compiler writes it into the buffer in place instead of copying it.
        key_buffer[:, :, self.slot] = keys
        value_buffer[:, :, self.slot] = values
        return key_buffer, value_buffer
