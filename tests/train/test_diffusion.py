"""The diffusion objectives (formerkit.train.diffusion): data units, the losses against their formulas, sampling's
shapes, units and labels, and what is refused."""

import pytest
import torch
import torch.nn.functional as F

from formerkit import build_model
from formerkit.config import ModelConfig
from formerkit.data.base import DataBundle
from formerkit.errors import ConfigError, InputError
from formerkit.train.config import ObjectiveConfig
from formerkit.train.objectives import make_objective

# Digits as the data source records them: raw 0-16, scale 1/16, then normalized by a mean and std.
PREPROCESSING = {"kind": "image", "scale": 1 / 16, "mean": [0.3], "std": [0.4], "classes": [str(i) for i in range(10)]}


def objective(kind="flow_matching", **fields):
    bundle = DataBundle(train=None, valid=None, test=None, preprocessing=PREPROCESSING)
    return make_objective(ObjectiveConfig(kind=kind, **fields), bundle)


def tiny_dit(randomize) -> torch.nn.Module:
    config = ModelConfig(arch="encoder", width=16, num_layers=1, attention={"num_heads": 2},
                         stem={"kind": "patches", "image_size": 8, "patch_size": 4, "in_channels": 1},
                         position={"kind": "sincos2d"}, head={"kind": "patches"},
                         condition={"kind": "adaln_zero", "timesteps": True, "classes": 10,
                                    "timestep_frequencies": 8})
    return randomize(build_model(config), 0, std=0.3).eval()


def normalized(raw):
    return (raw / 16 - 0.3) / 0.4


def test_data_units_are_minus_one_to_one_and_samples_come_back_raw():
    diffusion = objective()
    raw = torch.tensor([0.0, 8.0, 16.0]).view(1, 1, 1, 3)
    data = diffusion.to_data(normalized(raw))
    assert torch.allclose(data, torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3), atol=1e-6)
    assert torch.allclose(diffusion.to_raw(data), raw, atol=1e-5)
    assert torch.equal(diffusion.to_raw(torch.tensor([-3.0, 5.0])), torch.tensor([0.0, 16.0]))


def test_flow_matching_loss_is_the_velocity_error(randomize):
    model, diffusion = tiny_dit(randomize), objective()
    batch = {"inputs": normalized(16 * torch.rand(3, 1, 8, 8)), "labels": torch.tensor([1, 5, 9])}
    loss = diffusion.loss(model, batch, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    x0 = batch["inputs"] * 0.4 * 2 + 0.3 * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(3, generator=generator)
    x_t = (1 - t.view(3, 1, 1, 1)) * x0 + t.view(3, 1, 1, 1) * noise
    prediction = model(x_t, timesteps=1000 * t, labels=batch["labels"])
    assert torch.allclose(loss, F.mse_loss(prediction, noise - x0), atol=1e-5)


def test_ddpm_loss_is_the_noise_error(randomize):
    model, diffusion = tiny_dit(randomize), objective("ddpm", noise_schedule="linear", diffusion_steps=100)
    batch = {"inputs": normalized(16 * torch.rand(3, 1, 8, 8)), "labels": torch.tensor([0, 2, 4])}
    loss = diffusion.loss(model, batch, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    x0 = batch["inputs"] * 0.4 * 2 + 0.3 * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(100, (3,), generator=generator)
    abar = diffusion.schedule.alphas_bar[t].float().view(3, 1, 1, 1)
    prediction = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, timesteps=t.float(), labels=batch["labels"])
    assert torch.allclose(loss, F.mse_loss(prediction, noise), atol=1e-5)


@pytest.mark.parametrize("kind, fields", [("flow_matching", {"sampler": "heun"}), ("ddpm", {"diffusion_steps": 50})])
def test_samples_have_the_shape_units_and_seed_asked_for(randomize, kind, fields):
    model, diffusion = tiny_dit(randomize), objective(kind, sample_steps=3, **fields)
    labels = torch.tensor([3, 3, 7])
    images = diffusion.sample(model, labels, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 16
    again = diffusion.sample(model, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    other = diffusion.sample(model, labels, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(images, other)


def test_guidance_one_takes_one_pass_per_step_and_two_halves_otherwise(randomize):
    model, diffusion = tiny_dit(randomize), objective(sample_steps=5)
    batches = []
    hook = model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    diffusion.sample(model, torch.tensor([1, 2]), guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert batches == [2] * 5
    batches.clear()
    diffusion.sample(model, torch.tensor([1, 2]), guidance=2.5, generator=torch.Generator().manual_seed(0))
    assert batches == [4] * 5  # the conditional and null-class halves in one pass
    hook.remove()


@pytest.mark.parametrize("call, field", [
    (dict(labels=torch.tensor([10])), "labels"),
    (dict(labels=torch.tensor([-1])), "labels"),
    (dict(labels=torch.tensor([[1]])), "labels"),
    (dict(labels=torch.tensor([1]), steps=0), "steps"),
    (dict(labels=torch.tensor([1]), guidance=-1.0), "guidance"),
])
def test_bad_sampling_requests_are_refused_by_name(randomize, call, field):
    with pytest.raises(InputError, match=f"^{field}:"):
        objective().sample(tiny_dit(randomize), call.pop("labels"), **call)


def test_a_model_that_cannot_denoise_is_refused():
    classifier = ModelConfig(arch="encoder", width=16, num_layers=1, attention={"num_heads": 2},
                             stem={"kind": "patches", "image_size": 8, "patch_size": 4, "in_channels": 1},
                             head={"kind": "classification", "num_classes": 10})
    with pytest.raises(ConfigError, match=r"head\.kind"):
        objective().check_model(classifier)


@pytest.mark.parametrize("kind, fields, field", [
    ("ddpm", {"sampler": "heun"}, "objective.sampler"),
    ("flow_matching", {"sampler": "ddim"}, "objective.sampler"),
    ("flow_matching", {"noise_schedule": "linear"}, "objective.noise_schedule"),
    ("classification", {"sample_steps": 4}, "objective.sample_steps"),
    ("ddpm", {"sample_steps": 0}, "objective.sample_steps"),
])
def test_objective_settings_that_do_not_apply_are_refused(kind, fields, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ObjectiveConfig(kind=kind, **fields)


def test_text_data_is_refused_by_name():
    bundle = DataBundle(train=None, valid=None, test=None, preprocessing={"kind": "text"})
    with pytest.raises(ConfigError, match=r"objective\.kind"):
        make_objective(ObjectiveConfig(kind="flow_matching"), bundle)
