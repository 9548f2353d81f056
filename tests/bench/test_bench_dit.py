"""``formerkit bench dit``: the reference DiT (the original code's layout) and formerkit's DiT compute the same
function when given the same weights -- so the bench times the same work -- and the bench's records."""

import pytest
import torch

from formerkit.bench.dit import DiTSpec, _build, dit_benchmark, format_dit, formerkit_config, memory_child
from formerkit.bench.dit_reference import ReferenceDiT
from formerkit.errors import InputError
from formerkit.models.transformer import build_model

from ..conftest import randomize_weights

SPEC = DiTSpec(image=8, channels=2, patch=2, width=32, depth=2, heads=4, classes=5, batch=3)


def _copy_reference_into_formerkit(reference: ReferenceDiT, model) -> None:
    """Every reference weight into the formerkit module that plays its part (names differ, layouts do not)."""
    pairs = {"x_embedder": "stem.projection", "t_embedder.mlp": "conditioning.timesteps.mlp",
             "y_embedder.table": "conditioning.labels", "final_layer.linear": "head.projection",
             "final_layer.adaLN_modulation.1": "encoder.final_modulation.linear"}
    for index in range(len(reference.blocks)):
        for ours, theirs in (("attn.qkv", "attention.qkv"), ("attn.proj", "attention.out"),
                             ("mlp.fc1", "feedforward.fc_in"), ("mlp.fc2", "feedforward.fc_out"),
                             ("adaLN_modulation.1", "modulation.linear")):
            pairs[f"blocks.{index}.{ours}"] = f"encoder.blocks.{index}.{theirs}"
    target = dict(model.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            prefix = next(key for key in pairs if name.startswith(key + "."))
            destination = pairs[prefix] + name[len(prefix):]
            target[destination].copy_(parameter)
            copied.add(destination)
    assert copied == set(target)  # every formerkit weight came from the reference


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_formerkits_dit_computes_the_reference_dit_with_the_same_weights(attention):
    reference = ReferenceDiT(image_size=SPEC.image, patch=SPEC.patch, channels=SPEC.channels, width=SPEC.width,
                             depth=SPEC.depth, heads=SPEC.heads, classes=SPEC.classes, attention=attention)
    randomize_weights(reference, seed=1, std="fan_in")  # the zero-initialized maps would hide every difference
    model = build_model(formerkit_config(SPEC))
    _copy_reference_into_formerkit(reference, model)
    # formerkit's sincos2d table puts the row's code first, the original DiT/MAE code (meshgrid of (w, h)) the
    # column's: the same table over the transposed grid, the same cost. Compare with formerkit's table in both.
    reference.pos_embed = model.positions.table[None].clone()
    reference.eval(), model.eval()  # no label dropout
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SPEC.batch, SPEC.channels, SPEC.image, SPEC.image, generator=generator)
    t = torch.rand(SPEC.batch, generator=generator) * 1000
    y = torch.tensor([0, 4, 5])  # 5: the null class
    expected = reference(x, t, y)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(model(x, timesteps=t, labels=y), expected, rtol=1e-4, atol=1e-4)


def test_the_contenders_have_the_same_parameters_and_bad_settings_are_refused():
    counts = {library: sum(p.numel() for p in _build(library, SPEC)[0].parameters())
              for library in ("formerkit", "dit-reference", "dit-reference-sdpa")}
    assert len(set(counts.values())) == 1, counts
    with pytest.raises(InputError, match="not divisible by patch"):
        DiTSpec(image=9, patch=2).check()
    with pytest.raises(InputError, match="depth must be an integer >= 1"):
        DiTSpec(depth=0).check()
    with pytest.raises(InputError, match="unknown libraries"):
        dit_benchmark(SPEC, libraries=["diffusers"])


@pytest.mark.slow
def test_the_dit_bench_measures_each_contender_on_the_same_work():
    from dataclasses import asdict

    records, notes = dit_benchmark(SPEC, rounds=1, memory=False)  # memory: one fresh process per contender, below
    assert notes == []
    by = {(item["library"], item["metric"]): item for item in records}
    for library in ("formerkit", "dit-reference", "dit-reference-sdpa"):
        item = by[(library, "train_img_per_s")]
        assert item["value"] > 0 and item["shape"] == SPEC.shape
        assert item["params"] == by[("formerkit", "train_img_per_s")]["params"]
    assert "train images/s" in format_dit(records)
    # The memory child, run here rather than in a fresh process: building and training grows the peak.
    assert memory_child("formerkit", asdict(SPEC), steps=1) >= 0
