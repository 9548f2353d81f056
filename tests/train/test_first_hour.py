"""The first hour of a new user (issue 17): a failed start leaves no run behind, the start of training says what it
costs (parameters, tokens per example, time per step) and warns about a token-count trap, a short run shrinks its
warm-up, and the messages around a run say where it resumed, what to run next and what was skipped."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from formerkit.cli import main
from formerkit.data import build_data
from formerkit.train import load_recipe, train
from formerkit.train.config import DataConfig, ScheduleConfig
from formerkit.train.progress import line_every, progress
from formerkit.train.startup import token_warning, tokens_per_example
from formerkit.train.trainer import lr_factor


def _set(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _shapes(root, classes=("circle", "square"), per_class=6, extra=()):
    """An image folder: ``per_class`` 8x8 PNGs per class (each a different gray level), and ``extra`` other files."""
    from PIL import Image

    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.new("L", (8, 8), color=20 * index + 100 * label).save(root / name / f"{index}.png")
    for relative in extra:
        (root / relative).write_text("not an image\n")
    return root


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----- 1. a failed start locks nothing


@pytest.mark.slow
def test_a_start_that_fails_on_its_image_folder_leaves_no_run_and_the_corrected_command_trains(tiny, tmp_path,
                                                                                              capsys):
    shapes = _shapes(tmp_path / "shapes")
    out = tmp_path / "run"
    base = ["train", "cct-digits", "--out", str(out), *_set(tiny("cct-digits")),
            "--set", "data.source=image_folder", "--set", f"data.path={shapes}"]
    assert main(base) == 2  # image_folder needs data.image_size
    assert "data.image_size: expected an integer" in capsys.readouterr().err
    assert not (out / "recipe.yaml").exists() and not (out / "model.yaml").exists()
    assert main([*base, "--set", "data.image_size=8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6


@pytest.mark.slow
def test_a_jsonl_file_without_its_text_field_fails_cleanly_then_trains_with_resume_too(tiny, tmp_path, capsys):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(json.dumps({"body": f"note {i}: the quick brown fox jumps over the lazy dog\n"}) + "\n"
                              for i in range(300)))
    out = tmp_path / "run"
    base = ["train", "char-lm", "--out", str(out), *_set(tiny("char-lm")), "--set", "data.source=jsonl",
            "--set", f"data.path={corpus}"]
    assert main(base) == 2
    assert f"{corpus}, line 1: no field 'text' (data.text_field)" in capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []
    # Nothing was written, so there is nothing to resume: --resume says to leave it out, and without it the
    # corrected command trains.
    assert main([*base, "--set", "data.text_field=body", "--resume"]) == 2
    assert f"--resume: {out} holds no run to resume (no recipe.yaml); leave out --resume" in capsys.readouterr().err
    assert main([*base, "--set", "data.text_field=body"]) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_directory_left_by_a_failed_start_before_this_fix_is_started_over(tiny, tmp_path, console):
    # A recipe.yaml and model.yaml but no checkpoint: what a start that failed after writing them left.
    out = tmp_path / "run"
    out.mkdir()
    load_recipe("cct-digits").with_overrides({"optim.lr": 0.5}).to_yaml(out / "recipe.yaml")
    result = train("cct-digits", out, overrides=tiny("cct-digits"), resume=True, console=console)
    assert result.summary["status"] == "completed"
    assert f"{out}: no checkpoint yet (nothing was trained); starting a new run" in console.file.getvalue()
    assert load_recipe(str(out / "recipe.yaml")).optim.lr == load_recipe("cct-digits").optim.lr
    # A second start without --resume is refused now: this directory holds a run.
    with pytest.raises(Exception, match="already holds a run; pass --resume"):
        train("cct-digits", out, overrides=tiny("cct-digits"))


# ----- 3. tokens per example, parameters, speed


def _resolved(recipe: str, **overrides):
    config = load_recipe(recipe).with_overrides(overrides)
    return config, config.model.resolve(build_data(config.data).model_fields)


def test_32x32_images_in_the_8x8_digits_recipe_warn_naming_the_pool_kernel():
    config, model_config = _resolved("cct-digits", **{"data.image_size": 32})
    assert tokens_per_example(model_config, config.data) == 32 * 32  # 3x3 convolutions keep the size, no pooling
    warning = token_warning(config, model_config)
    assert warning.startswith("warning: 1,024 tokens per example, 16x the 64 recipe cct-digits was made for "
                              "(its data: digits; warned above 4x)")
    assert "~256x per example" in warning
    assert "set model.stem.pool_kernel=3 (now 0: no pooling" in warning and "data.image_size (now 32)" in warning
    # With pooling after each of the 2 conv layers, 32x32 gives (32 / 2 / 2)^2 = 64 tokens: no warning.
    config, model_config = _resolved("cct-digits", **{"data.image_size": 32, "model.stem.pool_kernel": 3})
    assert tokens_per_example(model_config, config.data) == 64
    assert token_warning(config, model_config) is None
    # 16x16 without pooling: 256 tokens, exactly 4x the recipe's, not beyond the rule.
    config, model_config = _resolved("cct-digits", **{"data.image_size": 16})
    assert tokens_per_example(model_config, config.data) == 256
    assert token_warning(config, model_config) is None


def test_a_patch_model_warns_naming_the_patch_size_and_the_recipes_own_data_never_warns():
    config, model_config = _resolved("vit-digits", **{"data.image_size": 32})
    own_config, own_model = _resolved("vit-digits")
    patch = own_model.stem.patch_size
    own_tokens = (8 // patch) ** 2 + own_model.stem.num_prefix_tokens
    assert tokens_per_example(own_model, own_config.data) == own_tokens
    assert token_warning(own_config, own_model) is None
    tokens = (32 // patch) ** 2 + model_config.stem.num_prefix_tokens
    warning = token_warning(config, model_config)
    assert f"warning: {tokens:,} tokens per example" in warning
    assert f"set a larger model.stem.patch_size (now {patch})" in warning


@pytest.mark.slow
def test_the_start_prints_parameters_tokens_and_the_measured_time_per_step(tiny, tmp_path, console):
    result = train("cct-digits", tmp_path / "run", overrides=tiny("cct-digits", **{"data.image_size": 16}),
                   console=console)
    text = console.file.getvalue()
    assert f"model: {result.summary['parameters']:,} parameters, 256 tokens per example" in text
    # 16x16: 256 tokens, 4x the recipe's 64 — at the rule's limit, no warning.
    assert "warning:" not in text
    # Timed over steps 2-6 (the first pays for warm-up): figures, then the projection for all 6 steps.
    assert re.search(r"^speed: [0-9.e+-]+ s per step \(measured over steps 2-6\); 6 steps take about \d+ (s|min)",
                     text, re.M)


# ----- 4. warm-up longer than the run


def test_a_warm_up_longer_than_the_run_is_valid_a_fraction_scales_and_a_negative_one_is_refused():
    assert ScheduleConfig(steps=30, warmup_steps=50).warmup == 3  # a tenth of the run
    assert ScheduleConfig(steps=30, warmup_steps=30).warmup == 30
    assert ScheduleConfig(steps=600, warmup_steps=0.1).warmup == 60
    assert ScheduleConfig(steps=30, warmup_steps=0.1).warmup == 3
    expected = "an integer >= 0 (steps) or a fraction in (0, 1) of schedule.steps"
    for bad in (-1, 1.5, 0.0):
        with pytest.raises(Exception, match=re.escape(f"schedule.warmup_steps: expected {expected}, got {bad}")):
            ScheduleConfig(steps=30, warmup_steps=bad)


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [50, 0.1])
def test_a_warm_up_longer_than_the_run_or_a_fraction_warms_up_over_a_tenth_of_it(warmup, tiny, tmp_path, console):
    overrides = tiny("cct-digits", **{"schedule.steps": 20, "schedule.warmup_steps": warmup, "eval.every": 20})
    train("cct-digits", tmp_path / "run", overrides=overrides, console=console)
    note = ("note: schedule.warmup_steps (50) is longer than the run (schedule.steps=20); warming up over 2 steps "
            "(a tenth of the run) instead")
    assert (note in console.file.getvalue()) == (warmup == 50)  # a fraction asked for it: no note
    lr, ratio = load_recipe("cct-digits").optim.lr, load_recipe("cct-digits").schedule.min_lr_ratio
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in records if r["kind"] == "train"]
    assert logged == pytest.approx([lr * lr_factor(step, 2, 20, ratio) for step in range(1, 21)])


# ----- 8. messages


@pytest.mark.slow
def test_resume_says_the_step_and_the_checkpoint_it_resumes_from(trained_run, tmp_path, console):
    extra = {"run.checkpoint_every": 3}
    run = tmp_path / "run"
    shutil.copytree(trained_run("cct-digits", **extra), run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if stopped after step 3's checkpoint
    from tests.conftest import tiny_overrides

    train("cct-digits", run, overrides=tiny_overrides("cct-digits", **extra), resume=True, console=console)
    assert f"resuming {run} at step 3 of 6 from {run / 'checkpoints' / 'step-00000003'}" in console.file.getvalue()


@pytest.mark.slow
def test_a_run_on_the_users_text_is_named_after_its_directory_and_hints_a_prompt_from_its_data(tiny, tmp_path,
                                                                                                 capsys):
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time there was a small model.\n" * 150)
    out = tmp_path / ("a-long-directory-name-" * 4) / "story"  # commands longer than a pipe's 80 columns
    overrides = tiny("char-lm", **{"data.source": "text", "data.path": str(story), "run.progress": True})
    assert main(["train", "char-lm", "--out", str(out), *_set(overrides)]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "story" and summary["recipe"] == "char-lm"
    assert any(line.strip() == "story: completed" for line in lines)
    # Every command on a line of its own, whole although longer than the 80 columns of a pipe.
    commands = lines[lines.index("next:") + 1:]
    assert [line.strip() for line in commands] == [f"formerkit eval {out}", f"formerkit summary {out / 'model'}",
                                                   f"formerkit generate {out} --prompt 'Once '",
                                                   f"formerkit report {out}"]
    # Not a terminal: a plain progress line at each logged step (log_every 1, 6 steps), the name first.
    progress = [line for line in lines if line.startswith("story step ")]
    assert [line.split()[2] for line in progress] == [f"{step}/6" for step in range(1, 7)]
    assert all(re.search(r"loss \d+\.\d{4}  [\d,]+ tokens/s$", line) for line in progress)


def test_files_that_are_not_images_are_named_in_the_data_description(tmp_path):
    shapes = _shapes(tmp_path / "shapes", extra=("circle/notes.txt", "square/labels.csv", "square/readme.md",
                                                 "square/x.json"))
    bundle = build_data(DataConfig(source="image_folder", path=str(shapes), image_size=8))
    assert bundle.description.endswith("; skipped 4 files that are not images (.png, .jpg, .jpeg, .bmp, .gif, "
                                       ".webp): circle/notes.txt, square/labels.csv, square/readme.md and 1 more")
    assert len(bundle.train) + len(bundle.test) == 12


def test_help_shows_every_default_and_compile_says_aotinductor(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = _one_line(capsys.readouterr().out)
    # A converted checkpoint's generation config may change them: the help says so in its own words.
    assert "--max-new-tokens MAX_NEW_TOKENS default 200, or a converted checkpoint's generation_config.json" in text
    assert ("--temperature TEMPERATURE 0 picks the most likely token (greedy); default 0.8, or a converted "
            "checkpoint's generation_config.json") in text
    assert "--seed SEED (default: 0)" in text
    assert ("--compile compile the decode step ahead of time with AOTInductor (torch.compile where AOTInductor "
            "cannot)") in text
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = _one_line(capsys.readouterr().out)
    assert "(default test)" in text and "(default: test)" not in text  # a help naming its default is left alone
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = _one_line(capsys.readouterr().out)
    assert "(default: )" not in text and "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.slow
def test_inspect_with_text_on_an_image_run_says_it_is_an_image_model(trained_run, capsys):
    run = trained_run("cct-digits")
    assert main(["inspect", str(run), "--text", "hi"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"formerkit inspect: error: inspect: {run} is an image model (conv stem on 1x8x8 images)")
    assert "pass --image-index N" in error and "tokenizer" not in error


def test_a_terminal_gets_the_bar_and_a_log_gets_a_plain_line_about_every_twentieth_of_the_run():
    import io

    from rich.console import Console

    terminal = Console(file=io.StringIO(), force_terminal=True)
    log = Console(file=io.StringIO(), force_terminal=False, width=80)
    assert type(progress(terminal, True, 600, 0, "run", 10)).__name__ == "_Progress"
    lines = progress(log, True, 600, 0, "run", 10)
    assert type(lines).__name__ == "_Lines" and line_every(600, 10) == 30  # a multiple of log_every: 20 lines
    assert line_every(6, 1) == 1 and line_every(1000, 7) == 49
    with lines:
        for step in range(10, 601, 10):
            lines.advance(step, 1.5, 1234.0, "examples")
    printed = log.file.getvalue().splitlines()
    assert printed[0] == "run step 30/600  loss 1.5000  1,234 examples/s" and len(printed) == 20
    assert type(progress(log, False, 600, 0, "run", 10)).__name__ == "_NoProgress"
