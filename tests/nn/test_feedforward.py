"""The feed-forward parts: the recomputing backward (the activation recomputed instead of kept) against autograd
through the plain forward, and what it keeps for the backward pass."""

from __future__ import annotations

import math

import pytest
import torch

from formerkit.nn.feedforward import MLP, GatedMLP
from formerkit.summary import saved_activation_bytes

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "squared_relu", "silu")
GATED = ("swiglu", "geglu", "geglu_tanh")


def _gradients(module, x, upstream):
    out = module(x)
    return out, torch.autograd.grad(out, [x, *module.parameters()], upstream)


@pytest.mark.parametrize("cls, name", [(cls, name) for cls in (MLP, GatedMLP) for name in ACTIVATIONS]
                         + [(GatedMLP, name) for name in GATED])
def test_recomputed_activation_gives_autograds_gradients(cls, name):
    torch.manual_seed(0)
    module = cls(8, 12, name).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 8, dtype=torch.float64)
    module.recompute = True
    out, recomputed = _gradients(module, x, upstream)
    module.recompute = False
    reference_out, reference = _gradients(module, x, upstream)
    assert torch.equal(out, reference_out)
    for got, expected in zip(recomputed, reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    module.recompute = True
    assert torch.autograd.gradcheck(lambda inputs: module(inputs), (x[:1, :2].detach().requires_grad_(),))


@pytest.mark.parametrize("cls", [MLP, GatedMLP])
def test_recompute_keeps_only_the_first_projections_output_and_the_input(cls):
    module = cls(16, 64, "gelu")
    x = torch.randn(2, 10, 16, requires_grad=True)
    fc_in_out = 2 * 10 * module.fc_in.out_features * 4
    module.recompute = True
    assert saved_activation_bytes(module, x) == fc_in_out + x.numel() * 4
    module.recompute = False
    # Autograd keeps the activation's output too (and for a gated MLP the activated gate).
    hidden = 2 * 10 * 64 * 4
    assert saved_activation_bytes(module, x) == fc_in_out + x.numel() * 4 + hidden * (2 if cls is GatedMLP else 1)


@pytest.mark.parametrize("cls, name", [(MLP, "gelu_tanh"), (GatedMLP, "swiglu")])
def test_recompute_under_bf16_autocast_matches_the_plain_path(cls, name):
    torch.manual_seed(0)
    module = cls(16, 64, name)
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    results = []
    for recompute in (True, False):
        module.recompute = recompute
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        grads = torch.autograd.grad(out, [x, *module.parameters()], upstream.to(out.dtype))
        results.append((out, grads))
    (out, grads), (reference_out, reference) = results
    assert out.dtype == reference_out.dtype == torch.bfloat16
    assert torch.equal(out, reference_out)
    for got, expected, tensor in zip(grads, reference, [x, *module.parameters()]):
        assert got.dtype == expected.dtype == tensor.dtype
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_plain_path_without_gradients_dropout_or_a_replaced_output_projection():
    module = MLP(8, 16, "gelu", dropout=0.5)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():
        assert module(x).grad_fn is None
    # Dropout between the activation and fc_out: autograd's own graph (the dropout mask must be kept).
    assert "Recomputed" not in type(module.train()(x).grad_fn).__name__
    module.eval()
    assert "Recomputed" in type(module(x).grad_fn).__name__


@pytest.mark.parametrize("cls", [MLP, GatedMLP])
def test_recompute_with_a_frozen_output_projection_gives_the_input_gradient(cls):
    torch.manual_seed(1)
    module = cls(8, 12, "silu").double()
    module.fc_out.requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for recompute in (True, False):
        module.recompute = recompute
        grads.append(torch.autograd.grad(module(x).sum(), [x, *module.fc_in.parameters()]))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", GATED)
def test_gated_activations_compute_their_gate_function_times_up(name):
    """fc_out(act(gate) * up) written out; geglu_tanh is Gemma's GeGLU, GELU's tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) on the gate."""

    gates = {"swiglu": lambda x: x * torch.sigmoid(x), "geglu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
             "geglu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))}
    torch.manual_seed(2)
    module = GatedMLP(8, 12, name).double()
    x = 2 * torch.randn(3, 5, 8, dtype=torch.float64)
    gate, up = (x @ module.fc_in.weight.T + module.fc_in.bias).chunk(2, dim=-1)
    expected = (gates[name](gate) * up) @ module.fc_out.weight.T + module.fc_out.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", GATED)
def test_recomputed_gated_activation_gives_autograds_gradients(name):
    torch.manual_seed(0)
    module = GatedMLP(8, 12, name).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 8, dtype=torch.float64)
    out, recomputed = _gradients(module, x, upstream)
    module.recompute = False
    reference_out, reference = _gradients(module, x, upstream)
    assert torch.equal(out, reference_out)
    for got, expected in zip(recomputed, reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("name", GATED + ("relu",))
def test_recomputed_gated_backward_with_a_frozen_base_matches_autograd_and_survives_a_second_pass(name):
    """The LoRA case (fc_in and fc_out frozen, the input's gradient wanted): the gradients the backward writes over
    its own tensors equal autograd's through the plain forward, and the saved gate and up are left untouched (a
    graph kept for a second backward pass gives the same gradients again)."""
    torch.manual_seed(3)
    module = GatedMLP(8, 12, name).double().requires_grad_(False)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 8, dtype=torch.float64)
    out = module(x)
    assert "Recomputed" in type(out.grad_fn.next_functions[0][0]).__name__  # behind the view to [3, 5, 8]
    first = torch.autograd.grad(out, x, upstream, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, upstream)[0]
    module.recompute = False
    reference_out = module(x)
    reference = torch.autograd.grad(reference_out, x, upstream)[0]
    assert torch.equal(out, reference_out)
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(first, second)
