"""Normalization layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RMSNorm", "build_norm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in float32 for stability."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        # At least float32 inside (half precision loses the mean of squares), never less than the input's precision.
        inner = x.to(torch.promote_types(x.dtype, torch.float32))
        if hasattr(torch.nn.functional, "rms_norm"):
            return torch.nn.functional.rms_norm(inner, (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight
        normed = inner * torch.rsqrt(inner.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(kind: str, width: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(width, eps)
    return nn.LayerNorm(width, eps=eps, bias=bias)
