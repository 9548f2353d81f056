"""The checks every input of a ``Transformer`` gets before any tensor work: each names the argument, what was expected
and what was given. ``Transformer.prepare`` and ``forward`` call them."""

from __future__ import annotations

import torch
from torch import Tensor

from formerkit.errors import InputError
from formerkit.nn.cache import KVCache
from formerkit.nn.masks import Mask, as_keep, as_mask
from formerkit.nn.tome import TokenMerging

__all__ = ["check_cache", "check_call", "check_mask", "check_position_ids", "check_stem_input", "check_target",
           "token_keep", "token_merging"]


def token_merging(model, merge_tokens, attention_mask, mask) -> TokenMerging | None:
    """The pass's ``TokenMerging`` for ``merge_tokens`` (checked against the model), or None without it."""
    if merge_tokens is None:
        return None
    merging = TokenMerging(model.config, merge_tokens)
    if attention_mask is not None or mask is not None:
        raise InputError("merge_tokens: token merging takes no attention_mask or mask (they describe the "
                         "unmerged tokens, and padding would be merged into real tokens); pass unpadded inputs")
    return merging


def check_call(model, cache, logits_to_keep) -> None:
    """The cache and ``logits_to_keep`` of a call, against the model and its mode."""
    config = model.config
    if cache is not None:
        if config.arch == "encoder":
            raise InputError("cache: only decoder and encoder_decoder models decode step by step")
        if model.training:
            raise InputError("cache: decoding with a cache is for inference; call model.eval() first")
        if not isinstance(cache, KVCache):
            raise InputError(f"cache: expected a formerkit KVCache, got {type(cache).__name__}")
    if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int)
                                       or logits_to_keep < 1 or config.head.kind not in ("lm", "masked_lm")):
        raise InputError(f"logits_to_keep: expected an integer >= 1 with a token-level head (lm, masked_lm), "
                         f"got {logits_to_keep!r} with head {config.head.kind!r}")


def check_target(model, inputs: Tensor, decoder_input_ids: Tensor | None) -> None:
    """An encoder_decoder's target tokens, against the source batch."""
    if decoder_input_ids is None:
        raise InputError("decoder_input_ids: an encoder_decoder model needs the target tokens "
                         "(decoder_input_ids=...) besides the source tokens")
    check_stem_input(model, decoder_input_ids, None, "decoder_input_ids")
    if decoder_input_ids.shape[0] != inputs.shape[0]:
        raise InputError(f"decoder_input_ids: batch {decoder_input_ids.shape[0]} differs from the source "
                         f"batch {inputs.shape[0]}")


def check_cache(cache: KVCache, inputs: Tensor, length: int, position_ids: Tensor | None) -> None:
    """A pass of ``length`` new tokens against the cache they are appended to."""
    if position_ids is not None:
        raise InputError("position_ids: with a cache, positions continue from the cached tokens; "
                         "pass attention_mask for padding instead")
    if inputs.shape[0] != cache.batch_size:
        raise InputError(f"cache: built for a batch of {cache.batch_size}, the input has a batch of "
                         f"{inputs.shape[0]}")
    if cache.length + length > cache.max_length:
        raise InputError(f"cache: {length} new tokens after {cache.length} cached ones exceed its "
                         f"max_length {cache.max_length}")


def check_stem_input(model, inputs: Tensor, token_type_ids: Tensor | None, name: str) -> None:
    """``inputs`` (called ``name`` in errors) against what the model's stem reads."""
    if model.config.stem.kind == "tokens":
        model.stem.check(inputs, token_type_ids, name)
    else:
        if token_type_ids is not None:
            raise InputError(f"token_type_ids: only a tokens stem takes token types, this model's stem is "
                             f"{model.config.stem.kind!r}")
        model.stem.check(inputs, name)


def token_keep(model, inputs: Tensor, attention_mask: Tensor | None, name: str) -> Tensor | None:
    """The [batch, tokens] keep-mask over the stem's output tokens (prefix tokens included), or None if nothing
    is padded."""
    if attention_mask is None:
        return None
    kind = model.config.stem.kind
    if kind in ("patches", "conv"):
        raise InputError(f"{name}: image models take no padding mask (every patch is real)")
    if not isinstance(attention_mask, Tensor):
        raise InputError(f"{name}: expected a tensor [batch, tokens] with 1 for tokens and 0 for padding, got "
                         f"{type(attention_mask).__name__}")
    tokens = inputs.shape[1] // (model.stem.patch_size if kind == "linear" else 1)
    expected = [inputs.shape[0], tokens]
    if list(attention_mask.shape) != expected:
        raise InputError(f"{name}: expected shape {expected} (batch, tokens) to match the input, "
                         f"got {list(attention_mask.shape)}")
    keep = as_keep(attention_mask, name)
    if keep.device.type != "meta" and not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    prefix = model.stem.num_prefix_tokens
    if prefix:
        keep = torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)
    return keep


def check_position_ids(model, position_ids: Tensor | None, shape: tuple[int, int]) -> None:
    """Explicit positions: a tokens stem's, integer, shaped like the ids, within the position table."""
    if position_ids is None:
        return
    if model.config.stem.kind != "tokens":
        raise InputError("position_ids: only a tokens stem takes explicit positions")
    if not isinstance(position_ids, Tensor) or list(position_ids.shape) != list(shape):
        got = list(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise InputError(f"position_ids: expected shape {list(shape)} like the input ids, got {got}")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise InputError(f"position_ids: expected an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.device.type != "meta" and not torch.compiler.is_compiling():
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= model.config.num_positions:
            raise InputError(f"position_ids: must lie in [0, {model.config.num_positions}) (max_seq_len), "
                             f"got values from {low} to {high}")


def check_mask(model, mask: Mask | Tensor | None, batch: int, length: int, num_keys: int | None = None,
                query_offset: int = 0) -> Mask | None:
    """``mask`` as a formerkit Mask (None stays None), checked to broadcast over the batch, heads, queries and keys."""
    mask = as_mask(mask)
    num_keys = length if num_keys is None else num_keys
    if mask is not None:
        size = mask.batch_size()
        if size is not None and size != batch:
            raise InputError(f"mask: built for a batch of {size}, but the input has a batch of {batch}")
        probe = mask.materialize(length, num_keys, query_offset=query_offset, device="meta")
        if probe.dim() != 4 or probe.shape[0] not in (1, batch) or probe.shape[1] not in (
                1, model.config.attention.num_heads):
            raise InputError(f"mask: expected a shape broadcastable to [batch={batch}, "
                             f"heads={model.config.attention.num_heads}, {length}, {num_keys}], "
                             f"got {list(probe.shape)}")
    return mask
