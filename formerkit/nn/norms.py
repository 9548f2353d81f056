"""Normalization layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["RMSNorm", "build_norm", "model_norm"]


class _RMSNormFunction(torch.autograd.Function):
    """y = x * r * s per row, r = rsqrt(mean(x^2) + eps), s the scale (weight, offset + weight, or none), with a
    backward pass written out: autograd's backward of the composite (``pow``, ``mean``, ``rsqrt``, two ``mul``)
    makes about a dozen passes over x, with broadcasting copies, and took 5x the forward on CPU. The forward is the
    same arithmetic as ``torch.nn.functional.rms_norm`` (equal to the bit); the backward of a row is

        grad_x = r * (g*s) - x * r^3 * sum(g*s*x) / d,    grad_weight = sum over rows of g * x * r,

    four passes over x for grad_x (g*s, the row sums, two in-place updates) and two more for grad_weight when the
    scale trains. Floating-point inputs of at least float32 precision (the norm computes in float32 anyway)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float, offset: float) -> Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        out = x * rstd
        if weight is not None:
            out.mul_(offset + weight if offset else weight)
        ctx.save_for_backward(x, rstd, weight)
        ctx.offset = offset
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            scaled = grad if weight is None else grad * (ctx.offset + weight if ctx.offset else weight)
            row = torch.linalg.vecdot(scaled, x, dim=-1).unsqueeze(-1)  # sum(g*s*x) of each row
            row.mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = scaled * rstd if scaled is grad else scaled.mul_(rstd)
            grad_x.addcmul_(x, row, value=-1)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad * x).mul_(rstd).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_weight, None, None


def _written_out(norm: RMSNorm, x: Tensor) -> bool:
    """Whether ``norm(x)`` takes ``_RMSNormFunction``: a gradient to compute, float32/float64 throughout, eager (a
    compiler fuses the composite itself)."""
    weight = norm.weight
    return (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
            and x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in float32 for stability.

    With a ``weight_offset`` the scale is (weight_offset + weight), as Gemma stores it (offsets from 1, so weight decay
    pulls the scale toward 1), and the weight starts at 1 - weight_offset: every norm starts as a unit scale. Gemma
    also multiplies by the scale before rounding back to the input's dtype (LLaMA rounds first); the offset form
    does as Gemma does, the plain form as LLaMA does (the same numbers in float32)."""

    def __init__(self, width: int, eps: float = 1e-6, weight_offset: float = 0.0, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.width = width
        # Without ``affine`` no learned scale (adaLN-Zero's norms, whose scale comes from the condition).
        self.weight = nn.Parameter(torch.full((width,), 1.0 - weight_offset)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        if _written_out(self, x):
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.weight_offset)
        # At least float32 inside (half precision loses the mean of squares), never less than the input's precision.
        inner = x.to(torch.promote_types(x.dtype, torch.float32))
        if hasattr(torch.nn.functional, "rms_norm"):
            normed = torch.nn.functional.rms_norm(inner, (x.shape[-1],), eps=self.eps)
        else:
            normed = inner * torch.rsqrt(inner.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return normed.to(x.dtype)
        if self.weight_offset:
            return (normed * (self.weight_offset + self.weight.to(inner.dtype))).to(x.dtype)
        return normed.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{self.width}, eps={self.eps}{offset}"


def build_norm(kind: str, width: int, eps: float, bias: bool = True, weight_offset: float = 0.0,
               affine: bool = True) -> nn.Module:
    """A LayerNorm or an RMSNorm (``weight_offset``: see ``RMSNorm``; the config allows it for RMSNorm only);
    without ``affine``, one with no learned scale or bias."""
    if kind == "rmsnorm":
        return RMSNorm(width, eps, weight_offset, affine=affine)
    return nn.LayerNorm(width, eps=eps, bias=bias, elementwise_affine=affine)


def model_norm(norm, width: int, affine: bool = True) -> nn.Module:
    """The norm a model's ``NormConfig`` section ``norm`` describes, over ``width`` channels."""
    return build_norm(norm.kind, width, norm.eps, norm.bias, norm.weight_offset, affine=affine)
