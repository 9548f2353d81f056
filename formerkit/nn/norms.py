"""Normalization layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "build_norm", "model_norm"]


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
