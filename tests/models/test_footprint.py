"""Parameter memory before allocation: meta-device counts equal real builds, and a model the machine cannot hold is
refused by ``Transformer(config)`` with the size, the fields that size it and what would fit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import formerkit
from formerkit import ConfigError
from formerkit.models import footprint, transformer
from formerkit.models.footprint import meta_build, part_bytes

from ..conftest import image_config, token_config

SMALL_PRESETS = [name for name in formerkit.list_models() if formerkit.count_parameters(formerkit.model_config(name))
                 < 12_000_000]


def _configs():
    configs = [formerkit.model_config(name) for name in SMALL_PRESETS]
    configs += [token_config(vocab_size=50, position=kind) for kind in ("learned", "sinusoidal", "rope", "alibi")]
    configs += [token_config(vocab_size=50, attention={"kind": kind}) for kind in ("linear", "l2")]
    configs.append(token_config("encoder_decoder", vocab_size=50, position="rope", num_decoder_layers=1))
    configs.append(token_config(vocab_size=50, attention={"num_kv_heads": 2, "qk_norm": True},
                                feedforward={"num_experts": 4, "activation": "swiglu"}))
    configs.append(formerkit.model_config("vit_tiny_patch16_224", **{"position.kind": "sincos2d"}))
    configs.append(image_config(attention={"gaussian_mixture": 2}))
    return configs


@pytest.mark.parametrize("config", _configs(), ids=lambda config: f"{config.arch}-{config.stem.kind}")
def test_meta_build_counts_equal_the_real_builds(config):
    real = formerkit.build_model(config)
    with meta_build():
        shapes = formerkit.build_model(config)
    assert formerkit.count_parameters(config) == shapes.num_parameters() == real.num_parameters()
    assert part_bytes(shapes.named_parameters()) == part_bytes(real.named_parameters())
    assert all(p.is_meta for p in shapes.parameters()) and not any(p.is_meta for p in real.parameters())
    # Buffers (position tables, masks) have the real ones' shapes and dtypes.
    assert [(n, b.shape, b.dtype) for n, b in shapes.named_buffers()] == \
        [(n, b.shape, b.dtype) for n, b in real.named_buffers()]


@pytest.mark.slow
def test_counting_every_preset_stays_out_of_torch_dynamo():
    # Several of PyTorch's meta kernels (the random initializations, arange, the arithmetic of the rotary and
    # sinusoidal tables) are Python that imports torch._dynamo, a second or more: a meta build avoids them all.
    code = ("import sys, formerkit\n"
            "for name in formerkit.list_models(): formerkit.count_parameters(formerkit.model_config(name))\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


HUGE = {"attention.head_dim": 1_000_000_000}
GIB = 2**30


def _limit(monkeypatch, available: int) -> None:
    monkeypatch.setattr(transformer, "available_memory", lambda device: available)


def test_a_model_larger_than_the_available_memory_is_refused_before_any_allocation(monkeypatch):
    _limit(monkeypatch, 4 * GIB)
    with pytest.raises(ConfigError) as caught:
        formerkit.create_model("vit_tiny_patch16_224", **HUGE)  # 103,399 GiB of float32: allocating it would crash
    message = str(caught.value)
    assert caught.value.field.startswith("attention.head_dim")
    assert "fit in the 4.00 GiB of memory available on cpu" in message
    assert "the parameters need 103,399.17 GiB in torch.float32" in message
    assert "largest parts: encoder attention 103,399.16 GiB, encoder feed-forward 13.5 MiB" in message
    # What would fit, by the same count: the suggested head_dim's model fits, one more does not by much.
    cap = int(message.split("attention.head_dim at most ")[1].split(" ")[0].replace(",", ""))
    for head_dim, fits in ((cap, True), (2 * cap, False)):
        config = formerkit.model_config("vit_tiny_patch16_224", **{"attention.head_dim": head_dim})
        with meta_build():
            total = sum(part_bytes(formerkit.build_model(config).named_parameters()).values())
        assert (total <= 4 * GIB) is fits, (head_dim, total)


def test_the_refusal_names_the_embedding_fields_when_the_vocabulary_is_too_large(monkeypatch):
    _limit(monkeypatch, GIB)
    config = token_config(vocab_size=10_000_000, width=64)  # 2 x 2.4 GiB: embedding and untied head
    with pytest.raises(ConfigError, match=r"largest parts: (embedding|head) 2\.38 GiB") as caught:
        formerkit.build_model(config)
    assert "stem.vocab_size" in caught.value.field or "head" in caught.value.field


def test_models_that_fit_and_meta_builds_are_not_refused(monkeypatch):
    _limit(monkeypatch, 64 * 2**20)
    formerkit.build_model(token_config(vocab_size=50))  # far below: not even counted exactly
    with torch.device("meta"):  # nothing is allocated on the meta device, so nothing is checked
        model = formerkit.create_model("vit_tiny_patch16_224", **HUGE)
    assert model.num_parameters() > 10**11


def test_the_exact_count_runs_only_near_the_limit(monkeypatch):
    counted = []
    real_part_bytes = footprint.part_bytes
    monkeypatch.setattr(transformer, "part_bytes", lambda named: counted.append(1) or real_part_bytes(named))
    config = token_config(vocab_size=50)
    _limit(monkeypatch, 2**40)
    formerkit.build_model(config)
    assert counted == []
    _limit(monkeypatch, 4 * footprint.rough_parameter_bytes(config) - 1)
    formerkit.build_model(config)
    assert counted == [1]
