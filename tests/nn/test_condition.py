"""adaLN-Zero conditioning (formerkit.nn.condition): the block and final norm against the formula written out, the
zero start, the timestep features, the patch head's unpatchify, and the inputs refused."""

import math

import pytest
import torch
import torch.nn.functional as F

from formerkit import build_model
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError, InputError
from formerkit.nn.block import Residual
from formerkit.nn.condition import gated_add, modulate, timestep_features
from formerkit.nn.heads import unpatchify


def dit_config(**fields) -> ModelConfig:
    """A tiny DiT: 8x8 one-channel images in 2x2 patches, adaLN-Zero on timesteps and 10 classes."""
    condition = {"kind": "adaln_zero", "timesteps": True, "classes": 10, "timestep_frequencies": 16,
                 **fields.pop("condition", {})}
    return ModelConfig(arch="encoder", width=32, num_layers=2, attention={"num_heads": 4},
                       stem={"kind": "patches", "image_size": 8, "patch_size": 2, "in_channels": 1},
                       position={"kind": "sincos2d"}, head={"kind": "patches"}, condition=condition, **fields)


def test_timestep_features_are_the_sinusoids_written_out():
    timesteps = torch.tensor([0.0, 3.0, 999.5])
    dim, period = 6, 10000.0
    features = timestep_features(timesteps, dim, period)
    for row, t in enumerate(timesteps.tolist()):
        frequencies = [period ** (-i / 3) for i in range(3)]
        expected = [math.cos(t * w) for w in frequencies] + [math.sin(t * w) for w in frequencies]
        assert features[row].tolist() == pytest.approx(expected, abs=1e-4)
    odd = timestep_features(timesteps, 7, period)
    assert torch.equal(odd[:, :6], features) and torch.equal(odd[:, 6], torch.zeros(3))


def test_a_fresh_conditioned_block_is_the_identity():
    model = build_model(dit_config()).eval()
    images = torch.randn(3, 1, 8, 8)
    prepared = model.prepare(images, condition=model.condition_vector(images, timesteps=torch.tensor([1.0, 50, 900]),
                                                                      labels=torch.tensor([0, 3, 10])))
    hidden = prepared.hidden
    for block, context in zip(model.encoder.blocks, prepared.layers):
        out, _ = block(hidden, context)
        assert torch.equal(out, hidden)
    # The final linear starts at zero too: a fresh DiT predicts zero noise.
    assert torch.equal(model(images, timesteps=torch.zeros(3), labels=torch.zeros(3, dtype=torch.long)),
                       torch.zeros(3, 1, 8, 8))


def test_adaln_zero_block_and_final_norm_follow_the_formula(randomize):
    model = randomize(build_model(dit_config()), 0).eval()
    images = torch.randn(2, 1, 8, 8)
    timesteps, labels = torch.tensor([7.0, 420.0]), torch.tensor([2, 10])
    condition = model.condition_vector(images, timesteps=timesteps, labels=labels)
    embed = model.conditioning
    expected_condition = embed.timesteps.mlp(timestep_features(timesteps, 16)) + embed.labels.weight[labels]
    assert torch.allclose(condition, expected_condition, atol=1e-6)
    prepared = model.prepare(images, condition=condition)
    x = prepared.hidden
    for block, context in zip(model.encoder.blocks, prepared.layers):
        chunks = (F.silu(condition) @ block.modulation.linear.weight.T + block.modulation.linear.bias).chunk(6, -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (c[:, None, :] for c in chunks)
        normed = F.layer_norm(x, (32,), eps=1e-5)  # no learned scale or bias of its own
        attention, _ = block.attention(normed * (1 + scale1) + shift1, context)
        x1 = x + gate1 * attention
        x2 = x1 + gate2 * block.feedforward(F.layer_norm(x1, (32,), eps=1e-5) * (1 + scale2) + shift2)
        out, _ = block(x, context)
        assert torch.allclose(out, x2, atol=1e-5)
        x = x2
    final = model.encoder.final_modulation.linear
    shift, scale = (F.silu(condition) @ final.weight.T + final.bias).chunk(2, -1)
    hidden = F.layer_norm(x, (32,), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]
    assert torch.allclose(model.encoder(prepared).hidden, hidden, atol=1e-5)
    patches = hidden @ model.head.projection.weight.T + model.head.projection.bias
    assert torch.allclose(model(images, timesteps=timesteps, labels=labels), unpatchify(patches, (4, 4), 2, 1),
                          atol=1e-5)


def _value_and_gradients(fn, inputs, upstream):
    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("fused, formula", [
    (modulate, lambda x, shift, scale: x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)),
    (gated_add, lambda x, gate, out: x + gate.unsqueeze(1) * out),
])
def test_fused_modulation_and_gated_residual_match_the_formula_and_its_gradients(fused, formula):
    generator = torch.Generator().manual_seed(0)
    big, small = (3, 5, 8), (3, 8)
    shapes = [big, small, small] if fused is modulate else [big, small, big]
    for dtype in (torch.float64, torch.float32):
        inputs = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
        upstream = torch.randn(big, generator=generator, dtype=dtype)
        out, grads = _value_and_gradients(fused, inputs, upstream)
        reference_out, reference = _value_and_gradients(formula, inputs, upstream)
        # addcmul rounds once where the formula rounds twice (a fused multiply-add): equal to the last bit or two.
        torch.testing.assert_close(out, reference_out, rtol=1e-15 if dtype == torch.float64 else 2e-7,
                                   atol=1e-15 if dtype == torch.float64 else 1e-6)
        for got, expected in zip(grads, reference):
            assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    # Second derivatives too (the backward is built from differentiable products).
    inputs = [torch.randn((2, 3, 4) if len(shape) == 3 else (2, 4), generator=generator, dtype=torch.float64,
                          requires_grad=True) for shape in shapes]
    assert torch.autograd.gradgradcheck(fused, inputs)


def test_gated_merge_falls_back_to_the_plain_merge_when_the_branch_has_more():
    x, gate, out = torch.randn(2, 4, 32), torch.randn(2, 32), torch.randn(2, 4, 32)
    plain = Residual(dit_config())
    torch.testing.assert_close(plain.merge_gated(x, gate, out), x + gate.unsqueeze(1) * out)
    scaled = Residual(dit_config(layer_scale=0.5))
    assert torch.allclose(scaled.merge_gated(x, gate, out), x + 0.5 * gate.unsqueeze(1) * out)
    drop = type("Drop", (torch.nn.Module,), {"rate": 0.5, "forward": lambda self, t: 2 * t})()
    assert torch.equal(plain.train().merge_gated(x, gate, out, drop), x + 2 * (gate.unsqueeze(1) * out))


def test_a_given_condition_vector_adds_to_the_embedded_parts(randomize):
    model = randomize(build_model(dit_config(condition={"classes": None})), 1).eval()
    images, timesteps, vector = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 9.0]), torch.randn(2, 32)
    embedded = model.conditioning.timesteps(timesteps)
    assert torch.allclose(model(images, timesteps=timesteps, condition=vector),
                          model(images, condition=embedded + vector), atol=1e-5)


def test_unpatchify_puts_each_patch_back_in_place():
    images = torch.randn(2, 3, 4, 6)
    p = 2
    # Patchify written out: token r * cols + c holds patch (r, c), pixels in (row, column, channel) order.
    tokens = torch.stack([torch.stack([images[n, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).flatten()
                                       for r in range(2) for c in range(3)]) for n in range(2)])
    assert torch.equal(unpatchify(tokens, (2, 3), p, 3), images)


def test_null_class_and_eval_mode_keep_every_label():
    model = build_model(dit_config(condition={"label_dropout": 0.5})).eval()
    labels = torch.tensor([0, 9, 10])
    assert torch.equal(model.conditioning(labels=labels), model.conditioning.labels.weight[labels])
    assert model.conditioning.null_class == 10


@pytest.mark.parametrize("call, field", [
    (dict(), "condition"),
    (dict(labels=torch.tensor([0, 11])), "labels"),
    (dict(labels=torch.tensor([0.0, 1.0])), "labels"),
    (dict(timesteps=torch.zeros(3)), "timesteps"),
    (dict(condition=torch.zeros(2, 7)), "condition"),
])
def test_bad_conditions_are_refused_by_name(call, field):
    model = build_model(dit_config())
    with pytest.raises(InputError, match=f"^{field}:"):
        model(torch.zeros(2, 1, 8, 8), **call)


def test_an_unconditioned_model_refuses_a_condition():
    model = build_model(dit_config().replace(condition={"kind": None, "timesteps": False, "classes": None,
                                                        "timestep_frequencies": 256}))
    with pytest.raises(InputError, match="^timesteps: this model is not conditioned"):
        model(torch.zeros(1, 1, 8, 8), timesteps=torch.zeros(1))


@pytest.mark.parametrize("change, field", [
    ({"condition": {"kind": None}}, "condition.timesteps"),
    ({"norm": {"placement": "post"}}, "norm.placement"),
    ({"parallel_residual": "separate_norms"}, "parallel_residual"),
    ({"condition": {"label_dropout": 0.1, "classes": None}}, "condition.label_dropout"),
    ({"stem": {"kind": "conv", "patch_size": None}}, "head.kind"),
])
def test_config_refuses_conditioning_it_cannot_build(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dit_config().replace(**change)


def test_the_class_table_starts_at_unit_scale():
    # (DiT's N(0, 0.02) left the class signal unused for most of a short run; see ConditionEmbedding.)
    table = build_model(dit_config(condition={"dim": 256})).conditioning.labels.weight
    assert 0.9 < float(table.detach().std()) < 1.1
