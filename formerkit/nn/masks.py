"""Attention masks as values.

A mask says which keys each query may attend to. Masks are small objects you build, combine with ``&`` and inspect;
attention takes one. ``CausalMask() & KeyPaddingMask(attention_mask)`` is a decoder over a padded batch.

Every mask materializes to a tensor broadcastable to ``[batch, heads, queries, keys]``: boolean (True = may attend) or,
for masks that carry scores, additive float (0 = attend freely, ``-inf`` = blocked). Queries are numbered from
``query_offset`` (the number of keys already cached when decoding step by step), keys from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from formerkit.errors import InputError

__all__ = [
    "AllOf",
    "CausalMask",
    "DocumentMask",
    "KeyPaddingMask",
    "Mask",
    "PrefixLMMask",
    "SlidingWindowMask",
    "TensorMask",
    "as_mask",
    "prepare_attention_mask",
]


class Mask:
    """Base class: which keys each query may attend to."""

    # True for masks that fix the order in which tokens see each other (PrefixLMMask): such a mask takes the place of
    # a decoder's causal mask instead of being combined with it.
    defines_order = False

    def materialize(self, num_queries: int, num_keys: int, *, query_offset: int = 0,
                    device: torch.device | str | None = None) -> Tensor:
        """The mask as a tensor broadcastable to [batch, heads, num_queries, num_keys] (see the module docstring)."""
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


def _positions(num_queries: int, num_keys: int, query_offset: int, device) -> tuple[Tensor, Tensor]:
    query = torch.arange(query_offset, query_offset + num_queries, device=device).view(-1, 1)
    key = torch.arange(num_keys, device=device).view(1, -1)
    return query, key


@dataclass(frozen=True, eq=False)
class CausalMask(Mask):
    """A query sees keys at its own position and before (a decoder)."""

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        query, key = _positions(num_queries, num_keys, query_offset, device)
        return (key <= query).view(1, 1, num_queries, num_keys)

    def __repr__(self) -> str:
        return "CausalMask()"


@dataclass(frozen=True, eq=False)
class SlidingWindowMask(Mask):
    """A query sees only keys fewer than ``window`` positions away (with CausalMask: itself and window - 1 before)."""

    window: int

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise InputError(f"SlidingWindowMask: window must be an integer >= 1, got {self.window!r}")

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        query, key = _positions(num_queries, num_keys, query_offset, device)
        return ((query - key).abs() < self.window).view(1, 1, num_queries, num_keys)


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
        object.__setattr__(self, "keep", _as_keep(keep, "KeyPaddingMask"))

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        if self.keep.shape[1] != num_keys:
            raise InputError(f"KeyPaddingMask: covers {self.keep.shape[1]} keys, but attention has {num_keys}")
        return self.keep.to(device).view(self.keep.shape[0], 1, 1, num_keys)

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

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        query, key = _positions(num_queries, num_keys, query_offset, device)
        causal = key <= query
        if isinstance(self.prefix_length, Tensor):
            length = self.prefix_length.to(device).view(-1, 1, 1, 1)
            return causal.view(1, 1, num_queries, num_keys) | (key < length)
        return (causal | (key < self.prefix_length)).view(1, 1, num_queries, num_keys)

    def batch_size(self) -> int | None:
        return self.prefix_length.shape[0] if isinstance(self.prefix_length, Tensor) else None


@dataclass(frozen=True, eq=False)
class DocumentMask(Mask):
    """Packed sequences: a token sees only tokens of its own document. ``document_ids`` is [batch, tokens]."""

    document_ids: Tensor

    def __post_init__(self) -> None:
        ids = self.document_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise InputError(f"DocumentMask: expected an integer tensor [batch, tokens], got {shape}")

    def materialize(self, num_queries, num_keys, *, query_offset=0, device=None):
        ids = self.document_ids.to(device)
        if ids.shape[1] != num_keys or query_offset + num_queries > num_keys:
            raise InputError(f"DocumentMask: covers {ids.shape[1]} tokens, but attention has {num_keys} keys")
        queries = ids[:, query_offset:query_offset + num_queries]
        return (queries.unsqueeze(-1) == ids.unsqueeze(1)).unsqueeze(1)

    def batch_size(self) -> int:
        return self.document_ids.shape[0]


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
        while value.dim() < 4:
            value = value.unsqueeze(0)
        if value.dtype != torch.bool:
            value = value.masked_fill(value <= torch.finfo(value.dtype).min, float("-inf"))
        return value.to(device)

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
        allowed, scores = None, None
        for part in self.parts:
            value = part.materialize(num_queries, num_keys, query_offset=query_offset, device=device)
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


def _as_keep(keep: Tensor, where: str) -> Tensor:
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
class PreparedMask:
    """A mask ready for ``scaled_dot_product_attention``, built once per forward and shared by every layer.

    Either ``is_causal`` (no tensor: SDPA's own causal path) or ``value`` (bool or additive float), or neither (no
    mask). ``empty_rows`` marks queries that may attend to no key at all; attention returns zeros for them.
    """

    value: Tensor | None = None
    is_causal: bool = False
    empty_rows: Tensor | None = None


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
    if bias is not None:
        value = bias if value is None else (bias + value if value.dtype != torch.bool
                                            else bias.masked_fill(~value, float("-inf")))
    if value.dtype == torch.bool:
        empty = ~value.any(dim=-1, keepdim=True)
        if bool(empty.any()):
            return PreparedMask(value=value | empty, empty_rows=empty)
        return PreparedMask(value=value)
    empty = (value == float("-inf")).all(dim=-1, keepdim=True)
    if bool(empty.any()):
        return PreparedMask(value=value.masked_fill(empty, 0.0), empty_rows=empty)
    return PreparedMask(value=value)
