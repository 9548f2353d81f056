"""Fixtures shared by the test folders."""

from __future__ import annotations

import pytest
import torch


def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.add_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)


@pytest.fixture(scope="session")
def randomize():
    """randomize(model, seed) redraws every parameter of a model before two implementations are compared: vectors
    (norm weights, biases) get +-0.1 noise around their init, matrices and tables N(0, 0.15^2). Default inits (unit
    norms, zero biases, small weights) would let a missing bias, a norm without its affine part or a nearly uniform
    attention pattern hide a difference."""
    return _randomize
