"""A plain MLP's training pass, fc_out(act(fc_in(x))), with its backward pass taken a block of rows at a time.

The MLP's backward pass has to form the gradient of its hidden activation (4 x the model's width per token) before
fc_in's backward can use it: with the autograd nodes of the two projections apart, that gradient exists whole, on top
of everything the forward pass kept, at the very top of a training step's memory (the last layer's backward runs when
every activation of the model is still alive). Here one autograd node holds both projections, and each block of rows
goes through the whole chain -- activation recomputed, fc_out's weight gradient, the hidden gradient, the activation's
derivative, fc_in's weight gradient, the input's gradient -- before the next: a block's hidden-sized tensors are all
that is ever alive beside what the forward kept (fc_in's input and output, as before). The weight gradients add up
over the blocks (the same sums in another order); the forward pass's products are those of the unfused MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MLPByRows", "row_blocks"]


def row_blocks(rows: int, width: int, elements: int) -> list[tuple[int, int]]:
    """[start, stop) ranges splitting ``rows`` rows of ``width`` values into blocks of about ``elements`` values at
    most, of (nearly) equal size."""
    count = max(-(-rows * width // elements), 1)
    size = -(-rows // count)
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _accumulate(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """total + a @ b (a @ b when there is no total yet), in place."""
    return a @ b if total is None else total.addmm_(a, b)


class MLPByRows(torch.autograd.Function):
    """fc_out(act(fc_in(x))) for flat x [tokens, width]; keeps x and fc_in's output h, as the recomputing MLP does.

    ``act`` is the activation, ``derivative(grad, h)`` its derivative applied to ``grad`` (it may write over
    ``grad``), ``elements`` the size of a block of the hidden activation."""

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None,
                act: Callable[[Tensor], Tensor], derivative: Callable[[Tensor, Tensor], Tensor],
                elements: int) -> Tensor:
        h = F.linear(x, w_in, b_in)
        blocks = row_blocks(h.shape[0], h.shape[1], elements)
        if len(blocks) == 1:
            out = F.linear(act(h), w_out, b_out)
        else:
            out = h.new_empty(h.shape[0], w_out.shape[0])
            for start, stop in blocks:
                hidden = act(h[start:stop])
                if b_out is None:
                    torch.mm(hidden, w_out.t(), out=out[start:stop])
                else:
                    torch.addmm(b_out, hidden, w_out.t(), out=out[start:stop])
        ctx.save_for_backward(x, h, w_in, w_out)
        ctx.act, ctx.derivative, ctx.elements = act, derivative, elements
        ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, h, w_in, w_out = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w_in = grad_b_in = grad_w_out = None
        for start, stop in row_blocks(h.shape[0], h.shape[1], ctx.elements):
            g, h_rows = grad[start:stop], h[start:stop]
            if need_w_out:
                grad_w_out = _accumulate(grad_w_out, g.t(), ctx.act(h_rows))
            if need_x or need_w_in or need_b_in:
                grad_h = ctx.derivative(g @ w_out, h_rows)
                if need_w_in:
                    grad_w_in = _accumulate(grad_w_in, grad_h.t(), x[start:stop])
                if need_b_in:
                    grad_b_in = grad_h.sum(0) if grad_b_in is None else grad_b_in.add_(grad_h.sum(0))
                if need_x:
                    torch.mm(grad_h, w_in, out=grad_x[start:stop])
        grad_b_out = grad.sum(0) if need_b_out and ctx.has_bias[1] else None
        if not ctx.has_bias[0]:
            grad_b_in = None
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None
