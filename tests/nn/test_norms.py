"""RMSNorm's weight offset (Gemma: the scale is 1 + weight) against the formula written out, and the offset reaching
every norm a config builds."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit.nn.norms import RMSNorm

from ..conftest import randomize_weights


def test_rms_norm_with_an_offset_multiplies_by_offset_plus_weight():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5, weight_offset=1.0).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * (1.0 + norm.weight)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_offset_norms_scale_before_rounding_to_half_precision_as_gemma_does():
    """Gemma multiplies the float32 normalized values by (1 + weight) and rounds once; LLaMA's plain RMSNorm rounds
    the normalized values first."""
    torch.manual_seed(1)
    norm = RMSNorm(64, eps=1e-6, weight_offset=1.0)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(torch.bfloat16)
    x = (3 * torch.randn(4, 64)).to(torch.bfloat16)
    wide = x.float()
    expected = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm.weight.float()))
    assert torch.equal(norm(x), expected.to(torch.bfloat16))


def test_offset_norms_start_at_a_unit_scale():
    norm = RMSNorm(6, weight_offset=1.0)
    assert torch.equal(norm.weight.detach(), torch.zeros(6))
    x = torch.randn(2, 6)
    torch.testing.assert_close(norm(x), RMSNorm(6)(x), rtol=0, atol=0)
    # Any offset: the weight starts at 1 - offset.
    assert torch.equal(RMSNorm(3, weight_offset=0.25).weight.detach(), torch.full((3,), 0.75))


def _model(offset: float) -> formerkit.Transformer:
    return formerkit.build_model(dict(
        arch="decoder", width=16, num_layers=2, max_seq_len=12, position={"kind": "rope"},
        attention={"num_heads": 2, "qk_norm": True}, norm={"kind": "rmsnorm", "placement": "sandwich",
                                                            "weight_offset": offset},
        stem={"kind": "tokens", "vocab_size": 19, "embedding_norm": True}))


def test_every_norm_of_the_model_takes_the_offset_and_starts_at_zero():
    model = _model(1.0)
    norms = {name: module for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    # Per layer: the attention's and the feed-forward's input and output norms (sandwich), the query and key norms;
    # then the embedding norm and the final norm.
    assert len(norms) == 2 * 6 + 2
    assert all(norm.weight_offset == 1.0 and not norm.weight.detach().any() for norm in norms.values())


def test_a_model_with_offset_norms_equals_the_plain_model_with_the_offset_added_to_its_weights():
    offset, plain = randomize_weights(_model(1.0), 3).eval(), _model(0.0).eval()
    norms = {f"{name}.weight" for name, module in offset.named_modules() if isinstance(module, RMSNorm)}
    state = {name: value + 1.0 if name in norms else value for name, value in offset.state_dict().items()}
    plain.load_state_dict(state)
    ids = torch.randint(0, 19, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(offset(ids), plain(ids), rtol=1e-5, atol=1e-5)


def _written_out_norm(x, weight, offset, eps):
    scale = 1.0 if weight is None else offset + weight
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("weight", ["trained", "frozen", "none"])
def test_the_training_norm_has_the_gradients_of_the_formula(offset, weight):
    """The written-out backward (``_RMSNormFunction``) against autograd through the formula, float64: inputs with
    leading dimensions (a query norm's [batch, heads, tokens, head_dim]) and the weight's gradient when it trains."""
    torch.manual_seed(5)
    norm = RMSNorm(8, eps=1e-5, weight_offset=offset, affine=weight != "none").double()
    if norm.weight is not None:
        with torch.no_grad():
            norm.weight.normal_()
        norm.weight.requires_grad_(weight == "trained")
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_()
    reference_weight = None if norm.weight is None else norm.weight.detach().clone().requires_grad_(weight == "trained")
    grad = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    out = norm(x)
    assert out.grad_fn is not None and "RMSNorm" in type(out.grad_fn).__name__
    out.backward(grad)
    expected = _written_out_norm(reference_x, reference_weight, offset, 1e-5)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-12, atol=1e-12)
    if weight == "trained":
        torch.testing.assert_close(norm.weight.grad, reference_weight.grad, rtol=1e-12, atol=1e-12)


def test_the_training_norm_only_computes_the_gradients_asked_for():
    norm = RMSNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    norm(x).sum().backward()  # only the weight trains: the input takes no gradient
    torch.testing.assert_close(norm.weight.grad, _written_out_norm(x, None, 0.0, 1e-6).sum(0), rtol=1e-12, atol=1e-12)


def test_the_training_norm_gives_the_outputs_of_the_evaluation_path_to_the_bit():
    torch.manual_seed(6)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = 3 * torch.randn(4, 5, 64)
    with torch.no_grad():
        evaluated = norm(x)
    trained = norm(x.requires_grad_())
    assert trained.grad_fn is not None and "RMSNorm" in type(trained.grad_fn).__name__
    assert torch.equal(trained, evaluated)
