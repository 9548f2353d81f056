"""Masked-autoencoder pretraining: patch layout, random masks, what the encoder sees, how the decoder puts patches
back, the loss, and the hand-over to fine-tuning.

Every reference is computed here (by slicing images by hand, by running the plain encoder with the masked patches
blocked, or from the model's own parameters); nothing is compared against stored numbers. Models are tiny, float32,
seeded and in eval mode unless a test says so.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import formerkit
from formerkit import ConfigError, InputError, MaskedAutoencoder, ModelConfig, finetune_model
from formerkit.models.mae import patchify, unpatchify

from ..conftest import image_config, randomize_weights, token_config

WIDTH = 32
TOL = 1e-5


# ----- helpers -----


def encoder_config(image_size=(8, 8), patch_size: int = 2, in_channels: int = 1, *, class_token: bool = True,
                   register_tokens: int = 0, position: str = "learned", **overrides) -> ModelConfig:
    """A tiny image encoder, by default for 8x8 one-channel digits."""
    config = image_config(image_size=list(image_size), patch_size=patch_size, in_channels=in_channels, width=WIDTH,
                          max_seq_len=None, norm={"kind": "layernorm", "placement": "pre", "eps": 1e-6},
                          position={"kind": position},
                          stem={"class_token": class_token, "register_tokens": register_tokens})
    return config.replace(**overrides) if overrides else config


def make_mae(config: ModelConfig | None = None, seed: int = 0, **options) -> MaskedAutoencoder:
    """An MAE around a tiny encoder with O(1)-scale random weights (conftest's randomize_weights, 1/fan_in matrices)
    instead of the tiny default init, so every part of the encoder visibly matters."""
    torch.manual_seed(seed)
    encoder = randomize_weights(formerkit.build_model(config or encoder_config()), seed, std="fan_in")
    options.setdefault("decoder_width", 16)
    return MaskedAutoencoder(encoder, **options).eval()


def images_for(config: ModelConfig, batch: int = 3, seed: int = 1) -> torch.Tensor:
    stem = config.stem
    return torch.randn(batch, stem.in_channels, *stem.image_size, generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def patch_by_hand(images: torch.Tensor, sample: int, index: int, patch_size: int) -> torch.Tensor:
    """Patch ``index`` of one image, cut with slicing: grid row-major, pixels in (row, column, channel) order."""
    cols = images.shape[-1] // patch_size
    row, col = divmod(index, cols)
    block = images[sample, :, row * patch_size:(row + 1) * patch_size, col * patch_size:(col + 1) * patch_size]
    return block.permute(1, 2, 0).reshape(-1)


def visible_ids(ids_restore: torch.Tensor, num_visible: int) -> torch.Tensor:
    """The visible patches in the order the encoder reads them: the start of the shuffle ids_restore undoes."""
    return ids_restore.argsort(dim=1)[:, :num_visible]


def capture_stack_io(stack: nn.Module) -> tuple[dict, object]:
    """Records the input and output hidden states of a TransformerStack call."""
    seen: dict = {}

    def hook(module, args, output):
        seen["input"] = args[0].hidden.detach().clone()
        seen["output"] = output.hidden.detach().clone()

    return seen, stack.register_forward_hook(hook)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return
    difference = (actual - expected).abs().max().item()
    assert difference <= tol, f"max abs difference {difference:.3g} > {tol}"


ENCODERS = {
    "class_token": encoder_config(),
    "no_class_token": encoder_config(class_token=False),
    "registers": encoder_config(register_tokens=2),
    "patch4": encoder_config(patch_size=4),
    "sincos2d_rgb_non_square": encoder_config((4, 10), 2, 3, position="sincos2d"),
    "sinusoidal": encoder_config(position="sinusoidal"),
    "no_positions": encoder_config(position="none", class_token=False),
}


# ----- patch layout -----


@pytest.mark.parametrize("image_size, patch_size, channels",
                         [((8, 8), 2, 1), ((8, 8), 4, 1), ((4, 10), 2, 3), ((224, 224), 16, 3)])
def test_patchify_and_unpatchify_are_exact_inverses(image_size, patch_size, channels):
    images = torch.randn(2, channels, *image_size, generator=seeded())
    patches = patchify(images, patch_size)
    grid = (image_size[0] // patch_size, image_size[1] // patch_size)
    assert patches.shape == (2, grid[0] * grid[1], patch_size ** 2 * channels)
    assert torch.equal(unpatchify(patches, patch_size, grid, channels), images)
    assert torch.equal(patchify(unpatchify(patches, patch_size, grid, channels), patch_size), patches)


@pytest.mark.parametrize("image_size, patch_size, channels", [((8, 8), 2, 1), ((8, 8), 4, 1), ((4, 10), 2, 3)])
def test_patchify_equals_patches_cut_by_hand(image_size, patch_size, channels):
    images = torch.arange(2 * channels * image_size[0] * image_size[1], dtype=torch.float32).reshape(
        2, channels, *image_size)
    patches = patchify(images, patch_size)
    for sample in range(2):
        for index in range(patches.shape[1]):
            assert torch.equal(patches[sample, index], patch_by_hand(images, sample, index, patch_size))


def test_patch_order_matches_the_stem_projection():
    # The stem's Conv2d is a linear map of each patch; read in patchify's (row, column, channel) order, its weight
    # must give the stem's tokens in the same grid order.
    config = encoder_config((4, 10), 2, 3, class_token=False)
    mae = make_mae(config)
    images = images_for(config)
    projection = mae.encoder.stem.projection
    weight = projection.weight.permute(0, 2, 3, 1).reshape(WIDTH, -1)
    with torch.no_grad():
        assert_close(mae.encoder.stem(images), mae.patchify(images) @ weight.T + projection.bias)


def test_module_patchify_uses_the_encoder_geometry():
    config = encoder_config((4, 10), 2, 3)
    mae = make_mae(config)
    images = images_for(config)
    assert torch.equal(mae.patchify(images), patchify(images, 2))
    assert torch.equal(mae.unpatchify(mae.patchify(images)), images)


# ----- random masks -----


def test_the_same_generator_seed_gives_the_same_mask():
    mae = make_mae()
    images = images_for(mae.encoder.config, batch=4)
    with torch.no_grad():
        first, second = mae(images, generator=seeded(7)), mae(images, generator=seeded(7))
        other = mae(images, generator=seeded(8))
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.ids_restore, second.ids_restore)
    assert torch.equal(first.loss, second.loss)
    assert not torch.equal(first.mask, other.mask)


def test_each_sample_gets_its_own_mask():
    mae = make_mae()
    with torch.no_grad():
        mask = mae(images_for(mae.encoder.config, batch=4), generator=seeded()).mask
    assert len({tuple(row.tolist()) for row in mask}) > 1


# MAE keeps int(N * (1 - mask_ratio)) patches, so the masked count rounds up. The expectation is computed in exact
# arithmetic on the decimal ratio: 10 patches at 0.9 keep 1 (float arithmetic would give 0.999... and keep none).
@pytest.mark.parametrize("image_size, patch_size, mask_ratio", [
    ((8, 8), 2, 0.75), ((8, 8), 2, 0.7), ((8, 8), 2, 0.5), ((8, 8), 4, 0.75), ((4, 10), 2, 0.9), ((4, 10), 2, 0.65),
])
def test_masked_count_follows_maes_rounding(image_size, patch_size, mask_ratio):
    config = encoder_config(image_size, patch_size)
    mae = make_mae(config, mask_ratio=mask_ratio)
    num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    expected_visible = math.floor(num_patches * (1 - Fraction(str(mask_ratio))))
    with torch.no_grad():
        mask = mae(images_for(config, batch=5), generator=seeded()).mask
    assert mae.num_visible == expected_visible
    assert mae.num_masked == num_patches - expected_visible
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [num_patches - expected_visible] * 5


def test_mask_and_ids_restore_describe_the_same_shuffle():
    mae = make_mae()
    with torch.no_grad():
        out = mae(images_for(mae.encoder.config, batch=4), generator=seeded())
    for row in range(4):
        assert sorted(out.ids_restore[row].tolist()) == list(range(mae.num_patches))
    visible = visible_ids(out.ids_restore, mae.num_visible)
    expected = torch.ones_like(out.mask).scatter(1, visible, 0.0)
    assert torch.equal(out.mask, expected)


# ----- the encoder sees only the visible patches -----


@pytest.mark.parametrize("name", list(ENCODERS))
def test_the_encoder_stack_reads_only_prefix_tokens_and_visible_patches(name):
    config = ENCODERS[name]
    mae = make_mae(config)
    seen, handle = capture_stack_io(mae.encoder.encoder)
    with torch.no_grad():
        mae(images_for(config), generator=seeded())
    handle.remove()
    prefix = int(config.stem.class_token) + config.stem.register_tokens
    assert seen["input"].shape[1] == prefix + mae.num_visible


def test_masked_pixels_do_not_reach_the_encoder_but_visible_ones_do():
    mae = make_mae()
    images = images_for(mae.encoder.config)
    p, cols = mae.patch_size, mae.grid_size[1]
    seen, handle = capture_stack_io(mae.encoder.encoder)

    def encoder_output(pictures: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = mae(pictures, generator=seeded(3))
        return seen["output"], out.mask

    base, mask = encoder_output(images)
    masked_index = int(mask[0].nonzero()[0])
    visible_index = int((mask[0] == 0).nonzero()[0])

    def changed(index: int) -> torch.Tensor:
        row, col = divmod(index, cols)
        pictures = images.clone()
        pictures[0, :, row * p:(row + 1) * p, col * p:(col + 1) * p] += 5.0
        return pictures

    after_masked, _ = encoder_output(changed(masked_index))
    after_visible, _ = encoder_output(changed(visible_index))
    handle.remove()
    assert torch.equal(after_masked, base)
    assert (after_visible[0] - base[0]).abs().max() > 1e-3
    # The other samples' patches are untouched either way.
    assert torch.equal(after_visible[1:], base[1:])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_visible_encoding_equals_the_plain_encoder_with_masked_patches_blocked(name):
    # Reference: the ordinary encoder forward on the whole image, with attention to masked patches forbidden. Each
    # visible token then sees exactly the tokens MAE's encoder sees, so their final states must agree.
    config = ENCODERS[name]
    mae = make_mae(config)
    images = images_for(config)
    prefix = int(config.stem.class_token) + config.stem.register_tokens
    with torch.no_grad():
        latent, mask, ids_restore = mae.encode(images, generator=seeded(5))
        allowed_keys = torch.cat([torch.ones(len(images), prefix, dtype=torch.bool), mask == 0], dim=1)
        length = prefix + mae.num_patches
        blocked = allowed_keys.view(len(images), 1, 1, length).expand(-1, 1, length, -1)
        full = mae.encoder(images, mask=blocked, return_outputs=True).last_hidden_state
    visible = visible_ids(ids_restore, mae.num_visible)
    assert_close(latent[:, :prefix], full[:, :prefix])
    expected = full[:, prefix:].gather(1, visible.unsqueeze(-1).expand(-1, -1, WIDTH))
    assert_close(latent[:, prefix:], expected)


# ----- the decoder -----


@pytest.mark.parametrize("name", ["class_token", "registers", "no_class_token", "sincos2d_rgb_non_square"])
def test_decoder_puts_each_patch_back_in_place_with_mask_tokens_and_sincos_positions(name):
    config = ENCODERS[name]
    mae = make_mae(config)
    images = images_for(config)
    prefix = int(config.stem.class_token) + config.stem.register_tokens
    with torch.no_grad():
        latent, mask, ids_restore = mae.encode(images, generator=seeded(2))
        seen, handle = capture_stack_io(mae.decoder)
        pred = mae.decode(latent, ids_restore)
        handle.remove()
        embedded = latent @ mae.decoder_embed.weight.T + mae.decoder_embed.bias
        table = mae.decoder_positions.table
    assert torch.equal(table[:prefix], torch.zeros_like(table[:prefix]))
    visible = visible_ids(ids_restore, mae.num_visible)
    expected = torch.empty(len(images), prefix + mae.num_patches, mae.decoder_config.width)
    for sample in range(len(images)):
        expected[sample, :prefix] = embedded[sample, :prefix]
        for index in range(mae.num_patches):
            expected[sample, prefix + index] = mae.mask_token[0, 0] + table[prefix + index]
        for slot, index in enumerate(visible[sample].tolist()):
            expected[sample, prefix + index] = embedded[sample, prefix + slot] + table[prefix + index]
    assert_close(seen["input"], expected)
    head = mae.decoder_prediction
    assert_close(pred, seen["output"][:, prefix:] @ head.weight.T + head.bias)
    assert pred.shape == (len(images), mae.num_patches, mae.patch_size ** 2 * mae.in_channels)


def test_decoder_config_is_a_pre_norm_layernorm_stack_with_the_encoders_eps():
    mae = make_mae(encoder_config(norm={"eps": 1e-5}), decoder_width=24, decoder_layers=3, decoder_heads=3)
    decoder = mae.decoder_config
    assert (decoder.arch, decoder.width, decoder.num_layers, decoder.attention.num_heads) == ("encoder", 24, 3, 3)
    assert (decoder.norm.kind, decoder.norm.placement, decoder.norm.eps) == ("layernorm", "pre", 1e-5)
    assert len(mae.decoder.blocks) == 3 and mae.decoder.final_norm is not None


# ----- the loss -----


def loss_by_hand(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 norm_pix_loss: bool) -> torch.Tensor:
    images, pred = images.double(), pred.double()
    total, count = torch.zeros((), dtype=torch.float64), 0.0
    for sample in range(pred.shape[0]):
        for index in range(pred.shape[1]):
            if mask[sample, index] == 0:
                continue
            target = patch_by_hand(images, sample, index, patch_size)
            if norm_pix_loss:
                mean = target.sum() / target.numel()
                variance = (target - mean).pow(2).sum() / (target.numel() - 1)
                target = (target - mean) / torch.sqrt(variance + 1e-6)
            total = total + (pred[sample, index] - target).pow(2).mean()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("name", ["class_token", "patch4", "sincos2d_rgb_non_square"])
def test_loss_is_the_mean_squared_error_over_masked_patches(name, norm_pix_loss):
    config = ENCODERS[name]
    mae = make_mae(config, norm_pix_loss=norm_pix_loss)
    images = images_for(config) * 3.0 + 1.0  # patches with a visible mean and scale, so normalizing matters
    with torch.no_grad():
        out = mae(images, generator=seeded(4))
    expected = loss_by_hand(images, out.pred, out.mask, mae.patch_size, norm_pix_loss)
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())


def test_predictions_for_visible_patches_do_not_affect_the_loss():
    mae = make_mae()
    images = images_for(mae.encoder.config)
    with torch.no_grad():
        out = mae(images, generator=seeded())
        altered = out.pred + 10.0 * (out.mask == 0).unsqueeze(-1)
        assert torch.equal(mae.reconstruction_loss(images, altered, out.mask), out.loss)


def test_a_few_optimizer_steps_lower_the_loss():
    mae = make_mae().train()
    images = images_for(mae.encoder.config, batch=8)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = mae(images, generator=seeded(0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_gradients_reach_encoder_and_decoder_but_not_the_unused_encoder_head():
    mae = make_mae(encoder_config(head={"kind": "classification", "num_classes": 3}))
    mae(images_for(mae.encoder.config), generator=seeded()).loss.backward()
    for name, parameter in mae.named_parameters():
        if name.startswith("encoder.head."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_vit_geometry_224_patch16():
    encoder = formerkit.create_model("vit_tiny_patch16_224", num_layers=1)
    mae = MaskedAutoencoder(encoder).eval()
    seen, handle = capture_stack_io(mae.encoder.encoder)
    with torch.no_grad():
        out = mae(torch.randn(1, 3, 224, 224, generator=seeded()), generator=seeded())
    handle.remove()
    assert (mae.num_patches, mae.num_visible) == (196, 49)
    assert seen["input"].shape == (1, 1 + 49, 192)
    assert out.pred.shape == (1, 196, 16 * 16 * 3)
    assert out.mask.sum().item() == 147
    assert math.isfinite(out.loss.item())


# ----- fine-tuning -----


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("name", ["class_token", "registers", "sincos2d_rgb_non_square"])
def test_finetune_model_copies_every_encoder_weight_and_adds_a_fresh_head(name, pooling):
    config = ENCODERS[name]
    mae = make_mae(config.replace(head={"kind": "classification", "num_classes": 7}))
    classifier = finetune_model(mae, num_classes=5, pooling=pooling).eval()
    assert isinstance(classifier, formerkit.Transformer)
    assert classifier.config.head.kind == "classification"
    assert (classifier.config.head.num_classes, classifier.config.head_pooling) == (5, pooling)
    pretrained, tuned = mae.encoder.state_dict(), classifier.state_dict()
    body = {key for key in pretrained if not key.startswith("head.")}
    assert body == {key for key in tuned if not key.startswith("head.")}
    for key in body:
        assert torch.equal(tuned[key], pretrained[key]), key
    assert {key for key in tuned if key.startswith("head.")} == {"head.projection.weight", "head.projection.bias"}
    assert classifier.head.projection.out_features == 5
    images = images_for(config)
    with torch.no_grad():
        expected = mae.encoder(images, return_outputs=True).last_hidden_state
        out = classifier(images, return_outputs=True)
    assert_close(out.last_hidden_state, expected)
    assert out.logits.shape == (len(images), 5)


def test_finetune_model_starts_from_the_pretrained_weights_not_the_initial_ones():
    mae = make_mae().train()
    initial = {key: value.clone() for key, value in mae.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(mae.parameters(), lr=0.1)
    mae(images_for(mae.encoder.config), generator=seeded()).loss.backward()
    optimizer.step()
    trained = mae.encoder.state_dict()
    assert not torch.equal(trained["stem.projection.weight"], initial["stem.projection.weight"])
    tuned = finetune_model(mae, 3).state_dict()
    for key, value in trained.items():
        if not key.startswith("head."):
            assert torch.equal(tuned[key], value), key


# ----- bad arguments -----


@pytest.mark.parametrize("config, field", [
    (encoder_config(stem={"kind": "conv", "patch_size": None, "register_tokens": 0}), "stem.kind"),
    (token_config("encoder", vocab_size=11, width=WIDTH, num_layers=1, max_seq_len=8), "stem.kind"),
    (encoder_config(arch="decoder"), "arch"),
    (encoder_config(position="rope"), "position.kind"),
    (encoder_config(attention={"sliding_window": 3}), "attention.sliding_window"),
])
def test_encoders_mae_cannot_use_are_refused(config, field):
    with pytest.raises(ConfigError) as error:
        MaskedAutoencoder(formerkit.build_model(config))
    assert error.value.field == field


@pytest.mark.parametrize("options, field", [
    ({"mask_ratio": 0.0}, "mask_ratio"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": -0.5}, "mask_ratio"),
    ({"mask_ratio": 1.5}, "mask_ratio"),
    ({"mask_ratio": True}, "mask_ratio"),
    ({"mask_ratio": "0.75"}, "mask_ratio"),
    ({"mask_ratio": 1e-12}, "mask_ratio"),  # 16 patches: nothing would be masked
    ({"mask_ratio": 0.95}, "mask_ratio"),  # 16 patches: int(16 * 0.05) = 0 would stay visible
    ({"decoder_width": 30, "decoder_heads": 4}, "decoder_heads"),
    ({"decoder_width": 6, "decoder_heads": 3}, "decoder_width"),
    ({"decoder_width": 0}, "decoder_width"),
    ({"decoder_layers": 0}, "decoder_layers"),
    ({"decoder_heads": 2.0}, "decoder_heads"),
    ({"norm_pix_loss": "yes"}, "norm_pix_loss"),
])
def test_bad_arguments_raise_config_errors_naming_them(options, field):
    encoder = formerkit.build_model(encoder_config())
    with pytest.raises(ConfigError) as error:
        MaskedAutoencoder(encoder, **options)
    assert error.value.field == field


def test_norm_pix_loss_needs_more_than_one_value_per_patch():
    encoder = formerkit.build_model(encoder_config((4, 4), 1, 1))
    with pytest.raises(ConfigError, match="norm_pix_loss"):
        MaskedAutoencoder(encoder)
    MaskedAutoencoder(encoder, norm_pix_loss=False)


def test_not_a_transformer_is_refused():
    with pytest.raises(InputError, match="encoder"):
        MaskedAutoencoder(nn.Linear(2, 2))
    with pytest.raises(InputError, match="mae"):
        finetune_model(formerkit.build_model(encoder_config()), 3)


def test_images_of_the_wrong_shape_are_refused():
    mae = make_mae()
    with pytest.raises(InputError, match="images"):
        mae(torch.randn(2, 3, 8, 8))


def test_finetune_arguments_are_checked_by_the_head_config():
    with pytest.raises(ConfigError, match="num_classes"):
        finetune_model(make_mae(), 0)
    with pytest.raises(ConfigError, match="head.pooling"):
        finetune_model(make_mae(encoder_config(class_token=False)), 3, pooling="cls")
