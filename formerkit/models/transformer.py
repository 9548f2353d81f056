"""The one Transformer: stem -> positions -> stack(s) of blocks -> head, every part chosen by a ModelConfig.

An encoder reads its input in both directions; a decoder is causal; an encoder-decoder runs an encoder over the source
and a causal decoder over the target that reads the encoder's output through cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.generation import generate, stream
from formerkit.models.footprint import available_memory, check_fits, meta_build, part_bytes, rough_parameter_bytes
from formerkit.models.inputs import (
    check_cache,
    check_call,
    check_mask,
    check_position_ids,
    check_stem_input,
    check_target,
    token_keep,
    token_merging,
)
from formerkit.models.stack import ModelOutput, StackOutput, TransformerStack
from formerkit.nn.cache import KVCache, StaticSlots
from formerkit.nn.condition import AdaptiveModulation, ConditionEmbedding
from formerkit.nn.context import LayerContext, StackInput
from formerkit.nn.document_linear_attention import document_runs
from formerkit.nn.heads import PatchHead, build_head
from formerkit.nn.masks import (
    CausalMask,
    DocumentMask,
    KeyPaddingMask,
    Mask,
    PreparedMask,
    SlidingWindowMask,
    SoftCausalMask,
    blockwise_pays_off,
    mask_parts,
    prepare_attention_mask,
    prepare_blocked_mask,
    prepare_mask_at,
    with_bias,
)
from formerkit.nn.norms import model_norm
from formerkit.nn.positions import RotaryPositions, build_positions
from formerkit.nn.recompute import recomputed_norm_output
from formerkit.nn.stems import build_stem
from formerkit.nn.tome import TokenMerging

__all__ = ["ModelOutput", "StackOutput", "Transformer", "TransformerStack", "build_model"]


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
        device = torch.get_default_device()
        if device.type != "meta":  # refuse what cannot fit before allocating any of it
            available = available_memory(device)
            # The exact count (a meta-device build) only for a model whose largest matrices alone take a quarter.
            if available is not None and 4 * rough_parameter_bytes(config) > available:
                with meta_build():
                    shapes = Transformer(config)
                check_fits(config, part_bytes(shapes.named_parameters()), device, available=available)
        self.config = config
        self.stem = build_stem(config)
        self.positions = build_positions(config)
        # Gemma 3: the sliding-window layers rotate by tables of their own base (position.rope_local_base), plain
        # RoPE without the global layers' scaling. Fixed tables (buffers, not weights).
        position = config.position
        self.local_positions = (RotaryPositions(config.num_positions, config.head_dim, position.rope_local_base,
                                                config.rotary_dim)
                                if position.kind == "rope" and position.rope_local_base is not None else None)
        # encoder_decoder with position.separate_decoder / stem.separate_decoder_norm: the decoder's own (BART, T5).
        self.decoder_positions = build_positions(config, causal=True) if config.position.separate_decoder else None
        norm = config.norm
        self.embedding_norm = model_norm(norm, config.width) if config.stem.embedding_norm else None
        self.decoder_embedding_norm = model_norm(norm, config.width) if config.stem.separate_decoder_norm else None
        self.embedding_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        if config.arch == "decoder":
            self.decoder = TransformerStack(config, config.num_layers, causal=True)
        else:
            self.encoder = TransformerStack(config, config.num_layers)
            if config.arch == "encoder_decoder":
                self.decoder = TransformerStack(config, config.decoder_layers, causal=True,
                                                cross_attention=True)
        self.head = build_head(config)
        # condition.kind: what the blocks are conditioned on (timesteps, labels, a given vector) made into one vector.
        self.conditioning = ConditionEmbedding(config) if config.condition.kind is not None else None
        # Learned embeddings put before every input's own (prompt tuning, formerkit.adapt.prompt): a module whose
        # call returns them [virtual tokens, width] (or None: no prompt); None in a plain model. See ``forward``.
        self.input_prompt: nn.Module | None = None
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
            if name in ("positions.weight", "decoder_positions.weight", "stem.class_token", "stem.distill_token",
                        "stem.registers"):
                nn.init.normal_(parameter, std=std)
        # adaLN-Zero's modulations and DiT's final linear start at zero (a fresh conditioned block is the identity);
        # the class table at unit scale (ConditionEmbedding.reset_parameters says why).
        for module in self.modules():
            if isinstance(module, (AdaptiveModulation, PatchHead, ConditionEmbedding)):
                module.reset_parameters()

    # ----- the forward path: prepare, then the stack's layers, then the head -----

    def get_stack(self, side: str | None = None) -> TransformerStack:
        """The stack ``side`` names, "encoder" or "decoder"; None names the model's only stack (an encoder_decoder
        has two, and needs the side)."""
        arch = self.config.arch
        if side is None and arch != "encoder_decoder":
            side = "decoder" if arch == "decoder" else "encoder"
        if side not in ("encoder", "decoder") or not hasattr(self, side):
            raise InputError(f"side: expected {'encoder or decoder' if arch == 'encoder_decoder' else 'None'} for "
                             f"arch {arch!r}, got {side!r}")
        return getattr(self, side)

    def positions_of(self, stack: TransformerStack):
        """The position scheme the layers of ``stack`` read: the decoder's own when it has one."""
        if stack.causal and self.decoder_positions is not None:
            return self.decoder_positions
        return self.positions

    def prepare(self, inputs: Tensor, *, side: str | None = None, attention_mask: Tensor | None = None,
                mask: Mask | Tensor | None = None, position_ids: Tensor | None = None,
                token_type_ids: Tensor | None = None, cache: KVCache | StaticSlots | None = None,
                memory: Tensor | None = None, memory_keep: Tensor | None = None, need_weights: bool = False,
                merging: TokenMerging | None = None, prompt: Tensor | None = None,
                condition: Tensor | None = None) -> StackInput:
        """Checks the inputs of one stack, embeds them and builds every layer's ``LayerContext``: the one way from
        inputs to a stack's layers (the forward pass, early exit, the compiled decode step and MAE all use it).
        ``stack(prepared)`` then runs the layers; ``side`` picks the stack as in ``get_stack``.

        With a ``KVCache`` the new tokens are recorded in it (positions continue from the cached ones); the caller
        commits or aborts the cache after the stack has run. ``memory``/``memory_keep`` are an encoder-decoder's
        encoder output and its padding; ``merging`` is token merging for this pass; ``prompt`` [virtual tokens, width]
        are embeddings put before every row's own (prompt tuning: the stack then sees them as the first tokens, at
        positions 0, 1, ...); ``condition`` is the pass's condition vector [batch, dim] (``condition_vector``). The
        other arguments are those of ``forward``.
        """
        stack = self.get_stack(side)
        if isinstance(cache, StaticSlots):
            # The compiled decode step: one token per row after the cached ones, fixed shapes, inputs made by generate.
            position_ids = cache.begin()
            hidden, _ = self.embed(inputs, position_ids=position_ids, side=side)
            layers = self.layer_contexts(stack, hidden, position_ids=position_ids, cache=cache)
            return StackInput(hidden, layers, None, position_ids)
        target_side = self.config.arch == "encoder_decoder" and side == "decoder"
        name = "decoder_input_ids" if target_side else "inputs"
        check_stem_input(self, inputs, token_type_ids, name)
        check_position_ids(self, position_ids, tuple(inputs.shape[:2]))
        keep = token_keep(self, inputs, attention_mask, "decoder_attention_mask" if target_side else "attention_mask")
        length = self.stem.num_tokens(inputs)
        if prompt is not None:
            keep, length = self._prompt_input(prompt, inputs, keep, length, mask, position_ids, merging)
        elif (self.input_prompt is not None and (cache is None or cache.length == 0)
              and self.input_prompt() is not None):
            raise InputError("prompt tuning: only the model's forward pass (and generate) put the virtual tokens "
                             "before the input; this path (early exit, MAE, ...) does not")
        if merging is not None:
            merging.start(length)
        if cache is None:
            mask = check_mask(self, mask, inputs.shape[0], length)
            hidden, position_ids = self.embed(inputs, keep=keep, position_ids=position_ids,
                                              token_type_ids=token_type_ids, side=side, prompt=prompt)
        else:
            check_cache(cache, inputs, length, position_ids)
            mask = check_mask(self, mask, inputs.shape[0], length, cache.length + length, cache.length)
            position_ids = cache.begin(keep, length)
            hidden, _ = self.embed(inputs, position_ids=position_ids, token_type_ids=token_type_ids, side=side,
                                   prompt=prompt)
        layers = self.layer_contexts(stack, hidden, token_keep=keep, position_ids=position_ids, mask=mask,
                                     cache=cache, memory=memory, memory_keep=memory_keep, need_weights=need_weights,
                                     merging=merging, condition=condition)
        return StackInput(hidden, layers, keep, position_ids, condition)

    def _prompt_input(self, prompt: Tensor, inputs: Tensor, keep: Tensor | None, length: int, mask, position_ids,
                      merging) -> tuple[Tensor | None, int]:
        """The keep-mask and length of a pass with ``prompt``'s virtual tokens first (see ``prepare``)."""
        for given, name in ((mask, "mask"), (position_ids, "position_ids"), (merging, "merge_tokens")):
            if given is not None:
                raise InputError(f"{name}: not supported with prompt tuning (the virtual tokens come first and "
                                 f"shift every position)")
        virtual = prompt.shape[0]
        if keep is not None:
            keep = torch.cat([keep.new_ones(keep.shape[0], virtual), keep], dim=1)
        return keep, length + virtual

    def embed(self, inputs: Tensor, *, keep: Tensor | None = None, position_ids: Tensor | None = None,
              token_type_ids: Tensor | None = None, side: str | None = None,
              prompt: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Stem, absolute positions, registers, embedding norm and dropout. Returns the hidden states and the
        position ids the attention layers should use (None means 0, 1, 2, ...). ``side`` as in ``get_stack``: an
        encoder_decoder's decoder may have positions and an embedding norm of its own. ``prompt`` (a tokens stem):
        embeddings [virtual tokens, width] put before every row's token embeddings, before positions are added;
        ``keep``/``position_ids`` then cover them too."""
        decoder = side == "decoder" and self.config.arch == "encoder_decoder"
        positions = self.decoder_positions if decoder and self.decoder_positions is not None else self.positions
        embedding_norm = (self.decoder_embedding_norm if decoder and self.decoder_embedding_norm is not None
                          else self.embedding_norm)
        if self.config.stem.kind == "tokens":
            hidden = self.stem(inputs, token_type_ids)
            if prompt is not None:
                prompt = prompt.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
                hidden = torch.cat([prompt, hidden], dim=1)
            if position_ids is None and keep is not None:
                # Positions count real tokens only, so a left-padded row gets the same positions as when unpadded.
                position_ids = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            hidden = self.stem(inputs)
        hidden = positions.encode_input(hidden, position_ids)
        hidden = self.stem.add_registers(hidden)
        if embedding_norm is not None:
            hidden = embedding_norm(hidden)
        return self.embedding_dropout(hidden), position_ids

    def layer_contexts(self, stack: TransformerStack, hidden: Tensor, *, token_keep: Tensor | None = None,
                       position_ids: Tensor | None = None, mask: Mask | None = None,
                       cache: KVCache | StaticSlots | None = None, memory: Tensor | None = None,
                       memory_keep: Tensor | None = None, need_weights: bool = False,
                       merging: TokenMerging | None = None,
                       condition: Tensor | None = None) -> tuple[LayerContext, ...]:
        """Every layer's context for the embedded tokens ``hidden`` [batch, tokens, width] entering ``stack`` (see
        ``prepare``, which checks the inputs first): the masks, rotary tables and cross-attention mask of the pass.
        Early exit calls it again for the rows still running."""
        length, device = hidden.shape[1], hidden.device
        masks = self.attention_masks(stack, length=length, key_keep=token_keep, position_ids=position_ids, mask=mask,
                                     cache=cache, need_weights=need_weights, device=device)
        if isinstance(cache, StaticSlots):
            memory_mask = cache.memory_mask
        elif memory is not None:
            memory_mask = prepare_attention_mask(None if memory_keep is None else KeyPaddingMask(memory_keep),
                                                 length, memory.shape[1], device=device)
        else:
            memory_mask = None
        local_rotary = (None if self.local_positions is None or not any(stack.windowed)
                        else self.local_positions.rotary(position_ids, length))
        return stack.contexts(masks, rotary=self.positions_of(stack).rotary(position_ids, length),
                              local_rotary=local_rotary, cache=cache, memory=memory, memory_mask=memory_mask,
                              token_keep=token_keep,
                              need_weights=need_weights, merging=merging, condition=condition)

    def attention_masks(self, stack: TransformerStack, *, length: int, key_keep: Tensor | None,
                        position_ids: Tensor | None, mask: Mask | None, cache: KVCache | StaticSlots | None,
                        need_weights: bool, device) -> dict[str, PreparedMask]:
        """The self-attention masks the layers of ``stack`` read, by kind, each built only if some layer reads it
        (``TransformerStack.mask_kinds`` says which depth reads which): "full" (the causal, padding and given masks,
        with ALiBi's bias), "window" (the same within the sliding window: blockwise for long inputs, over the slots
        of a rolling cache when decoding) and "linear" (linear attention's causal/padding form, or the dense mask).
        The one place that decides what each layer's attention sees.

        ``key_keep`` marks the real tokens of this pass. With a cache the ``length`` queries follow the cached
        tokens and attend to every cached key, whose padding and positions the cache records."""
        kinds = set(stack.mask_kinds)
        if isinstance(cache, StaticSlots):
            return self._static_masks(kinds, cache, position_ids, self.positions_of(stack))
        offset, num_keys = (cache.start, cache.end) if cache is not None else (0, length)
        if cache is not None:
            key_keep = cache.key_keep()
        combined = self._combined_mask(stack.causal, key_keep, mask)
        bias, bias_at = self._position_bias(self.positions_of(stack), length, position_ids, cache, device)
        attention = self.config.attention
        masks: dict[str, PreparedMask] = {}
        if "full" in kinds:
            masks["full"] = prepare_attention_mask(combined, length, num_keys, query_offset=offset, bias=bias,
                                                   device=device)
        if "window" in kinds:
            window = attention.sliding_window
            local = SlidingWindowMask(window, attention.global_tokens)
            local = local if combined is None else combined & local
            if cache is not None and cache.slot_tokens is not None:
                # Rolling buffers: the keys are the slots (in slot order), then, in a pass of several tokens, the
                # pass's own keys.
                masks["window"] = prepare_mask_at(local, torch.arange(offset, num_keys, device=device),
                                                  cache.window_key_index(), num_keys, query_offset=offset,
                                                  bias=bias_at)
            # Blockwise windows have no columns for keys before the sequence (prefix tuning): those take the dense mask.
            elif (cache is None and not need_weights and blockwise_pays_off(length, window)
                  and not any(block.attention.key_value_prefix is not None for block in stack.blocks)):
                masks["window"] = prepare_blocked_mask(local, length, window, global_tokens=attention.global_tokens,
                                                       bias=bias_at, device=device)
            else:
                masks["window"] = prepare_attention_mask(local, length, num_keys, query_offset=offset, bias=bias,
                                                         device=device)
        if "linear" in kinds:
            linear_form = self._linear_form(combined) if cache is None and bias is None else None
            if linear_form is not None:
                masks["linear"] = linear_form
            else:
                masks["linear"] = prepare_attention_mask(combined, length, num_keys, query_offset=offset, bias=bias,
                                                         device=device)
        return masks

    def _combined_mask(self, causal: bool, key_keep: Tensor | None, mask: Mask | None) -> Mask | None:
        """A causal stack's causal mask (faded in while training with attention.soft_causal_steps; left out when
        ``mask`` fixes the order itself), the key padding, and the caller's ``mask``, combined."""
        parts: list[Mask] = []
        if causal and not (mask is not None and mask.defines_order):
            steps = self.config.attention.soft_causal_steps
            strength = self.soft_causal_strength if steps is not None else 1.0
            parts.append(CausalMask() if strength >= 1.0 else SoftCausalMask(strength))
        if key_keep is not None:
            parts.append(KeyPaddingMask(key_keep))
        if mask is not None:
            parts.append(mask)
        combined = None
        for part in parts:
            combined = part if combined is None else combined & part
        return combined

    @staticmethod
    def _position_bias(scheme, length: int, position_ids: Tensor | None, cache: KVCache | None, device):
        """Positions that add to the scores (ALiBi, relative buckets) by ``scheme``: the bias of this pass's queries
        over every key, and the same as a function of query and key positions (for blockwise and rolling-cache
        masks). (None, None) otherwise."""
        if not scheme.uses_bias:
            return None, None
        positions = position_ids if position_ids is not None else torch.arange(length, device=device).unsqueeze(0)
        keys = cache.key_positions() if cache is not None else positions

        def bias_at(query_index: Tensor, key_index: Tensor) -> Tensor:
            # Position ids read at the given positions (clamped; positions outside the sequence are masked).
            last = keys.shape[1] - 1
            return scheme.attention_bias(keys[:, query_index.clamp(0, last)], keys[:, key_index.clamp(0, last)])

        return scheme.attention_bias(positions, keys), bias_at

    @staticmethod
    def _linear_form(combined: Mask | None) -> PreparedMask | None:
        """A mask of causal and key-padding parts, and with causality one DocumentMask whose documents are
        contiguous runs, as linear attention's linear-time form reads it: a causal flag, one keep-mask of the keys
        (every padding part's, the caller's own included) and the documents' runs. None for any other mask."""
        parts = () if combined is None else mask_parts(combined)
        causal = any(isinstance(part, CausalMask) for part in parts)
        documents = [part for part in parts if isinstance(part, DocumentMask)]
        if any(not isinstance(part, (CausalMask, KeyPaddingMask, DocumentMask)) for part in parts):
            return None
        runs = None
        if documents:
            # Reading the ids is a data-dependent branch exported graphs cannot hold; they take the dense form.
            ids = documents[0].document_ids
            if (not causal or len(documents) > 1 or ids.device.type == "meta" or torch.compiler.is_exporting()
                    or torch.jit.is_tracing()):
                return None
            runs = document_runs(ids)
            if runs is None:
                return None
        keeps = [part.keep for part in parts if isinstance(part, KeyPaddingMask)]
        key_keep = None
        for keep in keeps:
            key_keep = keep if key_keep is None else key_keep & keep
        return PreparedMask(is_causal=causal, key_keep=key_keep, document_runs=runs)

    def _static_masks(self, kinds: set[str], slots: StaticSlots, position_ids: Tensor,
                      scheme) -> dict[str, PreparedMask]:
        """``attention_masks`` for the compiled decode step: one query per row over the slots filled so far, every
        shape fixed but the filled length. The query comes after every key, so only padding (and the window) mask."""
        key_keep = slots.key_keep()
        batch, filled = key_keep.shape
        allowed = key_keep.view(batch, 1, 1, filled)
        bias = scheme.attention_bias(position_ids, slots.key_positions()) if scheme.uses_bias else None
        masks = {"full": PreparedMask(value=with_bias(allowed, bias))}
        if "window" in kinds:
            # The window over slots (SlidingWindowMask counts slots, padding included), this token's slot the query.
            attention = self.config.attention
            local = SlidingWindowMask(attention.sliding_window, attention.global_tokens)
            near = local.materialize_at(slots.slot.view(1, 1), torch.arange(filled, device=key_keep.device).view(1, -1),
                                        num_keys=filled).squeeze(2)
            masks["window"] = PreparedMask(value=with_bias(allowed & near, bias))
        if "linear" in kinds:  # the quadratic form over the cache, without score biases
            masks["linear"] = PreparedMask(value=allowed)
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

    def encode(self, inputs: Tensor, *, attention_mask: Tensor | None = None, mask: Mask | Tensor | None = None,
               position_ids: Tensor | None = None, token_type_ids: Tensor | None = None) -> Tensor:
        """encoder_decoder: the encoder's final hidden states [batch, source tokens, width]."""
        if self.config.arch != "encoder_decoder":
            raise InputError(f"encode: only an encoder_decoder model has a separate encoder (arch is "
                             f"{self.config.arch!r}); call the model instead")
        prepared = self.prepare(inputs, side="encoder", attention_mask=attention_mask, mask=mask,
                                position_ids=position_ids, token_type_ids=token_type_ids)
        return self.encoder(prepared).hidden

    def forward(self, inputs: Tensor, *, attention_mask: Tensor | None = None, mask: Mask | Tensor | None = None,
                position_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                return_outputs: bool = False, cache: KVCache | None = None,
                logits_to_keep: int | None = None,
                merge_tokens: int | Sequence[int] | None = None, timesteps: Tensor | None = None,
                labels: Tensor | None = None, condition: Tensor | None = None) -> Tensor | ModelOutput:
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
        timesteps, labels, condition: what a conditioned model (condition.kind) is conditioned on, summed into one
            vector (see ``condition_vector``): timesteps [batch] (condition.timesteps), class ids [batch]
            (condition.classes; the id ``classes`` is the null class) and/or a vector [batch, condition dim].
        """
        config = self.config
        condition = self.condition_vector(inputs, timesteps=timesteps, labels=labels, condition=condition)
        merging = token_merging(self, merge_tokens, attention_mask, mask)
        check_call(self, cache, logits_to_keep)
        side, memory, memory_keep, routing = None, None, None, []
        if config.arch == "encoder_decoder":
            check_target(self, inputs, decoder_input_ids)
            if cache is not None and cache.memory is not None:  # encoded by the cache's first pass
                memory, memory_keep = cache.memory, cache.memory_keep
            else:
                source = self.prepare(inputs, side="encoder", attention_mask=attention_mask,
                                      token_type_ids=token_type_ids)
                encoded = self.encoder(source)
                memory, memory_keep, routing = encoded.hidden, source.token_keep, encoded.routing
                if cache is not None:
                    cache.memory, cache.memory_keep = memory, memory_keep
            side, inputs, attention_mask, token_type_ids = "decoder", decoder_input_ids, decoder_attention_mask, None
        elif decoder_input_ids is not None or decoder_attention_mask is not None:
            raise InputError(f"decoder_input_ids: only an encoder_decoder model takes them (arch is "
                             f"{config.arch!r})")
        # Prompt tuning: the virtual tokens go first in a pass without a cache, or in a cache's first pass (later
        # passes find them cached).
        prompt = (self.input_prompt() if self.input_prompt is not None and (cache is None or cache.length == 0)
                  else None)
        prepared = self.prepare(inputs, side=side, attention_mask=attention_mask, mask=mask, position_ids=position_ids,
                                token_type_ids=token_type_ids, cache=cache, memory=memory, memory_keep=memory_keep,
                                need_weights=output_attentions, merging=merging, prompt=prompt,
                                condition=condition)
        try:
            out = self.get_stack(side)(prepared, output_hidden_states=output_hidden_states,
                                       output_attentions=output_attentions)
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        if cache is not None:
            cache.commit()
        hidden, keep = out.hidden, prepared.token_keep
        if prompt is not None:  # callers see the real tokens' outputs only
            virtual = prompt.shape[0]
            hidden, keep = hidden[:, virtual:], None if keep is None else keep[:, virtual:]
        sizes = None if merging is None else merging.sizes
        wants_outputs = return_outputs or output_hidden_states or output_attentions
        # The head does not keep the final norm's output for backward: recomputed from the norm's input.
        with recomputed_norm_output(self.get_stack(side).final_norm if out.pre_norm is not None else None,
                                    out.pre_norm, out.hidden):
            logits, head_logits = self._head(hidden, keep, logits_to_keep, wants_outputs, merging, sizes)
        if not wants_outputs:
            return logits
        pooled = self.head.pool(hidden, keep, token_sizes=sizes) if hasattr(self.head, "pool") and (
            self.head.pooling is not None or self.head.pooler is not None) else None
        aux_loss = expert_counts = None
        if config.feedforward.mixture:
            routing = routing + out.routing
            # A cached encoder_decoder pass reruns only the decoder, which may have no mixture layers.
            total = (torch.stack([r.aux_loss for r in routing]).sum() if routing
                     else hidden.new_zeros((), dtype=torch.float))
            aux_loss = config.feedforward.aux_loss_weight * total
            expert_counts = tuple(r.expert_counts for r in routing)
        return ModelOutput(logits=logits, last_hidden_state=hidden, head_logits=head_logits,
                           hidden_states=tuple(out.hidden_states) if output_hidden_states else None,
                           attentions=tuple(out.attentions) if output_attentions else None,
                           pooled=pooled, aux_loss=aux_loss, expert_counts=expert_counts,
                           encoder_last_hidden_state=memory, token_sizes=sizes)

    def _head(self, hidden: Tensor, keep: Tensor | None, logits_to_keep: int | None, wants_outputs: bool, merging,
              sizes) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The head's logits of ``forward`` and, with a distillation head asked for outputs, both heads' logits."""
        if logits_to_keep is not None:
            return self.head(hidden[:, -logits_to_keep:], None if keep is None else keep[:, -logits_to_keep:]), None
        if wants_outputs and getattr(self.head, "distill_projection", None) is not None:
            # Both heads' logits for ModelOutput, computed once (one dropout draw): the logits are their mean.
            head_logits = self.head.parts(hidden, keep, token_sizes=sizes)
            return self.head.combine(head_logits), head_logits
        if merging is not None:
            return self.head(hidden, keep, token_sizes=sizes), None
        return self.head(hidden, keep), None

    def condition_vector(self, inputs: Tensor, *, timesteps: Tensor | None = None, labels: Tensor | None = None,
                         condition: Tensor | None = None) -> Tensor | None:
        """The condition vector [batch, dim] of a pass over ``inputs`` (the sum of the embedded ``timesteps``, the
        embedded ``labels`` and ``condition``, those given), checked first; None for a model without conditioning,
        which refuses all three."""
        if self.conditioning is None:
            for name, value in (("timesteps", timesteps), ("labels", labels), ("condition", condition)):
                if value is not None:
                    raise InputError(f"{name}: this model is not conditioned (condition.kind is null)")
            return None
        self.conditioning.check(inputs.shape[0], timesteps, labels, condition)
        return self.conditioning(timesteps, labels, condition)

    # ----- generation -----

    def generate(self, input_ids, max_new_tokens: int, **options) -> Tensor:
        """Prompt followed by up to ``max_new_tokens`` generated tokens; see ``formerkit.generation.generate``
        (temperature, top_k, top_p, stop_tokens, seed, attention_mask for left-padded batches, ...)."""
        return generate(self, input_ids, max_new_tokens, **options)

    def stream(self, input_ids, max_new_tokens: int, **options):
        """Yields each step's new tokens [batch] as they are generated; see ``formerkit.generation.stream``."""
        return stream(self, input_ids, max_new_tokens, **options)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of whole blocks while training (``run.activation_checkpointing`` in a recipe):
        each stack keeps only its blocks' inputs and recomputes the rest during the backward pass, trading about one
        more forward pass for the activation memory of the layers. Gradients are those of the plain model."""
        for _, stack in self.named_children():
            if isinstance(stack, TransformerStack):
                stack.activation_checkpointing = bool(enabled)

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
