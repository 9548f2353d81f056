"""The one Transformer: stem -> positions -> stack(s) of blocks -> head, every part chosen by a ModelConfig.

An encoder reads its input in both directions; a decoder is causal; an encoder-decoder runs an encoder over the source
and a causal decoder over the target that reads the encoder's output through cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.nn.block import DropPath, TransformerBlock
from formerkit.nn.cache import KVCache
from formerkit.nn.heads import build_head
from formerkit.nn.masks import (
    CausalMask,
    KeyPaddingMask,
    Mask,
    PreparedMask,
    SlidingWindowMask,
    SoftCausalMask,
    _as_keep,
    _parts,
    as_mask,
    prepare_attention_mask,
    prepare_blocked_mask,
    prepare_mask_at,
    window_block_size,
)
from formerkit.nn.moe import Routing
from formerkit.nn.norms import build_norm
from formerkit.nn.positions import build_positions
from formerkit.nn.stems import build_stem
from formerkit.nn.tome import TokenMerging

__all__ = ["ModelOutput", "Transformer", "TransformerStack", "build_model"]


@dataclass
class ModelOutput:
    """Everything a forward pass can report. ``logits`` is what a plain call returns."""

    logits: Tensor
    # The final hidden states [batch, tokens, width] (after the final norm, before the head).
    last_hidden_state: Tensor
    # With output_hidden_states: the stack's input, then each layer's output (before the final norm).
    hidden_states: tuple[Tensor, ...] | None = None
    # With output_attentions: each layer's attention probabilities [batch, heads, queries, keys].
    attentions: tuple[Tensor, ...] | None = None
    # The pooled vector (after the pooler, if any) for heads that pool.
    pooled: Tensor | None = None
    # With a distillation token (stem.distill_token): (the class head's logits, the distillation head's logits), whose
    # mean is ``logits``.
    head_logits: tuple[Tensor, Tensor] | None = None
    # Auxiliary losses of parts that have them, to add to the objective: with mixture-of-experts layers,
    # feedforward.aux_loss_weight times the sum of their load-balancing losses (one per layer applied); else None.
    aux_loss: Tensor | None = None
    # With mixture-of-experts layers: per layer applied (encoder first), the token assignments each expert received.
    expert_counts: tuple[Tensor, ...] | None = None
    # encoder_decoder: the encoder's final hidden states.
    encoder_last_hidden_state: Tensor | None = None
    # With merge_tokens: how many input tokens each final token holds [batch, tokens] (prefix tokens included).
    token_sizes: Tensor | None = None


class TransformerStack(nn.Module):
    """``num_layers`` blocks in sequence (cycling through ``num_unique_layers`` distinct blocks when weights are
    shared), followed by the final norm when the config has one."""

    def __init__(self, config: ModelConfig, num_layers: int, *, cross_attention: bool = False):
        super().__init__()
        unique = config.num_unique_layers or num_layers
        rates = [config.drop_path * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(TransformerBlock(config, cross_attention=cross_attention, index=i)
                                    for i in range(unique))
        # Stochastic depth rises linearly with depth (Huang et al.); a per-layer module, so shared blocks follow it too.
        self.drop_paths = nn.ModuleList(DropPath(rate) for rate in rates)
        self.num_layers = num_layers
        attention = config.attention
        window_layers = attention.sliding_window_layers
        self.windowed = tuple(attention.sliding_window is not None
                              and (window_layers is None or i in window_layers) for i in range(num_layers))
        # The attention each depth computes (softmax, l2, linear).
        self.kinds = tuple(attention.kind if attention.kind_layers is None or i in attention.kind_layers
                           else "softmax" for i in range(num_layers))
        norm = config.norm
        self.final_norm = build_norm(norm.kind, config.width, norm.eps, norm.bias) if norm.has_final else None

    @property
    def needs_full_mask(self) -> bool:
        """Whether some layer attends with the plain (not windowed, not linear) mask."""
        return any(not windowed and kind != "linear" for windowed, kind in zip(self.windowed, self.kinds))

    @property
    def needs_linear_mask(self) -> bool:
        return "linear" in self.kinds

    def forward(self, hidden: Tensor, mask: PreparedMask | None, *, window_mask: PreparedMask | None = None,
                linear_mask: PreparedMask | None = None, rotary: tuple[Tensor, Tensor] | None = None,
                memory: Tensor | None = None,
                memory_mask: PreparedMask | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, cache: KVCache | None = None, token_keep: Tensor | None = None,
                routing: list[Routing] | None = None,
                merging: TokenMerging | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Returns the final hidden states, the per-layer states and attentions asked for. ``token_keep``
        ([batch, tokens], True for a real token) keeps padding out of mixture-of-experts routing; when ``routing`` is
        a list, every mixture layer applied appends its ``Routing`` to it (a shared block once per depth it runs at).
        ``merging`` merges tokens in every layer (``formerkit.nn.tome``).
        """
        states, attentions = [], []
        for index in range(self.num_layers):
            if output_hidden_states:
                states.append(hidden)
            block = self.blocks[index % len(self.blocks)]
            hidden, weights = self.layer(index, hidden, mask, window_mask=window_mask, linear_mask=linear_mask,
                                         rotary=rotary, memory=memory, memory_mask=memory_mask,
                                         need_weights=output_attentions, cache=cache, token_keep=token_keep,
                                         merging=merging)
            if routing is not None and block.mixture:
                routing.append(block.feedforward.last_routing)
            if output_attentions:
                attentions.append(weights)
        if output_hidden_states:
            states.append(hidden)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return hidden, states, attentions

    def layer(self, index: int, hidden: Tensor, mask: PreparedMask | None, *,
              window_mask: PreparedMask | None = None, linear_mask: PreparedMask | None = None,
              **options) -> tuple[Tensor, Tensor | None]:
        """Runs layer ``index`` alone (its block, mask, attention kind and stochastic depth), as ``forward`` does for
        each layer and early exit (``formerkit.nn.early_exit``) does layer by layer. ``options`` go to the block."""
        kind = self.kinds[index]
        layer_mask = linear_mask if kind == "linear" else window_mask if self.windowed[index] else mask
        return self.blocks[index % len(self.blocks)](
            hidden, layer_mask, drop_path=self.drop_paths[index] if self.training else None, layer=index, kind=kind,
            **options)


class Transformer(nn.Module):
    """A Transformer built from a ModelConfig; ``model.config`` is that config.

    Calling the model returns the logits (LM: [batch, tokens, vocab]; classification: [batch, classes]; a model with
    no head: the final hidden states). ``return_outputs=True`` (implied by ``output_hidden_states`` or
    ``output_attentions``) returns a ``ModelOutput`` instead.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise InputError(f"Transformer: expected a formerkit.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.stem = build_stem(config)
        self.positions = build_positions(config)
        norm = config.norm
        self.embedding_norm = (build_norm(norm.kind, config.width, norm.eps, norm.bias)
                               if config.stem.embedding_norm else None)
        self.embedding_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        if config.arch == "decoder":
            self.decoder = TransformerStack(config, config.num_layers)
        else:
            self.encoder = TransformerStack(config, config.num_layers)
            if config.arch == "encoder_decoder":
                self.decoder = TransformerStack(config, config.decoder_layers, cross_attention=True)
        self.head = build_head(config)
        self.reset_parameters()
        if config.head.tie_embeddings:
            self.head.projection.weight = self.stem.tokens.weight

    # ----- initialization -----

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; residual output projections scaled by
        1/sqrt(2 * depth) (GPT-2); LayerScale and fixed tables keep their constructed values."""
        std = self.config.init_std
        depth = self.config.num_layers + (self.config.decoder_layers if self.config.arch == "encoder_decoder" else 0)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                if isinstance(module, nn.Conv2d) and self.config.stem.kind == "conv":
                    nn.init.kaiming_normal_(module.weight)  # CCT's tokenizer convolutions
                else:
                    nn.init.normal_(module.weight, std=std)
                if name.endswith(("attention.out", "feedforward.fc_out")) or (
                        ".feedforward.experts." in name and name.endswith(".fc_out")):
                    module.weight.data.mul_(1.0 / math.sqrt(2 * depth))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for name, parameter in self.named_parameters():
            if name in ("positions.weight", "stem.class_token", "stem.distill_token", "stem.registers"):
                nn.init.normal_(parameter, std=std)

    # ----- input handling -----

    def _check_stem_input(self, inputs: Tensor, token_type_ids: Tensor | None, name: str) -> None:
        if self.config.stem.kind == "tokens":
            self.stem.check(inputs, token_type_ids, name)
        else:
            if token_type_ids is not None:
                raise InputError(f"token_type_ids: only a tokens stem takes token types, this model's stem is "
                                 f"{self.config.stem.kind!r}")
            self.stem.check(inputs, name)

    def _token_keep(self, inputs: Tensor, attention_mask: Tensor | None, name: str) -> Tensor | None:
        """The [batch, tokens] keep-mask over the stem's output tokens (prefix tokens included), or None if nothing
        is padded."""
        if attention_mask is None:
            return None
        kind = self.config.stem.kind
        if kind in ("patches", "conv"):
            raise InputError(f"{name}: image models take no padding mask (every patch is real)")
        if not isinstance(attention_mask, Tensor):
            raise InputError(f"{name}: expected a tensor [batch, tokens] with 1 for tokens and 0 for padding, got "
                             f"{type(attention_mask).__name__}")
        tokens = inputs.shape[1] // (self.stem.patch_size if kind == "linear" else 1)
        expected = [inputs.shape[0], tokens]
        if list(attention_mask.shape) != expected:
            raise InputError(f"{name}: expected shape {expected} (batch, tokens) to match the input, "
                             f"got {list(attention_mask.shape)}")
        keep = _as_keep(attention_mask, name)
        if keep.device.type != "meta" and not torch.compiler.is_compiling() and bool(keep.all()):
            return None
        prefix = self.stem.num_prefix_tokens
        if prefix:
            keep = torch.cat([keep.new_ones(keep.shape[0], prefix), keep], dim=1)
        return keep

    def _check_position_ids(self, position_ids: Tensor | None, shape: tuple[int, int]) -> None:
        if position_ids is None:
            return
        if self.config.stem.kind != "tokens":
            raise InputError("position_ids: only a tokens stem takes explicit positions")
        if not isinstance(position_ids, Tensor) or list(position_ids.shape) != list(shape):
            got = list(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
            raise InputError(f"position_ids: expected shape {list(shape)} like the input ids, got {got}")
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise InputError(f"position_ids: expected an integer tensor, got dtype {position_ids.dtype}")
        if position_ids.device.type != "meta" and not torch.compiler.is_compiling():
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= self.config.num_positions:
                raise InputError(f"position_ids: must lie in [0, {self.config.num_positions}) (max_seq_len), "
                                 f"got values from {low} to {high}")

    def embed(self, inputs: Tensor, *, keep: Tensor | None = None, position_ids: Tensor | None = None,
              token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Stem, absolute positions, registers, embedding norm and dropout. Returns the hidden states and the
        position ids the attention layers should use (None means 0, 1, 2, ...)."""
        if self.config.stem.kind == "tokens":
            hidden = self.stem(inputs, token_type_ids)
            if position_ids is None and keep is not None:
                # Positions count real tokens only, so a left-padded row gets the same positions as when unpadded.
                position_ids = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            hidden = self.stem(inputs)
        hidden = self.positions.encode_input(hidden, position_ids)
        hidden = self.stem.add_registers(hidden)
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        return self.embedding_dropout(hidden), position_ids

    def _self_attention_masks(self, stack: TransformerStack, causal: bool, keep: Tensor | None, mask: Mask | None,
                              length: int, position_ids: Tensor | None, device,
                              cache: KVCache | None = None,
                              need_weights: bool = False) -> dict[str, PreparedMask | None]:
        """The masks the layers of ``stack`` share: ``mask`` (plain layers), ``window_mask`` (sliding-window
        layers; blockwise for long inputs) and ``linear_mask`` (linear attention), each built only if some layer
        uses it. With a cache, the ``length`` queries follow the ``cache.start`` cached tokens and see keys
        ``[0, cache.end)``; ``keep`` then covers all of those keys."""
        offset, num_keys = (cache.start, cache.end) if cache is not None else (0, length)
        attention = self.config.attention
        parts: list[Mask] = []
        if causal and not (mask is not None and mask.defines_order):
            strength = self.soft_causal_strength if attention.soft_causal_steps is not None else 1.0
            parts.append(CausalMask() if strength >= 1.0 else SoftCausalMask(strength))
        if keep is not None:
            parts.append(KeyPaddingMask(keep))
        if mask is not None:
            parts.append(mask)
        combined = None
        for part in parts:
            combined = part if combined is None else combined & part
        bias = bias_at = None
        if self.positions.uses_bias:
            positions = (position_ids if position_ids is not None
                         else torch.arange(length, device=device).unsqueeze(0))
            keys = cache.key_positions() if cache is not None else positions
            bias = self.positions.attention_bias(positions, keys)

            def bias_at(query_index: Tensor, key_index: Tensor) -> Tensor:
                # Position ids read at the given positions (clamped; positions outside the sequence are masked).
                last = keys.shape[1] - 1
                return self.positions.attention_bias(keys[:, query_index.clamp(0, last)],
                                                     keys[:, key_index.clamp(0, last)])

        masks: dict[str, PreparedMask | None] = {"mask": None, "window_mask": None, "linear_mask": None}
        if stack.needs_full_mask:
            masks["mask"] = prepare_attention_mask(combined, length, num_keys, query_offset=offset, bias=bias,
                                                   device=device)
        window = attention.sliding_window
        if window is not None and any(stack.windowed):
            local = SlidingWindowMask(window, attention.global_tokens)
            local = local if combined is None else combined & local
            if cache is not None and cache.slot_tokens is not None:
                # Rolling buffers: the keys are the slots (in slot order), then, in a pass of several tokens, the
                # pass's own keys.
                masks["window_mask"] = prepare_mask_at(
                    local, torch.arange(offset, num_keys, device=device), cache.window_key_index(), num_keys,
                    query_offset=offset, bias=bias_at)
            # Blocks pay off once the sequence is longer than the window plus a couple of blocks.
            elif cache is None and not need_weights and length >= window + 2 * window_block_size(window):
                masks["window_mask"] = prepare_blocked_mask(local, length, window,
                                                            global_tokens=attention.global_tokens, bias=bias_at,
                                                            device=device)
            else:
                masks["window_mask"] = prepare_attention_mask(local, length, num_keys, query_offset=offset,
                                                              bias=bias, device=device)
        if stack.needs_linear_mask:
            structural = combined is None or all(isinstance(part, (CausalMask, KeyPaddingMask))
                                                 for part in _parts(combined))
            if cache is None and structural and bias is None:
                masks["linear_mask"] = PreparedMask(is_causal=any(isinstance(part, CausalMask) for part in parts),
                                                    key_keep=keep)
            else:
                masks["linear_mask"] = prepare_attention_mask(combined, length, num_keys, query_offset=offset,
                                                              bias=bias, device=device)
        return masks

    @property
    def soft_causal_strength(self) -> float:
        """How far the causal mask has faded in (attention.soft_causal_steps): 1.0 (fully causal) unless training
        has set it through ``set_training_step``."""
        return getattr(self, "_soft_causal_strength", 1.0)

    def set_training_step(self, step: int) -> None:
        """Tells the model which optimizer step training is at (the trainer calls it before every step): with
        attention.soft_causal_steps, the causal mask's strength is ``min(1, step / soft_causal_steps)``."""
        steps = self.config.attention.soft_causal_steps
        self._soft_causal_strength = 1.0 if steps is None else min(1.0, step / steps)

    def _check_mask(self, mask: Mask | Tensor | None, batch: int, length: int, num_keys: int | None = None,
                    query_offset: int = 0) -> Mask | None:
        mask = as_mask(mask)
        num_keys = length if num_keys is None else num_keys
        if mask is not None:
            size = mask.batch_size()
            if size is not None and size != batch:
                raise InputError(f"mask: built for a batch of {size}, but the input has a batch of {batch}")
            probe = mask.materialize(length, num_keys, query_offset=query_offset, device="meta")
            if probe.dim() != 4 or probe.shape[0] not in (1, batch) or probe.shape[1] not in (
                    1, self.config.attention.num_heads):
                raise InputError(f"mask: expected a shape broadcastable to [batch={batch}, "
                                 f"heads={self.config.attention.num_heads}, {length}, {num_keys}], "
                                 f"got {list(probe.shape)}")
        return mask

    # ----- forward -----

    def _run_stack(self, stack: TransformerStack, inputs: Tensor, *, causal: bool, attention_mask, mask,
                   position_ids, token_type_ids, memory=None, memory_keep=None, output_hidden_states=False,
                   output_attentions=False, name="inputs", cache: KVCache | None = None,
                   merging: TokenMerging | None = None):
        """Checks the inputs, embeds them and runs ``stack``. Returns the final hidden states, the keep-mask of the
        tokens (None without padding), the states and attentions asked for, and the mixture layers' ``Routing``s
        (None when the model has no mixture layers)."""
        self._check_stem_input(inputs, token_type_ids, name)
        self._check_position_ids(position_ids, tuple(inputs.shape[:2]))
        keep = self._token_keep(inputs, attention_mask, "attention_mask" if name == "inputs" else
                                "decoder_attention_mask")
        length = self.stem.num_tokens(inputs)
        if merging is not None:
            merging.start(length)
        if cache is None:
            mask = self._check_mask(mask, inputs.shape[0], length)
            hidden, position_ids = self.embed(inputs, keep=keep, position_ids=position_ids,
                                              token_type_ids=token_type_ids)
            masks = self._self_attention_masks(stack, causal, keep, mask, length, position_ids, hidden.device,
                                               need_weights=output_attentions)
        else:
            if position_ids is not None:
                raise InputError("position_ids: with a cache, positions continue from the cached tokens; "
                                 "pass attention_mask for padding instead")
            if inputs.shape[0] != cache.batch_size:
                raise InputError(f"cache: built for a batch of {cache.batch_size}, the input has a batch of "
                                 f"{inputs.shape[0]}")
            if cache.length + length > cache.max_length:
                raise InputError(f"cache: {length} new tokens after {cache.length} cached ones exceed its "
                                 f"max_length {cache.max_length}")
            mask = self._check_mask(mask, inputs.shape[0], length, cache.length + length, cache.length)
            position_ids = cache.begin(keep, length)
            hidden, _ = self.embed(inputs, position_ids=position_ids, token_type_ids=token_type_ids)
            masks = self._self_attention_masks(stack, causal, cache.key_keep(), mask, length, position_ids,
                                               hidden.device, cache, need_weights=output_attentions)
        rotary = self.positions.rotary(position_ids, length)
        memory_mask = None
        if memory is not None:
            memory_mask = prepare_attention_mask(None if memory_keep is None else KeyPaddingMask(memory_keep),
                                                 length, memory.shape[1], device=hidden.device)
        routing = [] if self.config.feedforward.mixture else None
        try:
            hidden, states, attentions = stack(hidden, masks["mask"], window_mask=masks["window_mask"],
                                               linear_mask=masks["linear_mask"], rotary=rotary, memory=memory,
                                               memory_mask=memory_mask, output_hidden_states=output_hidden_states,
                                               output_attentions=output_attentions, cache=cache, token_keep=keep,
                                               routing=routing, merging=merging)
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        if cache is not None:
            cache.commit()
        return hidden, keep, states, attentions, routing

    def encode(self, inputs: Tensor, *, attention_mask: Tensor | None = None, mask: Mask | Tensor | None = None,
               position_ids: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        """encoder_decoder: the encoder's final hidden states [batch, source tokens, width]."""
        if self.config.arch != "encoder_decoder":
            raise InputError(f"encode: only an encoder_decoder model has a separate encoder (arch is "
                             f"{self.config.arch!r}); call the model instead")
        hidden, _, _, _, _ = self._run_stack(self.encoder, inputs, causal=False, attention_mask=attention_mask,
                                             mask=mask, position_ids=position_ids, token_type_ids=token_type_ids)
        return hidden

    def forward(self, inputs: Tensor, *, attention_mask: Tensor | None = None, mask: Mask | Tensor | None = None,
                position_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                return_outputs: bool = False, cache: KVCache | None = None,
                logits_to_keep: int | None = None,
                merge_tokens: int | Sequence[int] | None = None) -> Tensor | ModelOutput:
        """Runs the model.

        inputs: token ids [batch, tokens], images [batch, channels, height, width] or numeric sequences
            [batch, steps, input_dim], by the stem. For an encoder_decoder, the source token ids.
        attention_mask: [batch, tokens], 1 for a real token and 0 for padding (either side).
        mask: any formerkit Mask (or a bool/additive tensor) combined with the model's own masks. A decoder's causal
            mask is kept unless ``mask`` fixes the order itself (PrefixLMMask).
        position_ids: [batch, tokens] explicit positions (default: counts of real tokens).
        decoder_input_ids, decoder_attention_mask: encoder_decoder only, the target side.
        cache: a ``KVCache`` for decoding step by step (see ``generate``): the new tokens attend to the cached ones
            and are appended to it; ``attention_mask`` then covers the new tokens only. An encoder_decoder's cache
            keeps the encoder's output of its first pass, and later passes do not re-encode ``inputs``.
        logits_to_keep: compute logits for the last N tokens only (token-level heads), as generation needs.
        merge_tokens: token merging (ToMe, see ``formerkit.nn.tome``) for encoders that classify: every layer merges
            this many tokens (or one count per layer) after attention; 0 is the plain model. Takes no masks.
        """
        config = self.config
        merging = None
        if merge_tokens is not None:
            merging = TokenMerging(config, merge_tokens)
            if attention_mask is not None or mask is not None:
                raise InputError("merge_tokens: token merging takes no attention_mask or mask (they describe the "
                                 "unmerged tokens, and padding would be merged into real tokens); pass unpadded "
                                 "inputs")
        encoder_state, routing = None, []
        if cache is not None:
            if config.arch == "encoder":
                raise InputError("cache: only decoder and encoder_decoder models decode step by step")
            if self.training:
                raise InputError("cache: decoding with a cache is for inference; call model.eval() first")
            if not isinstance(cache, KVCache):
                raise InputError(f"cache: expected a formerkit KVCache, got {type(cache).__name__}")
        if logits_to_keep is not None and (isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int)
                                           or logits_to_keep < 1 or config.head.kind not in ("lm", "masked_lm")):
            raise InputError(f"logits_to_keep: expected an integer >= 1 with a token-level head (lm, masked_lm), "
                             f"got {logits_to_keep!r} with head {config.head.kind!r}")
        if config.arch == "encoder_decoder":
            if decoder_input_ids is None:
                raise InputError("decoder_input_ids: an encoder_decoder model needs the target tokens "
                                 "(decoder_input_ids=...) besides the source tokens")
            self._check_stem_input(decoder_input_ids, None, "decoder_input_ids")
            if decoder_input_ids.shape[0] != inputs.shape[0]:
                raise InputError(f"decoder_input_ids: batch {decoder_input_ids.shape[0]} differs from the source "
                                 f"batch {inputs.shape[0]}")
            if cache is not None and cache.memory is not None:
                memory, memory_keep = cache.memory, cache.memory_keep
            else:
                memory, memory_keep, _, _, encoder_routing = self._run_stack(
                    self.encoder, inputs, causal=False, attention_mask=attention_mask, mask=None,
                    position_ids=None, token_type_ids=token_type_ids)
                routing += encoder_routing or []
                if cache is not None:
                    cache.memory, cache.memory_keep = memory, memory_keep
            encoder_state = memory
            hidden, keep, states, attentions, stack_routing = self._run_stack(
                self.decoder, decoder_input_ids, causal=True, attention_mask=decoder_attention_mask, mask=mask,
                position_ids=position_ids, token_type_ids=None, memory=memory, memory_keep=memory_keep,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                name="decoder_input_ids", cache=cache)
        else:
            if decoder_input_ids is not None or decoder_attention_mask is not None:
                raise InputError(f"decoder_input_ids: only an encoder_decoder model takes them (arch is "
                                 f"{config.arch!r})")
            stack = self.decoder if config.arch == "decoder" else self.encoder
            hidden, keep, states, attentions, stack_routing = self._run_stack(
                stack, inputs, causal=config.arch == "decoder", attention_mask=attention_mask, mask=mask,
                position_ids=position_ids, token_type_ids=token_type_ids,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, cache=cache,
                merging=merging)
        sizes = None if merging is None else merging.sizes
        wants_outputs = return_outputs or output_hidden_states or output_attentions
        head_logits = None
        if logits_to_keep is not None:
            logits = self.head(hidden[:, -logits_to_keep:], None if keep is None else keep[:, -logits_to_keep:])
        elif wants_outputs and getattr(self.head, "distill_projection", None) is not None:
            # Both heads' logits for ModelOutput, computed once (one dropout draw): the logits are their mean.
            head_logits = self.head.parts(hidden, keep, token_sizes=sizes)
            logits = self.head.combine(head_logits)
        elif merging is not None:
            logits = self.head(hidden, keep, token_sizes=sizes)
        else:
            logits = self.head(hidden, keep)
        if not wants_outputs:
            return logits
        pooled = self.head.pool(hidden, keep, token_sizes=sizes) if hasattr(self.head, "pool") and (
            self.head.pooling is not None or self.head.pooler is not None) else None
        aux_loss = expert_counts = None
        if config.feedforward.mixture:
            routing += stack_routing
            # A cached encoder_decoder pass reruns only the decoder, which may have no mixture layers.
            total = (torch.stack([r.aux_loss for r in routing]).sum() if routing
                     else hidden.new_zeros((), dtype=torch.float))
            aux_loss = config.feedforward.aux_loss_weight * total
            expert_counts = tuple(r.expert_counts for r in routing)
        return ModelOutput(logits=logits, last_hidden_state=hidden, head_logits=head_logits,
                           hidden_states=tuple(states) if output_hidden_states else None,
                           attentions=tuple(attentions) if output_attentions else None,
                           pooled=pooled, aux_loss=aux_loss, expert_counts=expert_counts,
                           encoder_last_hidden_state=encoder_state, token_sizes=sizes)

    # ----- generation -----

    def generate(self, input_ids, max_new_tokens: int, **options) -> Tensor:
        """Prompt followed by up to ``max_new_tokens`` generated tokens; see ``formerkit.generation.generate``
        (temperature, top_k, top_p, stop_tokens, seed, attention_mask for left-padded batches, ...)."""
        from formerkit.generation import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def stream(self, input_ids, max_new_tokens: int, **options):
        """Yields each step's new tokens [batch] as they are generated; see ``formerkit.generation.stream``."""
        from formerkit.generation import stream

        return stream(self, input_ids, max_new_tokens, **options)

    def num_parameters(self) -> int:
        """Parameters, counting a tied weight once."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"arch={self.config.arch!r}, parameters={self.num_parameters():,}"


def build_model(config: ModelConfig | dict) -> Transformer:
    """Builds a model from a ModelConfig (or a dict of its fields)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return Transformer(config)
