"""Confidence-based early exit against its definition: each sample's logits are the head applied (after the final
norm) to the state of the first layer whose softmax confidence reaches the threshold, computed here from the full
model's hidden states; batches with samples leaving at different layers give each sample what it gets alone."""

from __future__ import annotations

import math

import pytest
import torch

from formerkit import InputError, ModelConfig, build_model
from formerkit.models.early_exit import EarlyExit, early_exit, exit_logits
from formerkit.nn.context import LayerContext
from formerkit.nn.masks import PreparedMask

WIDTH, HEADS, LAYERS = 16, 2, 4


def vit(seed: int = 0, **overrides) -> torch.nn.Module:
    config = ModelConfig(
        arch="encoder", width=WIDTH, num_layers=LAYERS, max_seq_len=None, attention={"num_heads": HEADS},
        position={"kind": "learned"},
        stem={"kind": "patches", "image_size": 8, "patch_size": 2, "in_channels": 1, "class_token": True},
        head={"kind": "classification", "num_classes": 5, "pooling": "mean"},
    ).replace(**overrides)
    torch.manual_seed(seed)
    return build_model(config).eval()


def images(batch: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def confidences(model, x, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per layer and sample, the largest softmax probability of that layer's exit, and the exits' logits, from the
    full model's hidden states."""
    with torch.no_grad():
        states = model(x, output_hidden_states=True, **kwargs).hidden_states[1:]
        keep = kwargs.get("attention_mask")
        keep = None if keep is None else keep.bool()
        if keep is not None and model.stem.num_prefix_tokens:
            keep = torch.cat([keep.new_ones(len(keep), model.stem.num_prefix_tokens), keep], dim=1)
        logits = [exit_logits(model, state, keep) for state in states]
    return torch.stack([exit.softmax(-1).amax(-1) for exit in logits]), logits


def spread_threshold(confidence: torch.Tensor) -> float:
    """A threshold between two well-separated confidences near the middle, so samples leave at different layers and
    no confidence lies near the threshold (rounding between batch sizes cannot flip a decision)."""
    values = confidence.flatten().sort().values
    gaps = values[1:] - values[:-1]
    middle = len(values) // 2
    window = slice(middle // 2, middle + middle // 2)
    index = window.start + int(gaps[window].argmax())
    return float((values[index] + values[index + 1]) / 2)


def sharpen(model, scale: float = 6.0):
    """Larger head weights: more varied confidences across layers and samples."""
    with torch.no_grad():
        model.head.projection.weight.mul_(scale)
    return model


@pytest.mark.parametrize("threshold", [1.0, 3, None])
def test_a_threshold_of_one_or_more_is_the_full_model_on_every_layer(threshold):
    model = sharpen(vit())
    x = images()
    with torch.no_grad():
        full = model(x)
    result = early_exit(model, x, threshold)
    assert isinstance(result, EarlyExit)
    assert torch.equal(result.logits, full)
    assert result.layers_used.tolist() == [LAYERS] * len(x) and result.mean_layers == LAYERS


def test_a_threshold_of_zero_exits_every_sample_after_layer_one():
    model = vit()
    x = images()
    with torch.no_grad():
        # Layer 1 by hand from the embeddings: its block, then the final norm and the pooled head.
        embedded, _ = model.embed(x)
        state, _ = model.encoder.blocks[0](embedded, LayerContext(PreparedMask()))  # an image encoder masks nothing
        expected = model.head(model.encoder.final_norm(state))
    logits, layers_used = early_exit(model, x, 0.0)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert layers_used.tolist() == [1] * len(x)


def test_samples_leaving_at_different_layers_get_what_they_get_alone(randomize):
    model = vit(seed=2)
    randomize(model, 0)  # layers that change the state a lot, so the exits' confidences vary
    x = images(16, seed=4)
    confidence, exits = confidences(model, x)
    threshold = spread_threshold(confidence)
    reached = confidence >= threshold
    reached[-1] = True
    expected_layers = reached.float().argmax(dim=0) + 1  # the first layer that reaches it
    assert len(set(expected_layers.tolist())) >= 3, "the test needs samples leaving at several layers"
    logits, layers_used = early_exit(model, x, threshold)
    assert layers_used.tolist() == expected_layers.tolist()
    for i in range(len(x)):
        assert torch.allclose(logits[i], exits[int(layers_used[i]) - 1][i], atol=1e-5)
        alone, used_alone = early_exit(model, x[i:i + 1], threshold)
        assert int(used_alone) == int(layers_used[i])
        assert torch.allclose(alone[0], logits[i], atol=1e-5)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_padded_text_classifiers_exit_per_sample_as_they_do_unpadded(arch, randomize):
    """An encoder (right padding, mean pooling) and a decoder (left padding, RoPE, last-token pooling): the masks,
    positions and rotary tables follow the samples still running."""
    decoder = arch == "decoder"
    config = ModelConfig(arch=arch, width=WIDTH, num_layers=LAYERS, max_seq_len=16, attention={"num_heads": HEADS},
                         position={"kind": "rope" if decoder else "learned"},
                         stem={"kind": "tokens", "vocab_size": 13},
                         head={"kind": "classification", "num_classes": 4, "pooling": "last" if decoder else "mean"})
    torch.manual_seed(3)
    model = build_model(config).eval()
    randomize(model, 1)
    ids = torch.randint(0, 13, (8, 10), generator=torch.Generator().manual_seed(5))
    lengths = [10, 4, 7, 10, 2, 9, 6, 10]
    real = [list(range(10 - n, 10)) if decoder else list(range(n)) for n in lengths]
    padding = torch.zeros(8, 10, dtype=torch.long)
    for i, positions in enumerate(real):
        padding[i, positions] = 1
    confidence, _ = confidences(model, ids, attention_mask=padding)
    threshold = spread_threshold(confidence)
    logits, layers_used = early_exit(model, ids, threshold, attention_mask=padding)
    assert len(set(layers_used.tolist())) >= 2, layers_used
    for i, positions in enumerate(real):
        alone, used_alone = early_exit(model, ids[i:i + 1, positions], threshold)
        assert int(used_alone) == int(layers_used[i])
        assert torch.allclose(alone[0], logits[i], atol=1e-5)


def test_bad_thresholds_and_models_are_refused():
    model = vit()
    x = images(2)
    for bad in ["0.5", -0.1, math.nan, True]:
        with pytest.raises(InputError, match="threshold: expected a probability >= 0"):
            early_exit(model, x, bad)
    lm = build_model(ModelConfig(arch="decoder", width=WIDTH, num_layers=2, max_seq_len=16,
                                 attention={"num_heads": HEADS}, stem={"kind": "tokens", "vocab_size": 11},
                                 head={"kind": "lm"}))
    with pytest.raises(InputError, match="needs a classifier.*arch='decoder', head='lm'"):
        early_exit(lm, torch.randint(0, 11, (1, 5)), 0.9)
    with pytest.raises(InputError, match="image models take no padding mask"):
        early_exit(model, x, 0.9, attention_mask=torch.ones(2, 16))
