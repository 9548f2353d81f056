"""The stack of blocks a Transformer runs (``TransformerStack``: blocks in sequence, shared weights, stochastic depth,
activation checkpointing, the final norm) and what a forward pass returns (``ModelOutput``, ``StackOutput``). The
model around it -- stem, positions, masks, head -- is ``formerkit.models.transformer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from formerkit.config import ModelConfig
from formerkit.nn.block import DropPath, TransformerBlock
from formerkit.nn.condition import AdaptiveModulation, modulate
from formerkit.nn.context import LayerContext, StackInput
from formerkit.nn.feedforward import MLP, GatedMLP
from formerkit.nn.masks import PreparedMask
from formerkit.nn.moe import Routing
from formerkit.nn.norms import model_norm

__all__ = ["ModelOutput", "StackOutput", "TransformerStack"]


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


class StackOutput(NamedTuple):
    """What a stack returns: the final hidden states (after the final norm), and what was asked for."""

    hidden: Tensor
    # With output_hidden_states: the stack's input, then each layer's output (before the final norm); else empty.
    hidden_states: list[Tensor]
    # With output_attentions: each layer's attention probabilities; else empty.
    attentions: list[Tensor]
    # Each mixture-of-experts layer's ``Routing`` of this pass, in depth order (a shared block once per depth).
    routing: list[Routing]
    # The final norm's input when ``hidden`` is exactly final_norm(pre_norm) (else None): the head's backward pass
    # recomputes the norm's output from it instead of keeping it (``formerkit.nn.recompute``).
    pre_norm: Tensor | None = None


class TransformerStack(nn.Module):
    """``num_layers`` blocks in sequence (cycling through ``num_unique_layers`` distinct blocks when weights are
    shared), followed by the final norm when the config has one. A causal stack is a decoder's."""

    def __init__(self, config: ModelConfig, num_layers: int, *, causal: bool = False, cross_attention: bool = False):
        super().__init__()
        unique = config.num_unique_layers or num_layers
        rates = [config.drop_path * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(TransformerBlock(config, cross_attention=cross_attention, index=i)
                                    for i in range(unique))
        # The last depth's MLP holds the top of a training step's memory: only it computes by blocks.
        last = self.blocks[(num_layers - 1) % unique].feedforward
        if isinstance(last, (MLP, GatedMLP)):
            last.by_blocks = True
        # Stochastic depth rises linearly with depth (Huang et al.); a per-layer module, so shared blocks follow it too.
        self.drop_paths = nn.ModuleList(DropPath(rate) for rate in rates)
        self.num_layers = num_layers
        self.causal = causal
        attention = config.attention
        window_layers = attention.sliding_window_layers
        self.windowed = tuple(attention.sliding_window is not None
                              and (window_layers is None or i in window_layers) for i in range(num_layers))
        # The attention each depth computes (softmax, l2, linear).
        self.kinds = tuple(attention.kind if attention.kind_layers is None or i in attention.kind_layers
                           else "softmax" for i in range(num_layers))
        # The mask each depth reads: linear attention's own form, the sliding window, or the full mask.
        self.mask_kinds = tuple("linear" if kind == "linear" else "window" if windowed else "full"
                                for kind, windowed in zip(self.kinds, self.windowed))
        norm = config.norm
        conditioned = config.condition.kind is not None
        self.final_norm = model_norm(norm, config.width, affine=not conditioned) if norm.has_final else None
        # adaLN-Zero: the final norm's shift and scale regressed from the condition (DiT's final layer).
        self.final_modulation = (AdaptiveModulation(config.condition_dim, config.width, 2)
                                 if conditioned and norm.has_final else None)
        # Recompute each block's activations in the backward pass instead of keeping them (see forward); set by
        # ``Transformer.set_activation_checkpointing``.
        self.activation_checkpointing = False

    def block_at(self, index: int) -> TransformerBlock:
        """The block that runs at depth ``index`` (blocks repeat when weights are shared)."""
        return self.blocks[index % len(self.blocks)]

    def contexts(self, masks: dict[str, PreparedMask], *, rotary: tuple[Tensor, Tensor] | None = None,
                 local_rotary: tuple[Tensor, Tensor] | None = None, **shared) -> tuple[LayerContext, ...]:
        """One ``LayerContext`` per depth: the mask of the depth's kind from ``masks`` ("full", "window", "linear"),
        its attention kind, index and (while training) stochastic depth, its rotary tables (``local_rotary`` for
        the sliding-window depths when given: position.rope_local_base, else ``rotary``), and the ``shared``
        fields of the pass."""
        return tuple(LayerContext(mask=masks[self.mask_kinds[index]], kind=self.kinds[index], index=index,
                                  drop_path=self.drop_paths[index] if self.training else None,
                                  rotary=local_rotary if local_rotary is not None and self.windowed[index] else rotary,
                                  **shared)
                     for index in range(self.num_layers))

    def forward(self, prepared: StackInput, *, output_hidden_states: bool = False,
                output_attentions: bool = False) -> StackOutput:
        """Runs every layer over ``prepared.hidden`` with its context (see ``Transformer.prepare``)."""
        hidden, states, attentions, routing = prepared.hidden, [], [], []
        for index, context in enumerate(prepared.layers):
            if output_hidden_states:
                states.append(hidden)
            block = self.block_at(index)
            # Activation checkpointing: a training pass keeps only each block's input and reruns the block in the
            # backward pass (non-reentrant, with the dropout and stochastic-depth draws of the first run). Token
            # merging keeps per-pass state a rerun would advance twice, so it runs plainly.
            if (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                    and context.merging is None):
                hidden, weights = checkpoint(block, hidden, context, use_reentrant=False)
            else:
                hidden, weights = block(hidden, context)
            if block.mixture:
                routing.append(block.feedforward.last_routing)
            if output_attentions:
                attentions.append(weights)
        if output_hidden_states:
            states.append(hidden)
        plain_norm = self.final_norm is not None and self.final_modulation is None
        return StackOutput(self.finish(hidden, prepared.condition), states, attentions, routing,
                           hidden if plain_norm else None)

    def finish(self, hidden: Tensor, condition: Tensor | None = None) -> Tensor:
        """What follows the last block: the final norm, modulated by the condition under adaLN-Zero. (Patch-masked
        diffusion training, ``formerkit.models.masked_diffusion``, runs the blocks itself and then this.)"""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(condition)
            hidden = modulate(hidden, shift, scale)
        return hidden
