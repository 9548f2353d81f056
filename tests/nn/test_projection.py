"""Fused projections computed part by part (formerkit.nn.projection) against the fused product split afterwards,
and the cat-free rotation (formerkit.nn.positions) against rotate_half written out: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from formerkit.nn.positions import _Rotation, rotate_half
from formerkit.nn.projection import _PartProjection, project_parts
from formerkit.summary import saved_activation_bytes

SIZES = [8, 4, 4]


def _linear(bias: bool, frozen: bool) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(6, sum(SIZES), bias=bias).double()
    if bias:
        nn.init.normal_(linear.bias)
    return linear.requires_grad_(not frozen)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_parts_give_the_split_products_outputs_and_gradients(bias, frozen):
    linear = _linear(bias, frozen).train()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    upstream = [torch.randn(2, 5, size, dtype=torch.float64) for size in SIZES]
    wrt = [x, *(p for p in linear.parameters() if p.requires_grad)]
    parts = project_parts(linear, x, SIZES)
    reference = (x @ linear.weight.T + (linear.bias if bias else 0)).split(SIZES, dim=-1)
    # A frozen weight goes part by part; a trained one keeps the fused product, whose parts the Function also gives.
    assert ("PartProjection" in type(parts[0].grad_fn.next_functions[0][0]).__name__) == frozen
    if not frozen:
        parts = _PartProjection.apply(x.reshape(-1, 6), linear.weight, linear.bias, tuple(SIZES))
        parts = [part.view(2, 5, size) for part, size in zip(parts, SIZES)]
    for got, expected in zip(parts, reference):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(parts, wrt, upstream)
    expected = torch.autograd.grad(reference, wrt, upstream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


class _Parts(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return project_parts(self.linear, x, SIZES)


def test_parts_keep_nothing_when_the_weight_is_frozen():
    parts = _Parts(_linear(True, False).float()).train()
    x = torch.randn(3, 6, requires_grad=True)
    assert saved_activation_bytes(parts, x) == x.numel() * 4  # the fused product keeps its input
    parts.requires_grad_(False)
    assert saved_activation_bytes(parts, x) == 0


def test_evaluation_and_inference_keep_the_fused_product():
    linear = _linear(True, False).eval()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    for got, expected in zip(project_parts(linear, x, SIZES), linear(x).split(SIZES, dim=-1)):
        assert torch.equal(got, expected) and type(got.grad_fn).__name__ == "SplitWithSizesBackward0"
    linear.train()
    with torch.no_grad():
        assert all(part.grad_fn is None for part in project_parts(linear, x, SIZES))


def test_an_unknown_forward_hook_sends_the_call_down_the_fused_path():
    linear = _linear(False, False).train()
    calls = []
    linear.register_forward_hook(lambda module, args, output: calls.append(output.shape) or output + 1)
    x = torch.randn(4, 6, dtype=torch.float64)
    parts = project_parts(linear, x, SIZES)
    assert calls == [torch.Size([4, 16])]
    torch.testing.assert_close(torch.cat(parts, -1), x @ linear.weight.T + 1)


@pytest.mark.parametrize("batched_tables", [False, True])
def test_rotation_without_concatenation_gives_rotate_halfs_outputs_and_gradients(batched_tables):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=generator).transpose(1, 2).requires_grad_()
    shape = (2, 1, 5, 8) if batched_tables else (1, 1, 5, 8)
    # Tables whose halves differ (not the standard duplicated frequencies), so a swapped half shows.
    cos, sin = (torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(2))
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    got = _Rotation.apply(x, cos, sin)
    expected = x * cos + rotate_half(x) * sin
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0],
                               rtol=1e-12, atol=1e-12)
