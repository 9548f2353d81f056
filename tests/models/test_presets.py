"""Presets: published parameter counts, registry behaviour."""

from __future__ import annotations

import pytest
import torch

import formerkit
from formerkit import ConfigError

PUBLISHED_PARAMETER_COUNTS = {
    # GPT-2 small with its LM head tied to the token embedding.
    "gpt2": 124_439_808,
    # BERT-base: embeddings, 12 post-norm layers and the pooler, no task head.
    "bert_base": 109_482_240,
    # BERT-base with the masked-LM head (decoder tied to the embedding, its own bias).
    "bert_base_mlm": 109_514_298,
    # ViT-B/16 at 224x224 with a 1000-class head.
    "vit_base_patch16_224": 86_567_656,
    # ViT-Ti/16 (DeiT-tiny) at 224x224 with a 1000-class head.
    "vit_tiny_patch16_224": 5_717_416,
    # CCT-7/3x1 for 32x32 images, 10 classes (Hassani et al., Table 1 of the official code).
    "cct_7_3x1_32": 3_760_139,
    # CCT-2/3x2 for 32x32 images, 10 classes.
    "cct_2_3x2_32": 283_723,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_preset_has_the_published_parameter_count(name):
    expected = PUBLISHED_PARAMETER_COUNTS[name]
    assert formerkit.count_parameters(formerkit.model_config(name)) == expected
    if expected < 10_000_000:  # also build the real model for the small ones
        assert formerkit.create_model(name).num_parameters() == expected


def test_every_preset_builds_on_meta_and_carries_its_config():
    for name in formerkit.list_models():
        config = formerkit.model_config(name)
        with torch.device("meta"):
            model = formerkit.build_model(config)
        assert model.config == config


def test_llama_tiny_is_llama_style():
    config = formerkit.model_config("llama_tiny")
    assert config.norm.kind == "rmsnorm"
    assert config.position.kind == "rope"
    assert config.feedforward.activation == "swiglu"
    assert config.attention.kv_heads < config.attention.num_heads
    assert not config.head.tie_embeddings
    model = formerkit.create_model("llama_tiny", num_layers=1)
    assert model.head.projection.weight is not model.stem.tokens.weight


def test_create_model_applies_overrides():
    model = formerkit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=4, num_classes=10)
    logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert model.config.stem.image_size == (32, 32)


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        formerkit.create_model("gpt-2")


def test_registering_a_custom_preset():
    name = "test_only_tiny_encoder"

    @formerkit.register_model(name, "a two-layer encoder for this test")
    def tiny():
        return formerkit.ModelConfig(arch="encoder", width=16, num_layers=2, max_seq_len=8,
                                     attention={"num_heads": 2}, stem={"vocab_size": 11},
                                     head={"kind": "classification", "num_classes": 3})

    assert name in formerkit.list_models()
    assert formerkit.create_model(name)(torch.randint(0, 11, (1, 8))).shape == (1, 3)
    with pytest.raises(ValueError, match="already registered"):
        formerkit.register_model(name, "again")(tiny)
