"""Head options added for checkpoint families: the LM head's bias, input scale and logit soft-capping, the pooler's
activation (DistilBERT's ReLU pre-classifier) and a distillation token without its head (DeiTForImageClassification),
each against the formula written out."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit import ModelConfig
from formerkit.errors import ConfigError

from ..conftest import randomize_weights

WIDTH, VOCAB = 32, 50


def _linear(x, layer):
    return x @ layer.weight.t() + layer.bias


def _encoder(head, **stem):
    stem = stem or {"kind": "tokens", "vocab_size": VOCAB}
    return ModelConfig(arch="encoder", width=WIDTH, num_layers=1, max_seq_len=16, attention={"num_heads": 4},
                       stem=stem, head=head)


def _randomized(config, randomize):
    torch.manual_seed(0)
    return randomize(formerkit.build_model(config), seed=1).eval()


@pytest.mark.parametrize("activation, function", [("relu", torch.relu), ("tanh", torch.tanh)])
@torch.no_grad()
def test_the_pooler_applies_its_activation_to_the_dense_layer_on_the_first_token(activation, function, randomize):
    model = _randomized(_encoder({"kind": "classification", "num_classes": 3, "pooling": "cls", "pooler": True,
                                  "pooler_activation": activation}), randomize)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out = model(ids, attention_mask=keep, return_outputs=True)
    pooled = function(_linear(out.last_hidden_state[:, 0], model.head.pooler))
    torch.testing.assert_close(out.pooled, pooled)
    torch.testing.assert_close(out.logits, _linear(pooled, model.head.projection))
    if activation == "relu":
        assert (out.pooled == 0).any(), "a ReLU pooler zeroes negative units (tanh would not)"


@torch.no_grad()
def test_a_base_model_reports_its_relu_pooler_output(randomize):
    model = _randomized(_encoder({"kind": "none", "pooling": "cls", "pooler": True, "pooler_activation": "relu"}),
                        randomize)
    out = model(torch.arange(6).view(1, 6), return_outputs=True)
    torch.testing.assert_close(out.pooled, torch.relu(_linear(out.last_hidden_state[:, 0], model.head.pooler)))


@pytest.mark.parametrize("head, field", [
    ({"kind": "classification", "num_classes": 2, "pooler_activation": "relu"}, "head.pooler_activation"),
    ({"kind": "classification", "num_classes": 2, "pooler": True, "pooler_activation": "gelu"},
     "head.pooler_activation"),
])
def test_a_pooler_activation_without_a_pooler_or_unknown_is_refused_by_field(head, field):
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        _encoder(head)


_PATCHES = {"kind": "patches", "image_size": [8, 12], "patch_size": 4, "in_channels": 1, "class_token": True,
            "distill_token": True}


@torch.no_grad()
def test_without_its_head_the_distillation_token_is_carried_but_only_the_class_token_is_read(randomize):
    model = _randomized(_encoder({"kind": "classification", "num_classes": 5, "distill_head": False}, **_PATCHES),
                        randomize)
    assert model.head.distill_projection is None and model.stem.distill_token is not None
    images = torch.randn(2, 1, 8, 12, generator=torch.Generator().manual_seed(3))
    out = model(images, return_outputs=True)
    assert out.last_hidden_state.shape[1] == 2 + 2 * 3  # class and distillation tokens, then 2 x 3 patches
    assert out.head_logits is None
    torch.testing.assert_close(out.logits, _linear(out.last_hidden_state[:, 0], model.head.projection))
    # The distillation token still changes what the class token sees.
    model.stem.distill_token.add_(torch.randn(WIDTH, generator=torch.Generator().manual_seed(4)))
    assert not torch.allclose(model(images), out.logits)


@torch.no_grad()
def test_a_base_model_may_carry_a_distillation_token(randomize):
    model = _randomized(_encoder({"kind": "none", "pooling": "cls", "pooler": True}, **_PATCHES), randomize)
    out = model(torch.randn(1, 1, 8, 12), return_outputs=True)
    assert out.last_hidden_state.shape[1] == 8
    torch.testing.assert_close(out.pooled, torch.tanh(_linear(out.last_hidden_state[:, 0], model.head.pooler)))


@pytest.mark.parametrize("head, stem, field", [
    ({"kind": "classification", "num_classes": 2, "distill_head": False}, {"kind": "tokens", "vocab_size": VOCAB},
     "head.distill_head"),
    ({"kind": "none", "distill_head": False}, _PATCHES, "head.distill_head"),
    ({"kind": "regression", "output_dim": 1}, _PATCHES, "stem.distill_token"),
])
def test_distillation_options_where_they_mean_nothing_are_refused_by_field(head, stem, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        _encoder(head, **stem)


def test_lm_head_bias_input_scale_and_logit_softcap_follow_their_formulas():
    config = formerkit.ModelConfig(width=16, num_layers=1, attention={"num_heads": 2}, stem={"vocab_size": 11},
                                   head={"bias": True, "scale_input": True, "logit_softcap": 2.0})
    head = randomize_weights(formerkit.build_model(config), seed=0, std=1.0).head.double()
    hidden = torch.randn(2, 3, 16, dtype=torch.float64) * 4
    logits = (hidden / 4.0) @ head.projection.weight.T + head.projection.bias  # 1/sqrt(16) = 1/4
    expected = 2.0 * torch.tanh(logits / 2.0)
    torch.testing.assert_close(head(hidden), expected)
    assert head(hidden).abs().max() < 2.0 < logits.abs().max()  # the cap binds on these inputs
