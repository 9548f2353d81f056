"""Adaptive depth for classifiers: confidence-based early exit (as in DeeBERT, Xin et al., 2020, and the
entropy/confidence exits of BranchyNet, Teerapittayanon et al., 2016), with the model's own head at every layer.

After each layer, the model's final norm and classification head (pooling included) read the intermediate state; a
sample leaves at the first layer whose largest softmax probability reaches ``threshold`` and keeps the logits it had
there; the last layer always lets everyone out. Samples that have left are dropped from the batch, so later layers
compute only for the samples still running. Intermediate exits are trained by ``objective.exit_loss_weight`` (deep
supervision through the shared head); without it they are whatever the final head makes of earlier states.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from formerkit.errors import InputError

__all__ = ["EarlyExit", "early_exit", "exit_logits"]


class EarlyExit(NamedTuple):
    """What ``early_exit`` returns; unpacks as ``logits, layers_used = early_exit(...)``."""

    logits: Tensor  # [batch, classes]: each sample's logits at the layer it left
    layers_used: Tensor  # [batch] (int64): how many layers each sample ran, 1 ... num_layers

    @property
    def mean_layers(self) -> float:
        return float(self.layers_used.float().mean())


def exit_logits(model: nn.Module, hidden: Tensor, token_keep: Tensor | None = None) -> Tensor:
    """The logits a classifier gives to an intermediate state ``hidden`` [batch, tokens, width] (a layer's output,
    before the final norm): the final norm, then the head with its pooling. At the last layer this is the model's
    own output."""
    norm = model.get_stack().final_norm
    return model.head(hidden if norm is None else norm(hidden), token_keep)


def check_exit_model(config) -> None:
    """Raises InputError unless ``config`` is a classifier with one stack (encoder or decoder)."""
    if config.head.kind != "classification" or config.arch == "encoder_decoder":
        raise InputError(f"early_exit: needs a classifier (an encoder or decoder with a classification head); this "
                         f"model is arch={config.arch!r}, head={config.head.kind!r}")


def check_threshold(threshold) -> float:
    """``threshold`` as a float; None and anything >= 1 mean no early exit."""
    if threshold is None:
        return math.inf
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise InputError(f"threshold: expected a probability >= 0 (>= 1 or None: never exit early), got "
                         f"{threshold!r}")
    # A softmax probability reaches 1.0 only by rounding: a threshold of 1 means "run every layer".
    return math.inf if threshold >= 1 else float(threshold)


@torch.no_grad()
def early_exit(model: nn.Module, inputs: Tensor, threshold: float | None, *, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> EarlyExit:
    """Classifies ``inputs`` (as ``model(inputs)`` takes them) with confidence-based early exit: each sample stops
    at the first layer whose exit (final norm + head on that layer's state) gives a largest softmax probability
    ``>= threshold``, the last layer at the latest. ``threshold`` None or ``>= 1`` runs every layer (the logits are
    then the model's own); 0 stops every sample after layer 1. Run it in eval mode; it computes no gradients.

    Only the samples still running are computed at each layer, so the work falls with the number that have left.
    """
    check_exit_model(model.config)
    limit = check_threshold(threshold)
    prepared = model.prepare(inputs, attention_mask=attention_mask, token_type_ids=token_type_ids)
    stack = model.get_stack()
    hidden, keep, positions, layers = prepared.hidden, prepared.token_keep, prepared.position_ids, prepared.layers
    batch = hidden.shape[0]
    running = torch.arange(batch, device=hidden.device)  # the rows of the batch still in ``hidden``
    layers_used = torch.full((batch,), stack.num_layers, dtype=torch.long, device=hidden.device)
    logits_out: Tensor | None = None
    for index in range(stack.num_layers):
        hidden, _ = stack.block_at(index)(hidden, layers[index])
        last = index == stack.num_layers - 1
        if not last and limit == math.inf:
            continue
        logits = exit_logits(model, hidden, keep)
        if logits_out is None:
            logits_out = logits.new_empty((batch, logits.shape[-1]))
        leaving = (torch.ones(len(running), dtype=torch.bool, device=hidden.device) if last
                   else logits.float().softmax(dim=-1).amax(dim=-1) >= limit)
        if not bool(leaving.any()):
            continue
        logits_out[running[leaving]] = logits[leaving]
        layers_used[running[leaving]] = index + 1
        staying = ~leaving
        if not bool(staying.any()):
            break
        running, hidden = running[staying], hidden[staying]
        keep = None if keep is None else keep[staying]
        positions = None if positions is None else positions[staying]
        # The masks and rotary tables of the rows still running.
        layers = model.layer_contexts(stack, hidden, token_keep=keep, position_ids=positions)
    return EarlyExit(logits_out, layers_used)
