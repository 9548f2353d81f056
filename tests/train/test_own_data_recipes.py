"""The recipes for the user's own data (text-folder, jsonl-lm, image-folder, csv-forecast): each is copied with
``formerkit recipes NAME``, pointed at a tiny generated dataset of its shape, trained for a few steps and evaluated,
all through the command line as the README's "Your own data" section does."""

from __future__ import annotations

import json
import math
import random

import pytest

import formerkit
from formerkit.cli import main
from formerkit.train import load_recipe

OWN_DATA = ("text-folder", "jsonl-lm", "image-folder", "csv-forecast")
WORDS = "the a model learns to read and write short sentences about cats dogs birds trees rivers stones".split()


def _sentences(rng: random.Random, count: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(count))


def write_text_folder(root) -> int:
    """24 text files (some in a sub-folder), and a file of another type the text source ignores; returns 24."""
    rng = random.Random(0)
    for index in range(24):
        path = root / ("notes" if index % 3 == 0 else "") / f"doc{index:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_sentences(rng, 6) + "\n")
    (root / "image.png").write_bytes(b"not text")
    return 24


def write_jsonl(path) -> int:
    """40 records whose text is in the field "body" (a "label" field is ignored); returns 40."""
    rng = random.Random(1)
    path.write_text("".join(json.dumps({"id": i, "body": _sentences(rng, 3), "label": i % 2}) + "\n"
                            for i in range(40)))
    return 40


def write_image_folder(root) -> list[str]:
    """3 classes of 6 RGB images each (20x20 squares of the class's colour with noise); returns the class names."""
    from PIL import Image

    rng = random.Random(2)
    colours = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for index in range(6):
            image = Image.new("RGB", (20, 20), colour)
            image.putpixel((rng.randrange(20), rng.randrange(20)), (255, 255, 255))
            image.save(root / name / f"{index}.png")
    return sorted(colours)


def write_series_csv(path) -> int:
    """300 hourly rows: a time stamp and two numeric columns; returns 300."""
    rng = random.Random(3)
    rows = ["time,load,temperature"]
    for step in range(300):
        load, temperature = 50 + 10 * math.sin(step / 4) + rng.random(), 10 + 5 * math.cos(step / 24)
        rows.append(f"2024-01-{1 + step // 24:02d}T{step % 24:02d}:00,{load:.3f},{temperature:.3f}")
    path.write_text("\n".join(rows) + "\n")
    return 300


# The data description each run prints: every 20th file or record held out for validation (24 files: the 20th; 40
# records: the 20th and 40th), 1 of each class's 6 images held out for the test (round(0.2 * 6)), the last 60 of 300
# rows the test part (windows of 32 + 8 rows: 201 starts in the first 240 rows; test targets in the last 60 rows).
EXPECTED_DATA = {
    "text-folder": "text {data}: 23 training documents",
    "jsonl-lm": "jsonl {data}: 38 training documents",
    "image-folder": "image folder {data}: 15 training and 3 test images of 3x32x32",
    "csv-forecast": "csv {data}: 300 steps of 2 columns (load, temperature); 201 training windows (first 240 steps), "
                    "53 test windows (last 60 steps); window 32, horizon 8",
}


def _set(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.mark.slow
@pytest.mark.parametrize("name", OWN_DATA)
def test_an_own_data_recipe_copied_from_formerkit_recipes_trains_and_evaluates(name, tiny, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # the console prints each message on one line
    data = tmp_path / "data"
    data.mkdir()
    extra = {}
    if name == "text-folder":
        write_text_folder(data)
    elif name == "jsonl-lm":
        data = data / "records.jsonl"
        write_jsonl(data)
        extra["data.text_field"] = "body"
    elif name == "image-folder":
        classes = write_image_folder(data)
    else:
        data = data / "series.csv"
        write_series_csv(data)
    # formerkit recipes NAME > my.yaml: the copy is the shipped recipe, placeholder path included.
    assert main(["recipes", name]) == 0
    copy = tmp_path / "my.yaml"
    copy.write_text(capsys.readouterr().out)
    assert load_recipe(copy) == load_recipe(name)
    out = tmp_path / "run"
    assert main(["train", str(copy), "--out", str(out), *_set({**tiny(name), "data.path": str(data), **extra})]) == 0
    # What the data source made of the files (the trainer prints it): the splits the recipe's comments describe.
    printed = " ".join(capsys.readouterr().out.split())
    assert EXPECTED_DATA[name].format(data=data) in printed
    steps = tiny(name)["schedule.steps"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    assert [path.name for path in sorted((out / "checkpoints").glob("step-*"))][-1] == f"step-{steps:08d}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert main(["eval", str(out), "--json", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    split = "test" if name in ("image-folder", "csv-forecast") else "valid"
    assert metrics[f"{split}_loss"] == pytest.approx(summary[f"{split}_loss"], abs=1e-6)
    config = formerkit.load(out / "model").config
    extra_saved = formerkit.load_extra(out / "model")
    if name == "image-folder":
        # The data set the classes and channels; the tokenizer makes 8x8 = 64 tokens of the 32x32 images.
        assert (config.head.num_classes, config.stem.in_channels, config.stem.image_size) == (3, 3, (32, 32))
        assert config.num_positions == 64
        assert extra_saved["preprocessing"]["classes"] == classes
        assert metrics["test_accuracy"] == summary["test_accuracy"]
    elif name == "csv-forecast":
        assert extra_saved["preprocessing"]["columns"] == ["load", "temperature"]
        assert (config.stem.input_dim, config.head.output_dim, config.max_seq_len) == (2, 8 * 2, 32)
    else:
        assert config.max_seq_len == 32


@pytest.mark.parametrize(("name", "placeholder", "what"), [
    ("text-folder", "my-texts", "text file or folder of text files"), ("jsonl-lm", "my-data.jsonl", "JSON-lines file"),
    ("jsonl-classify", "my-data.jsonl", "JSON-lines file"),
    ("image-folder", "my-images", "folder of class folders"), ("csv-forecast", "my-series.csv", "CSV file")])
def test_an_own_data_recipe_trained_before_data_path_is_set_says_which_key_to_set(name, placeholder, what, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where no file has the placeholder's name
    assert load_recipe(name).data.path == placeholder
    assert main(["train", name, "--out", str(tmp_path / "run")]) == 2
    source = load_recipe(name).data.source
    assert (f"data.path '{placeholder}' does not exist (data.source='{source}'); set data.path to your {what}, in the "
            f"recipe or with --set data.path=...") in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
