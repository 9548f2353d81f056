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

Layers with a sliding window need only the last ``window`` keys: their buffers are rolling, ``global_tokens + window``
slots whatever the length (the global tokens keep their slots, the others take turns), and ``window_key_index``
tells attention which token each slot holds. A one-token step writes its key into the slot of the token that just left
the window and attends over the buffer in place; a pass of several tokens (the prompt) attends over the buffer
followed by its own keys, then keeps the latest of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from formerkit.errors import InputError
from formerkit.nn.masks import PreparedMask

__all__ = ["KVCache", "StaticSlots"]


class KVCache:
    """Keys and values of every self-attention layer: ``keys[layer]`` and ``values[layer]`` are
    [batch, kv_heads, max_length, head_dim] buffers."""

    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int | list[int],
                 head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 window: int | None = None, rolling_layers: tuple[int, ...] = (), global_tokens: int = 0):
        if batch_size < 1 or max_length < 1:
            raise InputError(f"KVCache: batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        # Rolling buffers pay off only when the window (with the global tokens) is shorter than the length.
        rolling = window is not None and bool(rolling_layers) and global_tokens + window < max_length
        self.window, self.global_tokens = (window, global_tokens) if rolling else (None, 0)
        self.rolling = tuple(rolling and layer in rolling_layers for layer in range(num_layers))
        # One count for every layer, or one per layer (a pruned model's layers have their own head counts).
        heads = [num_kv_heads] * num_layers if isinstance(num_kv_heads, int) else list(num_kv_heads)
        slots = [global_tokens + window if roll else max_length for roll in self.rolling]
        self.keys = [torch.zeros(batch_size, h, n, head_dim, dtype=dtype, device=device) for h, n in zip(heads, slots)]
        self.values = [torch.zeros(batch_size, h, n, head_dim, dtype=dtype, device=device)
                       for h, n in zip(heads, slots)]
        # Rolling buffers: the token each slot holds (-1: none yet), and this pass's key positions for them.
        self.slot_tokens = (torch.full((global_tokens + window,), -1, dtype=torch.long, device=device) if rolling
                            else None)
        self._window_keys: Tensor | None = None
        self._pending_slots: Tensor | None = None
        self._writes: tuple[Tensor, Tensor] | None = None
        # What this pass overwrote in rolling buffers, to put back if it fails.
        self._undo: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
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
                  device: torch.device | str | None = None, rolling: bool = True) -> KVCache:
        """A cache sized for ``model``'s decoder (the model itself for arch decoder). Its sliding-window layers get
        rolling buffers unless ``rolling`` is False (then every layer keeps ``max_length`` slots, as a compiled
        decode step with fixed shapes needs)."""
        config = model.config
        if config.arch == "encoder":
            raise InputError("KVCache: an encoder reads its whole input at once and has nothing to cache; "
                             "only decoder and encoder_decoder models decode step by step")
        if max_length > config.num_positions and config.position.kind in ("learned", "sinusoidal", "rope"):
            raise InputError(f"KVCache: max_length {max_length} exceeds the model's max_seq_len "
                             f"{config.num_positions} ({config.position.kind} positions have no row beyond it)")
        reference = next(model.parameters())
        layers = config.decoder_layers if config.arch == "encoder_decoder" else config.num_layers
        stack = model.decoder
        windowed = tuple(index for index, flag in enumerate(stack.windowed) if flag) if rolling else ()
        return cls(num_layers=layers, batch_size=batch_size, max_length=max_length,
                   num_kv_heads=[config.layer_kv_heads(layer) for layer in range(layers)], head_dim=config.head_dim,
                   dtype=dtype or reference.dtype, device=device or reference.device,
                   window=config.attention.sliding_window, rolling_layers=windowed,
                   global_tokens=config.attention.global_tokens)

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
        self._undo = []
        start, end = self.length, self.length + num_tokens
        if end > self.max_length:
            raise InputError(f"KVCache: {num_tokens} new tokens after {start} cached ones exceed the cache's "
                             f"max_length {self.max_length}")
        if keep is not None and keep.shape[0] != batch:
            raise InputError(f"KVCache: built for a batch of {batch}, the input has a batch of {keep.shape[0]}")
        if keep is None and num_tokens == 1:  # a decode step: one real token per row, at the row's count
            positions = self.counts.unsqueeze(1)
            self.keep.select(1, start).fill_(True)
            self.positions.select(1, start).copy_(self.counts)
            new_counts = self.counts + 1
        else:
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
        if self.slot_tokens is not None:
            self._plan_rolling(start, end)
        return positions

    def _slot_of(self, token: Tensor) -> Tensor:
        """The rolling slot of each token index: global tokens keep their own, the others take turns."""
        glob = self.global_tokens
        return torch.where(token < glob, token, glob + (token - glob) % self.window)

    def _plan_rolling(self, start: int, end: int) -> None:
        """Once per pass, for every rolling layer: which token each key attended over is, which slots the pass
        writes (``_writes``: the slots and which of the pass's tokens goes to each) and what the slots hold after."""
        new = torch.arange(start, end, device=self.slot_tokens.device)
        # Each slot keeps the latest of the new tokens that land in it (the last window of the pass, and any global
        # tokens in it): the largest index per slot, by a reduction (duplicate indices in an index_put_ have no
        # guaranteed winner).
        latest = torch.full_like(self.slot_tokens, -1).scatter_reduce(0, self._slot_of(new), new - start, "amax")
        written = (latest >= 0).nonzero().flatten()
        self._writes = (written, latest[written])
        after = self.slot_tokens.clone()
        after[written] = new[latest[written]]
        # One token: written into its slot in place, then attended over; several: the slots, then the pass's keys.
        self._window_keys = after if end - start == 1 else torch.cat([self.slot_tokens, new])
        self._pending_slots = after

    def window_key_index(self) -> Tensor:
        """[keys]: the token index of each key the rolling layers attend over in this pass (-1: an empty slot)."""
        if self._window_keys is None:
            raise RuntimeError("KVCache: no pass in progress over rolling buffers")
        return self._window_keys

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
        if self.rolling[layer]:
            return self._update_rolling(key_buffer, value_buffer, keys, values, start, end)
        key_buffer.narrow(2, start, end - start).copy_(keys)
        value_buffer.narrow(2, start, end - start).copy_(values)
        return key_buffer.narrow(2, 0, end), value_buffer.narrow(2, 0, end)

    def _update_rolling(self, key_buffer: Tensor, value_buffer: Tensor, keys: Tensor, values: Tensor, start: int,
                        end: int) -> tuple[Tensor, Tensor]:
        # Several tokens attend over the slots as they were, followed by their own keys (copied before the writes).
        result = ((key_buffer, value_buffer) if end - start == 1
                  else (torch.cat([key_buffer, keys], dim=2), torch.cat([value_buffer, values], dim=2)))
        slots, sources = self._writes
        self._undo.append((key_buffer, value_buffer, slots, key_buffer.index_select(2, slots),
                           value_buffer.index_select(2, slots)))
        key_buffer.index_copy_(2, slots, keys.index_select(2, sources))
        value_buffer.index_copy_(2, slots, values.index_select(2, sources))
        return result

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
        self._undo = []
        if self.slot_tokens is not None:
            self.slot_tokens = self._pending_slots
            self._window_keys = self._pending_slots = None

    def took_static_step(self) -> None:
        """A compiled decode step (see ``StaticSlots``) has written one real token per row at slot ``length``, its
        keys and values, ``keep``, position and count: the token becomes part of the cache."""
        if self.length >= self.max_length:
            raise RuntimeError(f"KVCache: a step past the cache's max_length {self.max_length}")
        self.length += 1

    def abort(self) -> None:
        """Ends a failed pass: the cache is as it was before it (rolling slots the pass overwrote are restored)."""
        self._end = None
        self._window_keys = self._pending_slots = None
        for key_buffer, value_buffer, slots, old_keys, old_values in reversed(self._undo):
            key_buffer.index_copy_(2, slots, old_keys)
            value_buffer.index_copy_(2, slots, old_values)
        self._undo = []

    def truncate(self, length: int) -> None:
        """Forgets every slot from ``length`` on: the cache is what feeding only its first ``length`` slots would
        have made (speculative decoding rolls back the guessed tokens the model rejected this way). Later passes
        overwrite the forgotten slots. Rolling window buffers cannot be rolled back (their overwritten slots are
        gone): build the cache with ``rolling=False``."""
        if self._end is not None:
            raise RuntimeError("KVCache: truncate() during a pass")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise InputError(f"KVCache.truncate: expected a length in [0, {self.length}], got {length!r}")
        if any(self.rolling):
            raise InputError("KVCache.truncate: rolling window buffers cannot be rolled back; build the cache with "
                             "KVCache.for_model(..., rolling=False)")
        # Positions of later tokens count the real tokens kept.
        self.counts = self.counts - self.keep[:, length:self.length].long().sum(dim=1)
        self.keep[:, length:self.length] = False
        self.length = length
        self.padded = self.padded and not bool(self.keep[:, :length].all())

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
    """The cache as a compiled decode step sees it: buffer shapes fixed, so one compiled graph serves every step.

    Each row's one new token goes to slot ``slot`` (a one-element tensor, starting after the prefill, that the step
    itself advances), and attention reads the slots filled so far, ``filled`` of them (a length the compiled code
    reads from ``slot`` at run time); left padding among them is masked out through ``keep``. ``begin`` and
    ``commit`` do, in place, what ``KVCache.begin`` and ``commit`` do for a pass of one real token per row.
    ``memory_mask`` is an encoder-decoder's cross-attention mask (its keys and values are in ``cross``).
    """

    def __init__(self, cache: KVCache, memory_mask: PreparedMask | None = None):
        self.keys, self.values, self.cross = cache.keys, cache.values, cache.cross
        self.keep, self.positions, self.counts = cache.keep, cache.positions, cache.counts
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=cache.keep.device)
        self.memory_mask = memory_mask
        self.filled: int | None = None

    @classmethod
    def from_buffers(cls, keys: list[Tensor], values: list[Tensor], cross: list, slot: Tensor, keep: Tensor,
                     positions: Tensor, counts: Tensor, memory_mask: PreparedMask | None) -> StaticSlots:
        """The same view over tensors given one by one (as an exported decode step receives them)."""
        slots = cls.__new__(cls)
        slots.keys, slots.values, slots.cross, slots.slot = keys, values, cross, slot
        slots.keep, slots.positions, slots.counts = keep, positions, counts
        slots.memory_mask, slots.filled = memory_mask, None
        return slots

    def begin(self) -> Tensor:
        """Records one real token per row at ``slot`` and returns their positions [batch, 1] (each row's count of
        real tokens); attention then reads the slots up to and including this one."""
        positions = self.counts.unsqueeze(1)
        self.keep[:, self.slot] = True
        self.positions[:, self.slot] = positions
        self.fill_to_slot(self.keep.shape[1])
        return positions

    def fill_to_slot(self, max_length: int) -> int:
        """Sets and returns ``filled``, the slots up to and including ``slot``. Traced for compiling, this reads a
        value at run time (bounded by ``max_length``), so the compiled code attends over as many keys as there are
        tokens, not over the whole buffer."""
        filled = self.slot.item() + 1
        torch._check(filled >= 1)
        torch._check(filled <= max_length)
        self.filled = filled
        return filled

    def key_keep(self) -> Tensor:
        """[batch, filled]: False at the left padding among the filled slots."""
        return self.keep[:, :self.filled]

    def key_positions(self) -> Tensor:
        """[batch, filled]: the position of the token in each filled slot."""
        return self.positions[:, :self.filled]

    def update(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        key_buffer, value_buffer = self.keys[layer], self.values[layer]
        # index_put_ (not index_copy_): the compiler writes it into the buffer in place instead of copying it.
        key_buffer[:, :, self.slot] = keys
        value_buffer[:, :, self.slot] = values
        return key_buffer.narrow(2, 0, self.filled), value_buffer.narrow(2, 0, self.filled)

    def commit(self) -> None:
        """The step's token is in: every row's count of real tokens and the slot advance by one."""
        self.counts.add_(1)
        self.slot.add_(1)
