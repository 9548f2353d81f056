"""Fused projections computed part by part: ``linear(x).split(sizes, -1)`` (the fused [q | k | v] of attention, the
[gate | up] of a gated MLP) without ever forming the fused output or its gradient.

With one product for the fused layer, the backward pass must first concatenate the parts' gradients into one tensor
of the fused width (a full extra pass over them), and the parts stay views of one storage, so a part the backward
needs (attention keeps the values) keeps the whole fused output alive. Here each part is its own product with its
rows of the weight, and the backward computes grad_x = sum_i grad_i W_i directly (accumulating products, no
concatenation) and, when the weight trains, writes each part's weight gradient into its rows. Same arithmetic, same
results up to the order of the additions.

Forward hooks of the Linear (LoRA's, ``formerkit.adapt.lora``) cannot see a fused output that is never made; a hook
takes part here if the object it is bound to (``hook.__self__``) provides ``splits_at(linear, starts, sizes)``
(whether each of its terms falls inside one part) and ``add_to_parts(linear, x, parts, starts)`` (the parts with its
terms added; x and the parts flat, [tokens, features]). Any other hook, a wrapped or quantized layer, autocast,
evaluation or inference, or a compiler sends the call down the fused path, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["autocasting", "hook_owners", "project_parts"]


class _PartProjection(torch.autograd.Function):
    """The parts [x W_i^T + b_i] of one Linear, each a product of its own; see the module's docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, sizes: tuple[int, ...]):
        # x is [tokens, features] and the parts [tokens, size_i]: outputs that are not views, so a hook may add to
        # them in place.
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = tuple(F.linear(x, weight[start:start + size], None if bias is None else bias[start:start + size])
                      for start, size in zip(starts, sizes))
        # x is needed only for the weight's gradient: a frozen base (LoRA) does not keep it.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.starts, ctx.sizes, ctx.has_bias = starts, sizes, bias is not None
        return parts

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, weight = ctx.saved_tensors
        flats = [grad.contiguous() for grad in grads]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # sum_i grad_i W_i, accumulated in place: no concatenated gradient
            grad_x = flats[0] @ weight[:ctx.sizes[0]]
            for start, size, flat in zip(ctx.starts[1:], ctx.sizes[1:], flats[1:]):
                grad_x.addmm_(flat, weight[start:start + size])
        if ctx.needs_input_grad[1]:  # each part's gradient written into its rows
            inputs = x
            grad_weight = weight.new_empty(weight.shape)
            for start, size, flat in zip(ctx.starts, ctx.sizes, flats):
                torch.mm(flat.t(), inputs, out=grad_weight[start:start + size])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = weight.new_empty(weight.shape[0])
            for start, size, flat in zip(ctx.starts, ctx.sizes, flats):
                torch.sum(flat, dim=0, out=grad_bias[start:start + size])
        return grad_x, grad_weight, grad_bias, None


def hook_owners(linear: nn.Module, method: str) -> list | None:
    """The objects bound to ``linear``'s forward hooks if every one of them provides ``method`` (an empty list without
    hooks), else None. Pre-hooks always give None: they may change the input."""
    if linear._forward_pre_hooks:
        return None
    owners = [getattr(hook, "__self__", None) for hook in linear._forward_hooks.values()]
    return owners if all(hasattr(owner, method) for owner in owners) else None


def autocasting(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (CPU or CUDA)."""
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def _takes_parts(linear: nn.Module, x: Tensor) -> bool:
    """Training (train mode, gradients on) through a plain float Linear whose weight is frozen (a LoRA base), eager.
    A trained weight keeps the fused product: its backward has two products of the fused width to do anyway, and on
    CPU they ran faster as two wide products than as one narrower product per part (a DiT training step, 2% to 28%
    faster fused depending on the load). Evaluation keeps the fused product too: the two orders of summation may
    differ in the last bit, and a model evaluated with or without gradients, with or without an (inactive) adapter,
    gives the same outputs."""
    # The type first: an int8 Linear has no .weight.
    return (type(linear) is nn.Linear and linear.training and torch.is_grad_enabled()
            and not linear.weight.requires_grad
            and linear.weight.dtype == x.dtype and not autocasting(x)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def project_parts(linear: nn.Module, x: Tensor, sizes: list[int]) -> list[Tensor]:
    """``list(linear(x).split(sizes, dim=-1))``, part by part when training (see the module's docstring)."""
    owners = hook_owners(linear, "add_to_parts") if _takes_parts(linear, x) else None
    if owners is not None:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        if all(owner.splits_at(linear, starts, sizes) for owner in owners):
            # Flat [tokens, features] tensors throughout: the hooks add in place to the Function's outputs
            # themselves (in place on a view of them, autograd would copy the whole gradient to rebase it).
            flat = x.reshape(-1, x.shape[-1])
            parts = list(_PartProjection.apply(flat, linear.weight, linear.bias, tuple(sizes)))
            for owner in owners:
                parts = owner.add_to_parts(linear, flat, parts, starts)
            return [part.view(*x.shape[:-1], size) for part, size in zip(parts, sizes)]
    return list(linear(x).split(sizes, dim=-1))
