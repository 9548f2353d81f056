"""What the trainer optimizes with: AdamW's parameter groups (no decay on norms, biases, embeddings and learned
tokens; layer-wise learning-rate decay), the warm-up + cosine schedule, and the autocast precision."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from formerkit.models.transformer import Transformer, TransformerStack

__all__ = ["build_optimizer", "layer_ids", "lr_factor", "resolve_precision"]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def layer_ids(model: nn.Module) -> tuple[dict[int, int], int]:
    """Each parameter's layer for layer-wise learning-rate decay, by ``id``, and the top layer.

    In every formerkit Transformer inside ``model`` the embedding (stem, positions, class token, registers,
    embedding norm) is layer 0 and the blocks follow, 1 to L: the encoder's, then (an encoder-decoder) the
    decoder's, whose output is closer to the head. Shared blocks (``num_unique_layers``) count once, in their place
    in the stack: L counts distinct blocks, as the weights the decay protects are per block, not per application.
    The final norms, the head and every parameter outside a Transformer (an MAE decoder) are the top layer, L + 1.
    A parameter reached at several layers (a head tied to the token embedding) takes the highest one.
    """
    cores = [module for module in model.modules() if isinstance(module, Transformer)]
    stacks = [[child for child in core.children() if isinstance(child, TransformerStack)] for core in cores]
    top = 1 + max((sum(len(stack.blocks) for stack in core_stacks) for core_stacks in stacks), default=0)
    layers: dict[int, int] = {}

    def assign(module: nn.Module, layer: int) -> None:
        for parameter in module.parameters():
            layers[id(parameter)] = max(layers.get(id(parameter), -1), layer)

    for core, core_stacks in zip(cores, stacks):
        for name in ("stem", "positions", "embedding_norm", "decoder_positions", "decoder_embedding_norm"):
            if getattr(core, name, None) is not None:
                assign(getattr(core, name), 0)
        offset = 0
        for stack in core_stacks:
            for index, block in enumerate(stack.blocks):
                assign(block, offset + index + 1)
            offset += len(stack.blocks)
        if getattr(core, "head", None) is not None:
            assign(core.head, top)  # (a head tied to the token embedding lifts it to the top)
    for parameter in model.parameters():
        layers.setdefault(id(parameter), top)
    return layers, top


def build_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW with weight decay only on weight matrices: norms, biases, embeddings, position tables and learned tokens
    are not decayed (decaying them pulls them toward zero with no regularizing benefit).

    With ``config.layer_decay`` each (decay, layer) pair is its own parameter group whose ``lr`` is ``config.lr *
    lr_scale``, ``lr_scale = layer_decay ** (top - layer)`` (see ``layer_ids``); the schedule (a LambdaLR) multiplies
    each group's own initial lr, so the scale holds at every step and is saved and restored with the optimizer.
    """
    no_decay_types = (nn.Embedding, nn.LayerNorm)
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, no_decay_types) or type(module).__name__ in ("RMSNorm", "LearnedPositions",
                                                                           "RelativePositions"):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    layers, top = layer_ids(model) if config.layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {(top, True): [], (top, False): []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decayed = not (parameter.dim() < 2 or id(parameter) in no_decay
                       or name.endswith(("class_token", "registers", "mask_token")))
        groups.setdefault((layers.get(id(parameter), top), decayed), []).append(parameter)
    decay = config.layer_decay if config.layer_decay is not None else 1.0
    # Without layer decay: exactly two groups (decayed first), as checkpoints written before layer_decay have.
    order = sorted(groups, key=lambda key: (key[0], not key[1]))
    param_groups = [{"params": groups[layer, decayed], "weight_decay": config.weight_decay if decayed else 0.0,
                     "lr": config.lr * decay ** (top - layer), "lr_scale": decay ** (top - layer)}
                    for layer, decayed in order if groups[layer, decayed] or config.layer_decay is None]
    every = [p for group in param_groups for p in group["params"]]
    fused = {"fused": True} if all(p.device.type in ("cpu", "cuda") for p in every) else {}
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps, **fused)


def _has_native_bf16() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = float32, no autocast)."""
    if precision == "fp32":
        return None
    if precision == "bf16" or _has_native_bf16():
        return torch.bfloat16
    return None
