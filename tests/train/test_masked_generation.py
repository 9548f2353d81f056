"""The masked_generation objective (MaskGIT on images as tokens) and the masked_diffusion_lm objective (MDLM): their
corruption against its definition, the MDLM bound against its formula, sampling's shapes, units and guidance, bad
input refused by name; slow: the shrunken recipes train, sample and generate, and resume exactly."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from formerkit.data.base import ArraySplit, DataBundle
from formerkit.errors import ConfigError, InputError
from formerkit.generation.masked import masked_count
from formerkit.models import build_model
from formerkit.train import train
from formerkit.train.config import ObjectiveConfig, TrainConfig
from formerkit.train.masked_generation import MaskedDiffusionLM, MaskedGeneration, masked_diffusion_loss

from ..conftest import stop_training_after, token_config


def image_bundle(count: int = 12, size: int = 4) -> DataBundle:
    """A digits-like bundle of raw 0-16 images [count, 1, size, size] (normalized as a bundle holds them: mean 0.25,
    std 0.5, scale 1/16) in 3 classes."""
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(17, (count, 1, size, size), generator=generator).float()
    preprocessing = {"kind": "image", "scale": 1 / 16, "mean": [0.25], "std": [0.5], "image_size": [size, size],
                     "in_channels": 1, "classes": ["a", "b", "c"]}
    train_split = ArraySplit({"inputs": (raw / 16 - 0.25) / 0.5, "labels": torch.arange(count) % 3})
    return DataBundle(train=train_split, valid=None, test=None, preprocessing=preprocessing,
                      model_fields={"image_size": [size, size], "in_channels": 1, "num_classes": 3})


def generation_objective(**config) -> MaskedGeneration:
    return MaskedGeneration(ObjectiveConfig(kind="masked_generation", **config), image_bundle())


def tiny_model(objective: MaskedGeneration):
    fields = objective.model_fields()
    return build_model(token_config("encoder", vocab_size=fields["vocab_size"], max_seq_len=fields["max_seq_len"],
                                    head={"kind": "masked_lm"})).eval()


def test_the_token_layout_puts_mask_classes_and_the_null_class_after_the_image_vocabulary():
    objective = generation_objective()
    # 17 pixel levels (0-16), [MASK] = 17, classes 18-20, null class 21; [class, 16 pixels].
    assert (objective.image_vocab, objective.mask_id, objective.null_class) == (17, 17, 21)
    assert objective.class_tokens(torch.tensor([0, 2])).tolist() == [18, 20]
    assert objective.model_fields() == {"vocab_size": 22, "max_seq_len": 17}
    assert objective.bundle.model_fields == objective.model_fields()
    assert objective.bundle.preprocessing["image_tokens"] == {"kind": "pixels", "levels": 17, "shape": [1, 4, 4]}


def test_each_example_masks_ceil_length_cos_pi_over_2_u_tokens_with_u_from_the_generator():
    objective = generation_objective(class_dropout=0.0)
    batch = objective.bundle.train.take(torch.arange(12))
    tokens = objective.image_tokens(batch)
    inputs, masked, _ = objective.corrupt(tokens, batch["labels"], torch.Generator().manual_seed(5), 0.0)
    # The first draw of the generator is u, one per example (MaskGIT's gamma(u) = cos(pi/2 u)).
    u = torch.rand(12, generator=torch.Generator().manual_seed(5))
    expected = [max(1, math.ceil(16 * math.cos(math.pi / 2 * value))) for value in u.tolist()]
    assert masked.sum(dim=1).tolist() == expected == masked_count(torch.cos(math.pi / 2 * u), 16).tolist()
    assert (inputs[:, 1:][masked] == 17).all() and torch.equal(inputs[:, 1:][~masked], tokens[~masked])
    assert torch.equal(inputs[:, 0], batch["labels"] + 18)


def test_class_dropout_replaces_the_class_by_the_null_class_at_its_rate():
    objective = generation_objective(class_dropout=0.3)
    tokens = torch.zeros(4000, 16, dtype=torch.long)
    inputs, _, _ = objective.corrupt(tokens, torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0), 0.3)
    assert abs((inputs[:, 0] == 21).float().mean().item() - 0.3) < 0.03
    assert set(inputs[:, 0].tolist()) == {18, 21}


def test_samples_are_images_in_raw_units_and_guidance_1_runs_only_the_conditional_pass():
    objective = generation_objective()
    model = tiny_model(objective)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append((len(args[0]), args[0][:, 0].tolist())))
    labels = torch.tensor([0, 1, 2, 1, 0])
    images = objective.sample(model, labels, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 4, 4) and images.dtype == torch.float32
    assert torch.equal(images, images.round()) and images.min() >= 0 and images.max() <= 16
    assert [size for size, _ in sizes] == [5] * 4 and all(classes == [18, 19, 20, 19, 18] for _, classes in sizes)
    # Another scale: one pass of conditional and unconditional (null class 21) rows per step.
    sizes.clear()
    objective.sample(model, labels, steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert [size for size, _ in sizes] == [10] * 3 and sizes[0][1] == [18, 19, 20, 19, 18] + [21] * 5


def test_the_same_generator_gives_the_same_samples():
    objective = generation_objective()
    model = tiny_model(objective)
    first = objective.sample(model, torch.tensor([1, 2]), steps=3, guidance=1.5,
                             generator=torch.Generator().manual_seed(4))
    again = objective.sample(model, torch.tensor([1, 2]), steps=3, guidance=1.5,
                             generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)


@pytest.mark.parametrize(("labels", "options", "field"), [
    ([0, 3], {}, "labels"), ([-1], {}, "labels"), ([[0, 1]], {}, "labels"), ([0.5], {}, "labels"),
    ([0], {"steps": 0}, "steps"), ([0], {"guidance": float("nan")}, "guidance"),
])
def test_bad_sampling_input_is_refused_by_name(labels, options, field):
    objective = generation_objective()
    model = tiny_model(objective)
    with pytest.raises(InputError, match=field):
        objective.sample(model, torch.tensor(labels), **{"steps": 2, "guidance": 1.0, **options})


@pytest.mark.parametrize(("config", "field"), [
    ({"kind": "masked_generation", "class_dropout": 1.0}, "objective.class_dropout"),
    ({"kind": "masked_generation", "codebook_size": 32}, "objective.codebook_size"),  # pixels take no codebook
    ({"kind": "masked_generation", "image_tokens": "codebook", "codebook_size": 1}, "objective.codebook_size"),
    ({"kind": "masked_lm", "class_dropout": 0.2}, "objective.class_dropout"),
    ({"kind": "masked_generation", "unmask_order": "random"}, "objective.unmask_order"),
    ({"kind": "masked_generation", "choice_temperature": -1.0}, "objective.choice_temperature"),
])
def test_bad_objective_settings_are_refused_by_name(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict({"objective": config})


def test_masked_generation_refuses_text_data_and_a_causal_model_by_name():
    text = DataBundle(train=None, valid=None, test=None, preprocessing={"tokenizer": {"kind": "byte"}},
                      model_fields={"vocab_size": 256})
    with pytest.raises(ConfigError, match="objective.kind.*image data source"):
        MaskedGeneration(ObjectiveConfig(kind="masked_generation"), text)
    with pytest.raises(ConfigError, match="objective.kind.*encoder model with a masked_lm head"):
        generation_objective().check_model(token_config("decoder", vocab_size=22))
    with pytest.raises(ConfigError, match="objective.kind.*encoder model with a masked_lm head"):
        MaskedDiffusionLM(ObjectiveConfig(kind="masked_diffusion_lm"), text).check_model(
            token_config("decoder", vocab_size=257))


def test_the_mdlm_bound_is_the_1_over_t_weighted_masked_cross_entropy_per_token():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator)
    targets = torch.randint(7, (3, 5), generator=generator)
    masked = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.4, 0.2, 0.8])
    # Written out: (1/B) sum_i 1/(t_i L) sum_{j masked} -log softmax(logits_ij)[target_ij].
    total = 0.0
    for i in range(3):
        inner = 0.0
        for j in range(5):
            if masked[i, j]:
                probs = torch.exp(logits[i, j]) / torch.exp(logits[i, j]).sum()
                inner -= math.log(probs[targets[i, j]].item())
        total += inner / (t[i].item() * 5)
    assert masked_diffusion_loss(logits, targets, masked, t).item() == pytest.approx(total / 3, rel=1e-5)


def test_mdlm_times_are_stratified_over_the_batch_and_mask_each_token_with_probability_t():
    text = DataBundle(train=None, valid=None, test=None, model_fields={"vocab_size": 256})
    objective = MaskedDiffusionLM(ObjectiveConfig(kind="masked_diffusion_lm"), text)
    assert objective.mask_id == 256 and objective.model_fields() == {"vocab_size": 257}
    tokens = torch.randint(256, (8, 2000), generator=torch.Generator().manual_seed(1))
    inputs, masked, t = objective.corrupt(tokens, torch.Generator().manual_seed(2))
    # t_i = eps + (1 - eps) (i + u) / B: one per eighth of [eps, 1].
    slots = ((t - objective.min_time) / (1 - objective.min_time) * 8).floor()
    assert slots.tolist() == list(range(8))
    assert torch.allclose(masked.float().mean(dim=1), t, atol=0.04)
    assert (inputs[masked] == 256).all() and torch.equal(inputs[~masked], tokens[~masked])


# ----- slow: the shrunken recipes end to end


@pytest.mark.slow
def test_a_shrunken_maskgit_recipe_trains_and_samples_images_in_raw_units(trained_run):
    from formerkit.runs import load_run_model
    from formerkit.train.objectives import make_objective

    run = trained_run("maskgit-digits")
    model, recipe, extra = load_run_model(run)
    assert extra["preprocessing"]["image_tokens"] == {"kind": "pixels", "levels": 17, "shape": [1, 8, 8]}
    # The objective rebuilt from what the run saved (no data read) samples with the saved tokenizer.
    saved = DataBundle(train=None, valid=None, test=None, preprocessing=dict(extra["preprocessing"]))
    objective = make_objective(recipe.objective, saved)
    images = objective.sample(model, torch.arange(10), steps=6, guidance=2.0,
                              generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 1, 8, 8) and torch.equal(images, images.round())
    assert images.min() >= 0 and images.max() <= 16
    # The run wrote a grid at each evaluation (steps 3 and 6), one row per class.
    assert sorted(path.name for path in (run / "samples").glob("*.png")) == ["step_000003.png", "step_000006.png"]


@pytest.mark.slow
def test_formerkit_sample_draws_from_a_maskgit_run(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from formerkit.cli import main

    run = trained_run("maskgit-digits")
    assert main(["sample", str(run), "--class", "3", "--num", "5", "--steps", "4", "--guidance", "1.5", "--seed", "2",
                 "--out", str(tmp_path / "out")]) == 0
    saved = load_file(str(tmp_path / "out" / "samples.safetensors"))
    assert saved["images"].shape == (5, 1, 8, 8) and saved["labels"].tolist() == [3] * 5
    assert torch.equal(saved["images"], saved["images"].round()) and saved["images"].max() <= 16
    assert (tmp_path / "out" / "grid.png").exists()


@pytest.mark.slow
def test_a_codebook_run_saves_its_centres_and_samples_patches_of_them(trained_run):
    from formerkit.data.image_tokens import image_tokenizer
    from formerkit.runs import load_run_model
    from formerkit.train.objectives import make_objective

    run = trained_run("maskgit-digits", **{"objective.image_tokens": "codebook", "objective.codebook_size": 16})
    model, recipe, extra = load_run_model(run)
    codebook = image_tokenizer(extra["preprocessing"]["image_tokens"])
    assert codebook.centres.shape == (16, 4) and model.config.max_seq_len == 17  # class + 4x4 patches
    objective = make_objective(recipe.objective, DataBundle(None, None, None,
                                                            preprocessing=dict(extra["preprocessing"])))
    images = objective.sample(model, torch.tensor([3, 7]), steps=4, guidance=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8)
    assert torch.allclose(codebook.decode(codebook.encode(images)), images)  # every patch is a centre


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["maskgit-digits", "mdlm-stdlib"])
def test_an_interrupted_run_resumed_equals_the_uninterrupted_run(recipe, tiny, tmp_path):
    overrides = tiny(recipe, **{"run.checkpoint_every": 3, "run.threads": 1})
    whole = train(recipe, tmp_path / "whole", overrides=overrides).model
    with stop_training_after(3):
        first = train(recipe, tmp_path / "parts", overrides=overrides)
    assert first.summary["status"] == "interrupted" and first.summary["steps"] == 3
    resumed = train(recipe, tmp_path / "parts", overrides=overrides, resume=True).model
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


@pytest.mark.slow
def test_formerkit_generate_continues_a_prompt_with_a_masked_diffusion_lm(trained_run, tmp_path, capsys):
    from formerkit.cli import main
    from formerkit.runs import generate_run

    run = shutil.copytree(trained_run("mdlm-stdlib"), tmp_path / "run")
    pieces = list(generate_run(run, "def ", max_new_tokens=12, steps=3, seed=1))
    assert len(pieces) == 1 and pieces == list(generate_run(run, "def ", max_new_tokens=12, steps=3, seed=1))
    assert 1 <= len(pieces[0].encode("utf-8", "replace")) <= 3 * 12  # 12 bytes, some perhaps replacement marks
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--steps", "3",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out == pieces[0] + "\n"
    with pytest.raises(InputError, match="top_k"):
        list(generate_run(run, "def ", top_k=5))
