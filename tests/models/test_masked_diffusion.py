"""Patch-masked diffusion training (MDT / MaskDiT): with every patch kept the masked path is the plain model, the
visible sets follow the ratio, and the side decoder's blocks see every patch again."""

import pytest
import torch

from formerkit.config import (
    AttentionConfig,
    ConditionConfig,
    FeedForwardConfig,
    HeadConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.errors import ConfigError, InputError
from formerkit.models.masked_diffusion import PatchMaskedDiffusion
from formerkit.models.transformer import build_model

from ..conftest import randomize_weights


def _model(layers: int = 3, seed: int = 0):
    config = ModelConfig(
        arch="encoder", width=32, num_layers=layers, max_seq_len=None,
        attention=AttentionConfig(num_heads=4), feedforward=FeedForwardConfig(activation="gelu_tanh", ratio=2.0),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-6), position=PositionConfig(kind="sincos2d"),
        stem=StemConfig(kind="patches", image_size=(8, 8), patch_size=2, in_channels=1),
        head=HeadConfig(kind="patches", pooling="none"),
        condition=ConditionConfig(kind="adaln_zero", timesteps=True, classes=10))
    return randomize_weights(build_model(config), seed, std="fan_in").eval()


def _inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, 8, 8, generator=generator), torch.rand(batch, generator=generator) * 1000,
            torch.randint(0, 10, (batch,), generator=generator))


def test_keeping_every_patch_is_the_plain_model_in_any_order():
    model = _model()
    masked = PatchMaskedDiffusion(model, mask_ratio=0.0, decoder_layers=1)
    x, t, y = _inputs()
    plain = model(x, timesteps=t, labels=y)
    assert masked.num_visible == 16
    in_order = masked(x, timesteps=t, labels=y, ids_keep=torch.arange(16).expand(3, -1))
    torch.testing.assert_close(in_order, plain, rtol=1e-5, atol=1e-5)
    shuffled = masked(x, timesteps=t, labels=y, ids_keep=masked.draw_visible(3, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(shuffled, plain, rtol=1e-5, atol=1e-5)
    # Without ids_keep the wrapper is the model (sampling).
    torch.testing.assert_close(masked(x, timesteps=t, labels=y), plain)


@pytest.mark.parametrize("ratio, visible", [(0.5, 8), (0.75, 4), (0.3, 11)])
def test_the_visible_patches_follow_the_ratio_and_differ_per_image(ratio, visible):
    masked = PatchMaskedDiffusion(_model(), mask_ratio=ratio, decoder_layers=2)
    ids_keep = masked.draw_visible(64, torch.Generator().manual_seed(0))
    assert ids_keep.shape == (64, visible)  # int(16 * (1 - ratio)), MAE's rule
    assert all(len(set(row.tolist())) == visible for row in ids_keep)  # no patch twice
    assert len({tuple(sorted(row.tolist())) for row in ids_keep}) > 1  # a fresh draw per image
    kept = masked.kept_pixels(ids_keep)
    assert kept.shape == (64, 1, 8, 8) and torch.equal(kept.sum(dim=(1, 2, 3)), torch.full((64,), visible * 4.0))
    # The kept pixels are exactly the patches listed: patch i is grid row i // 4, column i % 4.
    row = ids_keep[0, 0].item()
    assert kept[0, 0, 2 * (row // 4):2 * (row // 4) + 2, 2 * (row % 4):2 * (row % 4) + 2].eq(1).all()


def test_the_encoder_blocks_see_only_the_visible_patches_and_the_decoder_all():
    model = _model(layers=3)
    masked = PatchMaskedDiffusion(model, mask_ratio=0.5, decoder_layers=1)
    seen = []
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    x, t, y = _inputs()
    ids_keep = masked.draw_visible(3, torch.Generator().manual_seed(0))
    out = masked(x, timesteps=t, labels=y, ids_keep=ids_keep)
    assert seen == [8, 8, 16] and out.shape == x.shape
    # What a visible patch's output depends on: changing a dropped patch's pixels changes nothing before the side
    # decoder, so with the decoder's mixing removed (zero attention output) the visible patches' outputs stay put.
    changed = x.clone()
    dropped = sorted(set(range(16)) - set(ids_keep[0].tolist()))[0]
    changed[0, 0, 2 * (dropped // 4):2 * (dropped // 4) + 2, 2 * (dropped % 4):2 * (dropped % 4) + 2] += 5.0
    with torch.no_grad():
        model.encoder.blocks[2].attention.out.weight.zero_()
        model.encoder.blocks[2].attention.out.bias.zero_()
    before = masked(x, timesteps=t, labels=y, ids_keep=ids_keep)
    after = masked(changed, timesteps=t, labels=y, ids_keep=ids_keep)
    keep = masked.kept_pixels(ids_keep)[0, 0].bool()
    torch.testing.assert_close(after[0, 0][keep], before[0, 0][keep])
    plain_before, plain_after = model(x, timesteps=t, labels=y), model(changed, timesteps=t, labels=y)
    assert not torch.allclose(plain_after[0, 0][keep], plain_before[0, 0][keep])  # the plain model mixes them in


def test_bad_masking_settings_are_refused_with_the_field_named():
    model = _model(layers=3)
    with pytest.raises(ConfigError, match="objective.decoder_layers"):
        PatchMaskedDiffusion(model, mask_ratio=0.5, decoder_layers=3)
    with pytest.raises(ConfigError, match="objective.patch_mask_ratio"):
        PatchMaskedDiffusion(model, mask_ratio=1.0, decoder_layers=1)
    masked = PatchMaskedDiffusion(model, mask_ratio=0.5, decoder_layers=1)
    x, t, y = _inputs()
    with pytest.raises(InputError, match="ids_keep"):
        masked(x, timesteps=t, labels=y, ids_keep=torch.zeros(2, 4, dtype=torch.long))
