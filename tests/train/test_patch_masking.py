"""objective.patch_mask_ratio (MDT / MaskDiT patch masking) in the diffusion objectives: the loss reads the kept
patches only, the run saves the plain model (no mask token) and samples from it unmasked."""

from types import SimpleNamespace

import pytest
import torch

from formerkit.config import (
    AttentionConfig,
    ConditionConfig,
    HeadConfig,
    ModelConfig,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.data.base import RowDraws
from formerkit.errors import ConfigError
from formerkit.models.masked_diffusion import PatchMaskedDiffusion
from formerkit.models.transformer import Transformer, build_model
from formerkit.train.config import ObjectiveConfig
from formerkit.train.diffusion import FlowMatching

from ..conftest import QUIET, randomize_weights

DIGITS = SimpleNamespace(preprocessing={"kind": "image", "mean": [0.3], "std": [0.4], "scale": 1 / 16,
                                        "classes": [str(i) for i in range(10)]})


def _model():
    config = ModelConfig(
        arch="encoder", width=32, num_layers=2, max_seq_len=None, attention=AttentionConfig(num_heads=2),
        norm=NormConfig(kind="layernorm", placement="pre", eps=1e-6), position=PositionConfig(kind="sincos2d"),
        stem=StemConfig(kind="patches", image_size=(8, 8), patch_size=2, in_channels=1),
        head=HeadConfig(kind="patches", pooling="none"),
        condition=ConditionConfig(kind="adaln_zero", timesteps=True, classes=10))
    return randomize_weights(build_model(config), 0, std="fan_in")


def test_the_masked_loss_is_the_squared_error_over_the_kept_patches_only():
    objective = FlowMatching(ObjectiveConfig(kind="flow_matching", patch_mask_ratio=0.5, decoder_layers=1), DIGITS)
    wrapped = objective.wrap_model(_model()).train()
    assert isinstance(wrapped, PatchMaskedDiffusion) and objective.unwrap_model(wrapped) is wrapped.model
    seen = {}

    def keep_output(module, args, output):
        output.retain_grad()
        seen["prediction"] = output

    wrapped.model.head.register_forward_hook(keep_output)
    batch = {"inputs": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
             "labels": torch.tensor([0, 3, 5, 9])}
    loss = objective.loss(wrapped, batch, torch.Generator().manual_seed(7))
    loss.backward()
    # The same draws replayed: the noise and timesteps, then the visible patches.
    replay = torch.Generator().manual_seed(7)
    _, _, target = objective.noisy(objective.to_data(batch["inputs"]), RowDraws.of(replay, 4))
    kept = wrapped.kept_pixels(wrapped.draw_visible(4, replay))
    prediction = seen["prediction"]
    assert kept.sum() == 4 * 8 * 4  # 8 of 16 patches of 4 pixels per image
    expected = ((prediction - target) ** 2 * kept).sum() / kept.sum()
    torch.testing.assert_close(loss, expected)
    # The dropped patches' outputs get no gradient; the kept ones get 2 (prediction - target) / count.
    assert prediction.grad[kept.expand_as(prediction) == 0].abs().max() == 0
    torch.testing.assert_close(prediction.grad * kept, 2 * (prediction - target).detach() * kept / kept.sum())


def test_without_masking_the_objective_trains_the_model_itself_and_evaluation_is_unmasked():
    plain = FlowMatching(ObjectiveConfig(kind="flow_matching"), DIGITS)
    model = _model()
    assert plain.wrap_model(model) is model
    masked = FlowMatching(ObjectiveConfig(kind="flow_matching", patch_mask_ratio=0.5, decoder_layers=1), DIGITS)
    wrapped = masked.wrap_model(model).eval()
    batch = {"inputs": torch.randn(4, 1, 8, 8), "labels": torch.tensor([0, 3, 5, 9])}
    # An eval-mode (EMA, evaluation) pass is the plain model's: the same loss as the plain objective's.
    torch.testing.assert_close(masked.loss(wrapped, batch, torch.Generator().manual_seed(3)),
                               plain.loss(model.eval(), batch, torch.Generator().manual_seed(3)))
    images = masked.sample(wrapped, torch.tensor([1, 2]), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 16


def test_patch_masking_applies_to_diffusion_objectives_only():
    with pytest.raises(ConfigError, match="patch_mask_ratio"):
        ObjectiveConfig(kind="classification", patch_mask_ratio=0.5)
    with pytest.raises(ConfigError, match="patch_mask_ratio"):
        ObjectiveConfig(kind="flow_matching", patch_mask_ratio=1.0)
    objective = FlowMatching(ObjectiveConfig(kind="flow_matching", patch_mask_ratio=0.5, decoder_layers=2), DIGITS)
    with pytest.raises(ConfigError, match="objective.decoder_layers"):  # the model has 2 blocks
        objective.wrap_model(_model())


@pytest.mark.slow
def test_a_patch_masked_run_saves_the_plain_model_and_samples(tmp_path):
    from formerkit.runs import load_run_model
    from formerkit.train import train

    overrides = {**QUIET, "schedule.steps": 3, "schedule.batch_size": 8, "eval.every": 3, "model.config.width": 32,
                 "model.config.num_layers": 2, "model.config.attention.num_heads": 2, "objective.sample_steps": 2,
                 "objective.patch_mask_ratio": 0.5, "objective.decoder_layers": 1}
    train("dit-digits", tmp_path / "run", overrides=overrides)
    model, recipe, _ = load_run_model(tmp_path / "run")
    assert type(model) is Transformer and recipe.objective.patch_mask_ratio == 0.5
    assert not any("mask_token" in name for name, _ in model.named_parameters())
    assert (tmp_path / "run" / "samples").is_dir()  # the grid at the evaluation drew through the wrapper
