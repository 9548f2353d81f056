"""Attention masks as values.

A mask says which keys each query may attend to. Masks are small objects you build, combine with ``&`` and inspect;
attention takes one. ``CausalMask() & KeyPaddingMask(attention_mask)`` is a decoder over a padded batch.

Every mask materializes to a tensor broadcastable to ``[batch, heads, queries, keys]``: boolean (True = may attend) or,
for masks that carry scores, additive float (0 = attend freely, ``-inf`` = blocked). Queries are numbered from
``query_offset`` (the number of keys already cached when decoding step by step), keys from 0.

Masks are defined on positions, so they can also be evaluated at any set of (query, key) positions: ``materialize_at``
is what blockwise local attention uses (each block of queries against the keys of its window, never a dense
[tokens, tokens] matrix) and what a rolling key/value cache uses (the keys it still holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from formerkit.errors import InputError

__all__ = [
    "AllOf",
    "BlockedMask",
    "BlockCausalMask",
    "CausalMask",
    "DocumentMask",
    "KeyPaddingMask",
    "Mask",
    "PrefixLMMask",
    "SlidingWindowMask",
    "SoftCausalMask",
    "TensorMask",
    "as_keep",
    "as_mask",
    "blockwise_pays_off",
    "mask_parts",
    "prepare_attention_mask",
    "prepare_blocked_mask",
    "prepare_mask_at",
    "window_block_size",
    "with_bias",
]


class Mask:
    """Base class: which keys each query may attend to."""

    # True for masks that fix the order in which tokens see each other (PrefixLMMask): such a mask takes the place of
    # a decoder's causal mask instead of being combined with it.
    defines_order = False

    def materialize(self, num_queries: int, num_keys: int, *, query_offset: int = 0,
                    device: torch.device | str | None = None) -> Tensor:
        """The mask as a tensor broadcastable to [batch, heads, num_queries, num_keys] (see the module docstring)."""
        query = torch.arange(query_offset, query_offset + num_queries, device=device).view(1, -1)
        key = torch.arange(num_keys, device=device).view(1, -1)
        return self.materialize_at(query, key, num_keys=num_keys, query_offset=query_offset).squeeze(2)

    def materialize_at(self, query_index: Tensor, key_index: Tensor, *, num_keys: int,
                       query_offset: int = 0) -> Tensor:
        """The mask at chosen positions, for ``blocks`` groups of queries and keys at once.

        query_index [blocks, queries] and key_index [blocks, keys] hold positions in the sequence (queries of this
        pass start at ``query_offset``; ``num_keys`` keys exist). A key index outside [0, num_keys) names no key: its
        entries may hold anything, callers mask them. Returns a bool or additive float tensor broadcastable to
        [batch, heads, blocks, queries, keys].
        """
        raise NotImplementedError

    def __and__(self, other: Mask) -> AllOf:
        if not isinstance(other, Mask):
            return NotImplemented
        left = self.parts if isinstance(self, AllOf) else (self,)
        right = other.parts if isinstance(other, AllOf) else (other,)
        return AllOf(left + right)

    def to_dense(self, num_queries: int, num_keys: int | None = None, *, query_offset: int = 0) -> Tensor:
        """A boolean [batch|1, heads|1, queries, keys] picture of the mask (True = may attend), for inspection."""
        num_keys = num_queries + query_offset if num_keys is None else num_keys
        value = self.materialize(num_queries, num_keys, query_offset=query_offset)
        if value.dtype != torch.bool:
            value = value > float("-inf")
        return value.expand(*value.shape[:-2], num_queries, num_keys).reshape(
            *_leading(value), num_queries, num_keys)

    def batch_size(self) -> int | None:
        """The batch size this mask is tied to, or None if it applies to any batch."""
        return None


def _leading(value: Tensor) -> tuple[int, int]:
    shape = (1,) * (4 - value.dim()) + tuple(value.shape)
    return shape[0], shape[1]


def _pairs(query_index: Tensor, key_index: Tensor) -> tuple[Tensor, Tensor]:
    """Query positions [blocks, queries, 1] and key positions [blocks, 1, keys], ready to compare."""
    return query_index.unsqueeze(-1), key_index.unsqueeze(-2)


def _gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table`` [batch, tokens] read at ``index`` [blocks, n] (clamped into range): [batch, blocks, n]."""
    return table.to(index.device)[:, index.clamp(0, table.shape[1] - 1)]


@dataclass(frozen=True, eq=False)
class CausalMask(Mask):
    """A query sees keys at its own position and before (a decoder)."""

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        query, key = _pairs(query_index, key_index)
        return (key <= query)[None, None]

    def __repr__(self) -> str:
        return "CausalMask()"


@dataclass(frozen=True, eq=False)
class SlidingWindowMask(Mask):
    """A query sees only keys fewer than ``window`` positions away (with CausalMask: itself and window - 1 before).

    ``global_tokens`` (Beltagy et al., "Longformer"): the first that many tokens are global; they see every key and
    every query sees them.
    """

    window: int
    global_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"SlidingWindowMask: window must be an integer >= 1, got {self.window!r}")
        tokens = self.global_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InputError(f"SlidingWindowMask: global_tokens must be an integer >= 0, got {tokens!r}")

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        query, key = _pairs(query_index, key_index)
        allowed = (query - key).abs() < self.window
        if self.global_tokens:
            allowed = allowed | (key < self.global_tokens) | (query < self.global_tokens)
        return allowed[None, None]


@dataclass(frozen=True, eq=False)
class KeyPaddingMask(Mask):
    """Padded keys are never attended to. ``keep`` is [batch, keys]: True (or 1) for a real token, False (0) for
    padding."""

    keep: Tensor

    def __post_init__(self) -> None:
        keep = self.keep
        if not isinstance(keep, Tensor):
            raise InputError(f"KeyPaddingMask: expected a tensor of shape [batch, keys], got {type(keep).__name__}")
        if keep.dim() != 2:
            raise InputError(f"KeyPaddingMask: expected shape [batch, keys], got {list(keep.shape)}")
        object.__setattr__(self, "keep", as_keep(keep, "KeyPaddingMask"))

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        if self.keep.shape[1] != num_keys:
            raise InputError(f"KeyPaddingMask: covers {self.keep.shape[1]} keys, but attention has {num_keys}")
        return _gather_rows(self.keep, key_index)[:, None, :, None, :]

    def batch_size(self) -> int:
        return self.keep.shape[0]

    def __repr__(self) -> str:
        return f"KeyPaddingMask(batch={self.keep.shape[0]}, keys={self.keep.shape[1]})"


@dataclass(frozen=True, eq=False)
class PrefixLMMask(Mask):
    """Prefix-LM (Raffel et al., "T5"; Dong et al., "UniLM"): the first ``prefix_length`` tokens see each other
    in both directions, every later token sees everything before it. ``prefix_length`` is an int or a [batch] tensor.
    In a decoder this mask replaces the causal mask."""

    prefix_length: int | Tensor
    defines_order = True

    def __post_init__(self) -> None:
        length = self.prefix_length
        if isinstance(length, Tensor):
            if length.dim() != 1 or length.dtype.is_floating_point or length.dtype == torch.bool:
                raise InputError(f"PrefixLMMask: prefix_length must be an int or a 1-D integer tensor [batch], "
                                 f"got a {length.dtype} tensor of shape {list(length.shape)}")
        elif isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise InputError(f"PrefixLMMask: prefix_length must be an integer >= 0, got {length!r}")

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        query, key = _pairs(query_index, key_index)
        causal = (key <= query)[None, None]
        if isinstance(self.prefix_length, Tensor):
            length = self.prefix_length.to(key.device).view(-1, 1, 1, 1, 1)
            return causal | (key < length)
        return causal | (key < self.prefix_length)[None, None]

    def batch_size(self) -> int | None:
        return self.prefix_length.shape[0] if isinstance(self.prefix_length, Tensor) else None


def _check_ids(ids, where: str) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise InputError(f"{where}: expected an integer tensor [batch, tokens], got {shape}")


def _ids_at(ids: Tensor, query_index: Tensor, key_index: Tensor, num_keys: int,
            where: str) -> tuple[Tensor, Tensor]:
    """Per-token ids read at the query and key positions: [batch, blocks, queries, 1] and [batch, blocks, 1, keys]."""
    if ids.shape[1] != num_keys:
        raise InputError(f"{where}: covers {ids.shape[1]} tokens, but attention has {num_keys} keys")
    return _gather_rows(ids, query_index).unsqueeze(-1), _gather_rows(ids, key_index).unsqueeze(-2)


@dataclass(frozen=True, eq=False)
class DocumentMask(Mask):
    """Packed sequences: a token sees only tokens of its own document. ``document_ids`` is [batch, tokens]."""

    document_ids: Tensor

    def __post_init__(self) -> None:
        _check_ids(self.document_ids, "DocumentMask")

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        queries, keys = _ids_at(self.document_ids, query_index, key_index, num_keys, "DocumentMask")
        return (queries == keys).unsqueeze(1)

    def batch_size(self) -> int:
        return self.document_ids.shape[0]


@dataclass(frozen=True, eq=False)
class BlockCausalMask(Mask):
    """Multi-segment inputs: a token sees every token of its own segment (in both directions) and of every earlier
    segment, none of a later one. ``segment_ids`` is [batch, tokens], numbering segments in order. With one token
    per segment this is the causal mask; with one segment it is no mask. In a decoder this mask replaces the causal
    mask. (DocumentMask is the block-diagonal kind: no segment sees another.)"""

    segment_ids: Tensor
    defines_order = True

    def __post_init__(self) -> None:
        _check_ids(self.segment_ids, "BlockCausalMask")

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        queries, keys = _ids_at(self.segment_ids, query_index, key_index, num_keys, "BlockCausalMask")
        return (keys <= queries).unsqueeze(1)

    def batch_size(self) -> int:
        return self.segment_ids.shape[0]


@dataclass(frozen=True, eq=False)
class SoftCausalMask(Mask):
    """A causal mask faded in (the soft mask of Wang et al., "Adapting LLaMA Decoder to Vision Transformer"): keys
    after the query keep a weight of ``1 - strength`` before normalization (an additive ``log(1 - strength)``), keys
    at or before it their full weight. 0 is no mask, 1 the causal mask. In a decoder it replaces the causal mask."""

    strength: float
    defines_order = True

    def __post_init__(self) -> None:
        value = self.strength
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"SoftCausalMask: strength must be a number in [0, 1], got {value!r}")

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        query, key = _pairs(query_index, key_index)
        if self.strength >= 1.0:
            return (key <= query)[None, None]
        future = math.log1p(-self.strength)
        return torch.where(key <= query, 0.0, future)[None, None]

    def __repr__(self) -> str:
        return f"SoftCausalMask(strength={self.strength})"


@dataclass(frozen=True, eq=False)
class TensorMask(Mask):
    """A mask given as a tensor: boolean (True = may attend) or additive float (``-inf`` or the dtype's minimum =
    blocked). Its shape must broadcast to [batch, heads, queries, keys]; 2-D [queries, keys] is allowed."""

    value: Tensor

    def __post_init__(self) -> None:
        value = self.value
        if not isinstance(value, Tensor):
            raise InputError(f"TensorMask: expected a tensor, got {type(value).__name__}")
        if value.dtype != torch.bool and not value.dtype.is_floating_point:
            raise InputError(f"TensorMask: expected a bool or floating-point tensor, got dtype {value.dtype} "
                             "(an integer [batch, seq] padding mask goes in attention_mask=...)")
        if not 2 <= value.dim() <= 4:
            raise InputError(f"TensorMask: expected 2 to 4 dims ([queries, keys] ... [batch, heads, queries, keys]), "
                             f"got shape {list(value.shape)}")

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        value = self.value
        if value.shape[-2:] != (num_queries, num_keys):
            raise InputError(f"TensorMask: last two dims must be [queries={num_queries}, keys={num_keys}], "
                             f"got shape {list(value.shape)}")
        return self._canonical().to(device)

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        value = self._canonical().to(key_index.device)
        if value.shape[-1] != num_keys:
            raise InputError(f"TensorMask: last dim must be keys={num_keys}, got shape {list(self.value.shape)}")
        # Rows are the queries of this pass (the tensor ignores query_offset), columns the keys.
        rows = (query_index - query_offset).clamp(0, value.shape[-2] - 1)
        cols = key_index.clamp(0, num_keys - 1)
        return value[:, :, rows.unsqueeze(-1), cols.unsqueeze(-2)]

    def _canonical(self) -> Tensor:
        value = self.value
        while value.dim() < 4:
            value = value.unsqueeze(0)
        if value.dtype != torch.bool:
            value = value.masked_fill(value <= torch.finfo(value.dtype).min, float("-inf"))
        return value

    def batch_size(self) -> int | None:
        return self.value.shape[0] if self.value.dim() == 4 and self.value.shape[0] != 1 else None

    def __repr__(self) -> str:
        return f"TensorMask(dtype={self.value.dtype}, shape={list(self.value.shape)})"


@dataclass(frozen=True, eq=False)
class AllOf(Mask):
    """Several masks at once: a key is allowed only if every part allows it; additive scores add up."""

    parts: tuple[Mask, ...]

    @property
    def defines_order(self) -> bool:  # type: ignore[override]
        return any(part.defines_order for part in self.parts)

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        return self._combine(part.materialize(num_queries, num_keys, query_offset=query_offset, device=device)
                             for part in self.parts)

    def materialize_at(self, query_index, key_index, *, num_keys, query_offset=0):
        return self._combine(part.materialize_at(query_index, key_index, num_keys=num_keys, query_offset=query_offset)
                             for part in self.parts)

    @staticmethod
    def _combine(values) -> Tensor:
        allowed, scores = None, None
        for value in values:
            if value.dtype == torch.bool:
                allowed = value if allowed is None else allowed & value
            else:
                scores = value if scores is None else scores + value
        if scores is None:
            return allowed
        if allowed is None:
            return scores
        return scores.masked_fill(~allowed, float("-inf"))

    def batch_size(self) -> int | None:
        sizes = {part.batch_size() for part in self.parts} - {None}
        return sizes.pop() if len(sizes) == 1 else None

    def __repr__(self) -> str:
        return " & ".join(repr(part) for part in self.parts)


def as_keep(keep: Tensor, where: str) -> Tensor:
    """A [batch, seq] padding mask (bool, or integers/floats 0 and 1) as bool, True = real token."""
    if keep.dtype == torch.bool:
        return keep
    if keep.dtype.is_complex:
        raise InputError(f"{where}: expected a bool or 0/1 tensor, got dtype {keep.dtype}")
    if keep.device.type != "meta" and not torch.compiler.is_compiling():
        if not bool(((keep == 0) | (keep == 1)).all()):
            raise InputError(f"{where}: expected 1 for a token and 0 for padding, got other values "
                             f"({sorted(set(keep.unique().tolist()))[:6]})")
    return keep != 0


def as_mask(mask: Mask | Tensor | None) -> Mask | None:
    """Accepts a Mask, a bool/float tensor (wrapped in TensorMask) or None."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return TensorMask(mask)
    raise InputError(f"mask: expected a formerkit Mask or a tensor, got {type(mask).__name__}")


@dataclass
class BlockedMask:
    """A mask for blockwise local attention: the queries in blocks of ``block``, each block against only the keys
    of its window (``before`` positions before the block's first query and ``after`` after its last), preceded by
    the ``global_tokens`` global keys. ``value`` is laid out for one SDPA call over all blocks:
    [batch * blocks | blocks, heads | 1, block, global_tokens + before + block + after] (bool or additive float), and
    ``empty_rows`` marks queries with no key, as in PreparedMask. ``global_rows`` is the dense mask of the global
    queries over every key."""

    block: int
    before: int
    after: int
    global_tokens: int
    value: Tensor
    # [blocks, keys]: the position of each block's keys in the sequence (-1 or beyond the end: no key, masked).
    key_index: Tensor
    empty_rows: Tensor | None = None
    global_rows: PreparedMask | None = None
    # ``value`` as additive scores, by dtype: built by the first layer that needs it, read by the others.
    additive: dict | None = None


@dataclass
class PreparedMask:
    """A mask ready for ``scaled_dot_product_attention``, built once per forward and shared by every layer.

    Either ``is_causal`` (no tensor: SDPA's own causal path) or ``value`` (bool or additive float), or neither (no
    mask). ``empty_rows`` marks queries that may attend to no key at all; attention returns zeros for them.
    ``blocked`` replaces all of these for blockwise local attention. Linear attention's own form reads
    ``is_causal``, ``key_keep`` ([batch, keys], True for a real token) and ``document_runs`` (packed documents, each
    one run of tokens: [batch, tokens] run numbers) with no ``value``.
    """

    value: Tensor | None = None
    is_causal: bool = False
    empty_rows: Tensor | None = None
    blocked: BlockedMask | None = None
    key_keep: Tensor | None = None
    document_runs: Tensor | None = None


def with_bias(value: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """An additive ``bias`` blocked wherever the mask ``value`` forbids (or added to a float mask)."""
    if bias is None:
        return value
    if value is None:
        return bias
    return bias + value if value.dtype != torch.bool else bias.masked_fill(~value, float("-inf"))


def _open_empty_rows(value: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rows with no allowed key opened up (so softmax sees no all ``-inf`` row) and reported, or None."""
    # Exported graphs (ONNX, torch.export) keep the general path: skipping it is a data-dependent branch they
    # cannot hold, and opening no row with an all-False ``empty`` computes the same values.
    # Shape-only runs on the meta device (summaries) cannot read values either.
    tracing = torch.compiler.is_exporting() or torch.jit.is_tracing() or value.device.type == "meta"
    if value.dtype == torch.bool:
        empty = ~value.any(dim=-1, keepdim=True)
        return (value | empty, empty) if tracing or bool(empty.any()) else (value, None)
    empty = (value == float("-inf")).all(dim=-1, keepdim=True)
    return (value.masked_fill(empty, 0.0), empty) if tracing or bool(empty.any()) else (value, None)


def prepare_attention_mask(mask: Mask | None, num_queries: int, num_keys: int, *, query_offset: int = 0,
                           bias: Tensor | None = None, device=None) -> PreparedMask:
    """Materializes ``mask`` (and adds an additive ``bias`` such as ALiBi's) once for all layers.

    A lone CausalMask over a square score matrix becomes SDPA's ``is_causal`` flag, which needs no mask tensor (and
    for a single query after all cached keys, no mask at all).
    Rows with no allowed key are opened up for the kernel (so softmax sees no all ``-inf`` row) and reported in
    ``empty_rows`` so attention can zero them: a fully masked query yields zeros, never NaN.
    """
    if mask is None and bias is None:
        return PreparedMask()
    if isinstance(mask, CausalMask) and bias is None and query_offset + num_queries == num_keys:
        if query_offset == 0:
            return PreparedMask(is_causal=True)
        if num_queries == 1:
            return PreparedMask()  # one new token after the cached ones sees every key
    value = None if mask is None else mask.materialize(num_queries, num_keys, query_offset=query_offset, device=device)
    value, empty = _open_empty_rows(with_bias(value, bias))
    return PreparedMask(value=value, empty_rows=empty)


def mask_parts(mask: Mask) -> tuple[Mask, ...]:
    """The masks a combination (``a & b``) is made of; a single mask is its own one part."""
    return mask.parts if isinstance(mask, AllOf) else (mask,)


def blockwise_pays_off(length: int, window: int) -> bool:
    """Whether blockwise local attention beats a dense windowed mask for ``length`` tokens: once the sequence is
    longer than the window plus a couple of blocks (shorter ones would be mostly padding blocks)."""
    return length >= window + 2 * window_block_size(window)


def window_block_size(window: int) -> int:
    """Queries per block of blockwise local attention. A block of b queries reads b + window - 1 keys (rounded up to
    whole blocks, see ``_prepare_blocked``), so smaller blocks waste less work on keys outside the window, while
    larger ones run more efficiently per product; 64 queries
    was fastest on a 2-core CPU for windows of 64 to 512 (a window of 256 over 16K tokens: 32 queries 338 ms, 64 369 ms,
    128 379 ms, 256 495 ms, all blocks at once)."""
    return 64


def prepare_blocked_mask(mask: Mask, length: int, window: int, *, global_tokens: int = 0, bias=None,
                         device=None) -> PreparedMask:
    """``mask`` (which includes the window, a SlidingWindowMask of ``window``) prepared for blockwise attention over
    ``length`` tokens: memory and work grow with length x window, never length^2.

    ``bias``, if given, is a function of query and key positions ([blocks, queries] and [blocks, keys]) returning
    additive scores broadcastable to [batch, heads, blocks, queries, keys] (ALiBi's distances).
    """
    causal = any(isinstance(part, CausalMask) for part in mask_parts(mask))
    # A mask made only of the causal and window parts depends on nothing but the shape: built once per shape.
    key = None
    if bias is None and all(isinstance(part, (CausalMask, SlidingWindowMask)) for part in mask_parts(mask)):
        windows = tuple((part.window, part.global_tokens) for part in mask_parts(mask)
                        if isinstance(part, SlidingWindowMask))
        key = (length, window, global_tokens, causal, windows, str(device))
        if key in _BLOCKED_CACHE:
            return _BLOCKED_CACHE[key]
    prepared = _prepare_blocked(mask, length, window, causal, global_tokens, bias, device)
    if key is not None:
        if len(_BLOCKED_CACHE) >= 8:
            _BLOCKED_CACHE.pop(next(iter(_BLOCKED_CACHE)))
        _BLOCKED_CACHE[key] = prepared
    return prepared


# Blocked masks of the shape-only kind, by shape (oldest dropped first beyond 8).
_BLOCKED_CACHE: dict[tuple, PreparedMask] = {}


def _prepare_blocked(mask: Mask, length: int, window: int, causal: bool, global_tokens: int, bias,
                     device) -> PreparedMask:
    block = window_block_size(window)
    # The window's reach rounded up to whole blocks, so that every block's keys are an overlapping view of the keys
    # (formerkit.nn.banded_attention); the extra keys lie outside the window and the mask blocks them.
    reach = -(-(window - 1) // block) * block
    before, after = reach, 0 if causal else reach
    blocks = -(-length // block)
    query = torch.arange(blocks * block, device=device).view(blocks, block)
    key = (torch.arange(blocks, device=device) * block - before).unsqueeze(1) + torch.arange(
        before + block + after, device=device)
    if global_tokens:
        # The global keys come first in every block; inside the window they are masked out (never counted twice).
        key = torch.cat([torch.arange(global_tokens, device=device).expand(blocks, global_tokens),
                         key.masked_fill(key < global_tokens, -1)], dim=1)
    value, empty = _open_empty_rows(_materialize_valid(mask, query, key, length, bias))
    value = _blocks_first(value)
    empty = None if empty is None else _blocks_first(empty)
    global_rows = None
    if global_tokens:
        global_rows = prepare_mask_at(mask, torch.arange(global_tokens, device=device),
                                      torch.arange(length, device=device), length, bias=bias)
    return PreparedMask(blocked=BlockedMask(block=block, before=before, after=after, global_tokens=global_tokens,
                                            value=value, key_index=key, empty_rows=empty, global_rows=global_rows))


def _materialize_valid(mask: Mask, query: Tensor, key: Tensor, num_keys: int, bias, query_offset: int = 0) -> Tensor:
    """``mask`` (and ``bias``) at positions [blocks, queries] x [blocks, keys], with key positions outside
    [0, num_keys) blocked: [batch | 1, heads | 1, blocks, queries, keys]."""
    valid = ((key >= 0) & (key < num_keys)).unsqueeze(-2)[None, None]
    value = mask.materialize_at(query, key, num_keys=num_keys, query_offset=query_offset)
    value = value & valid if value.dtype == torch.bool else value.masked_fill(~valid, float("-inf"))
    return with_bias(value, None if bias is None else bias(query, key))


def prepare_mask_at(mask: Mask, query_index: Tensor, key_index: Tensor, num_keys: int, *, query_offset: int = 0,
                    bias=None) -> PreparedMask:
    """``mask`` prepared for queries at positions ``query_index`` [queries] over keys at positions ``key_index``
    [keys], in that order (a rolling cache's slots); keys at positions outside [0, num_keys) are blocked. ``bias``
    as in ``prepare_blocked_mask``."""
    value = _materialize_valid(mask, query_index.unsqueeze(0), key_index.unsqueeze(0), num_keys, bias,
                               query_offset).squeeze(2)
    value, empty = _open_empty_rows(value)
    return PreparedMask(value=value, empty_rows=empty)


def _blocks_first(value: Tensor) -> Tensor:
    """[batch | 1, heads | 1, blocks, queries, keys] -> [batch * blocks | blocks, heads | 1, queries, keys] (a mask
    the same for every row stays one; attention expands it a group of blocks at a time)."""
    value = value.transpose(1, 2)
    return value.reshape(-1, *value.shape[2:])
