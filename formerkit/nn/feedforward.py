"""Position-wise feed-forward parts: a plain MLP and the gated variants of Shazeer (2020), "GLU Variants Improve
Transformer"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedMLP", "MLP", "activation", "build_feedforward"]


def _squared_relu(x: Tensor) -> Tensor:
    # So et al., 2021, "Primer".
    return F.relu(x).square()


def activation(name: str):
    """The element-wise function behind an activation name (the gated names use their gate's function)."""
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "squared_relu": _squared_relu,
        "silu": F.silu,
        "swiglu": F.silu,
        "geglu": F.gelu,
        "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # Gemma's GeGLU
    }[name]


# Each activation's derivative as a function of its input and the incoming gradient, for the recomputing backward.
_DERIVATIVES = {
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "relu": lambda g, h: g * (h > 0),
    "squared_relu": lambda g, h: g * 2 * F.relu(h),
    "silu": lambda g, h: torch.ops.aten.silu_backward(g, h),
    "swiglu": lambda g, h: torch.ops.aten.silu_backward(g, h),
    "geglu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "geglu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
}


class _RecomputedActivationOut(torch.autograd.Function):
    """``fc_out(act(h))`` -- or ``fc_out(act(gate) * up)`` for a gated MLP, h = [gate | up] -- that keeps only ``h``
    for the backward pass and recomputes the activation there.

    Autograd would keep both ``h`` (for the activation's derivative) and the activation's output (for fc_out's weight
    gradient): with an MLP four times the model's width that is 8 x width floats per token per layer, the largest
    thing a block keeps. Recomputing the element-wise activation costs one extra pass over ``h`` in the backward.
    Works under autocast: the products run in the dtype the forward's ran in, gradients return in each input's."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, name: str, gated: bool) -> Tensor:
        out = F.linear(_activate(h, name, gated), weight, bias)
        ctx.save_for_backward(h, weight)
        ctx.name, ctx.gated, ctx.has_bias = name, gated, bias is not None
        ctx.dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        act = activation(ctx.name)
        grad = grad.to(ctx.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.gated:
            gate, up = h.chunk(2, dim=-1)
            activated = act(gate)
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # fc_out's weight gradient needs the activation's output: recomputed here
            hidden = activated * up if ctx.gated else act(h)
            grad_weight = (flat.t() @ hidden.reshape(-1, hidden.shape[-1]).to(ctx.dtype)).to(weight.dtype)
            del hidden
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ weight.to(ctx.dtype)).to(h.dtype)
            derivative = _DERIVATIVES[ctx.name]
            if ctx.gated:
                grad_h = torch.cat([derivative(grad_hidden * up, gate), grad_hidden * activated], dim=-1)
            else:
                grad_h = derivative(grad_hidden, h)
        return grad_h, grad_weight, grad_bias, None, None


def _activate(h: Tensor, name: str, gated: bool) -> Tensor:
    if not gated:
        return activation(name)(h)
    gate, up = h.chunk(2, dim=-1)
    return activation(name)(gate) * up


def _recomputes(module: nn.Module, h: Tensor) -> bool:
    """Whether this call takes the recomputing path: training with gradients, no dropout between the activation
    and fc_out, a plain Linear fc_out (not a quantized or wrapped one, nor one with forward hooks: LoRA's, see
    formerkit.adapt.lora, which this path would skip), eager (a compiler makes its own choice)."""
    # The type first: an int8 fc_out has no .weight.
    return (module.recompute and torch.is_grad_enabled() and type(module.fc_out) is nn.Linear
            and (h.requires_grad or module.fc_out.weight.requires_grad)
            and not (module.dropout is not None and module.training)
            and not module.fc_out._forward_hooks and not module.fc_out._forward_pre_hooks
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class MLP(nn.Module):
    """fc_out(dropout(act(fc_in(x)))). With ``recompute`` (the default) training keeps fc_in's output only and
    recomputes the activation in the backward pass (see ``_RecomputedActivationOut``): the same gradients, a
    quarter less activation memory for a GPT-2 block, for one more element-wise pass."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0,
                 recompute: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.recompute = recompute

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        if _recomputes(self, h):
            return _RecomputedActivationOut.apply(h, self.fc_out.weight, self.fc_out.bias, self.activation_name, False)
        hidden = self.act(h)
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


class GatedMLP(nn.Module):
    """fc_out(act(gate) * up), with gate and up computed by one fused projection (first half gate, second half up);
    ``recompute`` as for ``MLP`` (it saves two hidden-sized tensors per token here)."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0,
                 recompute: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.fc_in = nn.Linear(width, 2 * hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.recompute = recompute

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        if _recomputes(self, h):
            return _RecomputedActivationOut.apply(h, self.fc_out.weight, self.fc_out.bias, self.activation_name, True)
        gate, up = h.chunk(2, dim=-1)
        hidden = self.act(gate) * up
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


def build_feedforward(config, index: int = 0) -> nn.Module:
    """The feed-forward part of layer ``index`` (its hidden size may be its own in a pruned model)."""
    ff = config.feedforward
    cls = GatedMLP if ff.gated else MLP
    return cls(config.width, config.layer_feedforward_size(index), ff.activation, ff.bias, ff.dropout)
