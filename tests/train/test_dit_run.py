"""A shrunken dit-digits run end to end: formerkit sample's files, the report's grids, refusals, exact resume."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from formerkit.cli import main
from formerkit.errors import CheckpointError
from formerkit.sample import load_image_generator, sample_images
from formerkit.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dit_run(trained_run):
    return trained_run("dit-digits", **{"run.checkpoint_every": 3, "run.threads": 1})


def test_sample_writes_the_grid_and_the_samples(dit_run, tmp_path, capsys):
    assert main(["sample", str(dit_run), "--class", "3", "--num", "5", "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path / "three")]) == 0
    printed = capsys.readouterr().out
    assert "5 samples of 3" in printed and "2 steps" in printed
    saved = load_file(str(tmp_path / "three" / "samples.safetensors"))
    assert saved["images"].shape == (5, 1, 8, 8) and saved["images"].dtype == torch.float32
    assert saved["labels"].tolist() == [3] * 5 and saved["labels"].dtype == torch.long
    assert 0 <= float(saved["images"].min()) and float(saved["images"].max()) <= 16
    assert (tmp_path / "three" / "grid.png").stat().st_size > 0
    # The library call with the same seed draws the same images.
    assert torch.equal(sample_images(dit_run, [3] * 5, steps=2, seed=1), saved["images"])
    # Without --class: every class in turn.
    assert main(["sample", str(dit_run), "--num", "12", "--out", str(tmp_path / "all")]) == 0
    assert load_file(str(tmp_path / "all" / "samples.safetensors"))["labels"].tolist() == [*range(10), 0, 1]
    from PIL import Image

    assert Image.open(tmp_path / "all" / "grid.png").size[0] > Image.open(tmp_path / "three" / "grid.png").size[0]


def test_sample_refuses_what_it_cannot_draw(dit_run, trained_run, tmp_path, capsys):
    assert main(["sample", str(dit_run), "--class", "10", "--out", str(tmp_path / "x")]) == 2
    assert "--class" in capsys.readouterr().err
    assert main(["sample", str(dit_run), "--prompt", "hi"]) == 2
    assert "--prompt" in capsys.readouterr().err
    classifier = trained_run("cct-digits")
    with pytest.raises(CheckpointError, match="'classification', which does not generate images"):
        load_image_generator(classifier)
    assert main(["sample", str(classifier), "--class", "1"]) == 2
    assert "--class" in capsys.readouterr().err


def test_the_run_keeps_sample_grids_and_the_report_shows_them(dit_run, tmp_path):
    assert sorted(p.name for p in (dit_run / "samples").glob("*.png")) == ["step_000003.png", "step_000006.png"]
    assert main(["report", str(dit_run), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Samples over training" in page and "step 6" in page


def test_a_resumed_run_is_exact(dit_run, tiny, tmp_path):
    shutil.copytree(dit_run, tmp_path / "resumed")
    for path in ("checkpoints/step-00000006", "model"):
        shutil.rmtree(tmp_path / "resumed" / path)
    (tmp_path / "resumed" / "summary.json").unlink()
    overrides = tiny("dit-digits", **{"run.checkpoint_every": 3, "run.threads": 1})
    resumed = train("dit-digits", tmp_path / "resumed", overrides=overrides, resume=True)
    assert resumed.summary["status"] == "completed"
    reference = load_image_generator(dit_run).model
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_ddpm_objective_trains_and_samples_with_ddim(trained_run, tmp_path):
    run = trained_run("dit-digits", **{"objective.kind": "ddpm", "objective.sampler": "ddim",
                                       "objective.diffusion_steps": 50, "objective.ddim_eta": 0.5,
                                       "schedule.steps": 3, "run.threads": 1})
    images = sample_images(run, [0, 9], steps=3, guidance=2.0, seed=0)
    assert images.shape == (2, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 16
    assert torch.equal(images, sample_images(run, [0, 9], steps=3, guidance=2.0, seed=0))
