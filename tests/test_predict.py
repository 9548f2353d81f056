"""formerkit.load_run / formerkit predict: raw inputs preprocessed as in training give the model's own outputs on the
training data's tensors (image folders, digits arrays, prompts, CSV series), the CLI's table, JSON and forecast CSV,
and one clear message for each bad input."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from PIL import Image

import formerkit
from formerkit.cli import main
from formerkit.data import build_data
from formerkit.data.files import stratified_test_mask, write_demo_series_csv
from formerkit.errors import CheckpointError, InputError
from formerkit.runs import generate_text, load_run_model, load_run_tokenizer

pytestmark = pytest.mark.slow  # every test predicts with a run trained for it

TWO_STEPS = {"schedule.steps": 2, "eval.every": 2}  # the runs test_serve trains: one session run serves both


def assert_same_answer(answer: dict, reference: dict) -> None:
    """Equal answers up to float rounding (a batch of one and a batch of many round differently)."""
    assert answer["input"] == reference["input"] and answer["label"] == reference["label"]
    assert answer["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-6)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of noisy RGB images of varying sizes (so the resizing matters), PNG and BMP."""
    root = tmp_path_factory.mktemp("images") / "folder"
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir(parents=True)
        for index in range(5):
            size = (9 + index, 7 + 2 * index)  # height, width
            pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8)
            pixels[..., label] = 255 - index * 10  # each class leans to one channel
            Image.fromarray(pixels.numpy(), mode="RGB").save(root / name / f"{index}.{'png' if index % 2 else 'bmp'}")
    return root


@pytest.fixture(scope="module")
def folder_run(trained_run, image_folder):
    return trained_run("vit-digits", **{"data.source": "image_folder", "data.path": str(image_folder),
                                        "data.image_size": 8, "data.augment": False})


def test_image_files_give_the_models_probabilities_on_the_training_datas_tensors(folder_run, image_folder):
    model, recipe, extra = load_run_model(folder_run)
    bundle = build_data(recipe.data)
    files = sorted(image_folder.rglob("*.*"))  # class folders in name order, files sorted: the training order
    labels = torch.tensor([["cat", "dog", "owl"].index(file.parent.name) for file in files])
    test_files = [str(file) for file, held_out in zip(files, stratified_test_mask(labels, 0.2)) if held_out]
    with torch.no_grad():
        expected = model(bundle.test.tensors["inputs"]).softmax(-1)
    predictor = formerkit.load_run(folder_run)
    answers = predictor(test_files)
    assert [answer["input"] for answer in answers] == test_files and len(answers) == len(expected)
    for answer, row in zip(answers, expected):
        assert list(answer["probabilities"]) == ["cat", "dog", "owl"]
        assert list(answer["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)
        assert answer["label"] == ["cat", "dog", "owl"][int(row.argmax())]
    # One path answers alone; a folder answers for each of its images (sorted); a PIL image has no name.
    assert_same_answer(predictor(test_files[0]), answers[0])
    folder = predictor(image_folder / "dog")
    assert [answer["input"] for answer in folder] == [str(path) for path in sorted((image_folder / "dog").iterdir())]
    with Image.open(test_files[0]) as image:
        assert predictor(image)["probabilities"] == pytest.approx(answers[0]["probabilities"], abs=1e-6)


def test_digits_arrays_in_raw_units_are_scaled_and_normalized_as_in_training(trained_run):
    from sklearn.datasets import load_digits

    run = trained_run("cct-digits", **TWO_STEPS)
    predictor = formerkit.load_run(run)
    pre = predictor.preprocessing
    raw = load_digits().images[:4]  # 0-16, 8x8
    inputs = (torch.tensor(raw, dtype=torch.float32).unsqueeze(1) / 16 - pre["mean"][0]) / pre["std"][0]
    with torch.no_grad():
        expected = predictor.model(inputs).softmax(-1)
    answers = predictor(list(raw))
    for answer, row in zip(answers, expected):
        assert list(answer["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)
    assert_same_answer(predictor(raw[0]), answers[0])  # one array answers alone
    assert_same_answer(predictor(torch.tensor(raw[1])), answers[1])
    batch = predictor(torch.tensor(raw).unsqueeze(1))  # an array [N, C, H, W] answers per image
    assert len(batch) == 4
    for answer, reference in zip(batch, answers):
        assert_same_answer(answer, reference)


def test_bad_image_inputs_get_one_clear_message(folder_run, tmp_path):
    predictor = formerkit.load_run(folder_run)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"'.*missing\.png': no such file or folder; this run's inputs are image"):
        predictor(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match=r"notes\.png: not an image this run can read \(expected \.png"):
        predictor(tmp_path / "notes.png")
    with pytest.raises(InputError, match=r"empty: a folder with no images"):
        predictor(tmp_path / "empty")
    with pytest.raises(InputError, match=r"'a photo of a cat': no such file or folder; this run's inputs are image"):
        predictor("a photo of a cat")  # text to an image run
    with pytest.raises(InputError, match=r"image: the model takes 3 channel\(s\), got 1"):
        predictor(torch.zeros(8, 8))
    with pytest.raises(InputError, match=r"max_new_tokens: options of generation; this run's task is 'classify'"):
        predictor(torch.zeros(3, 8, 8), max_new_tokens=3)


def test_cli_prints_a_table_and_writes_json(folder_run, image_folder, tmp_path, capsys):
    out = tmp_path / "answers.json"
    assert main(["predict", str(folder_run), str(image_folder / "owl"), str(image_folder / "cat" / "0.bmp"),
                 "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = json.loads(out.read_text())
    expected = formerkit.load_run(folder_run)([image_folder / "owl", image_folder / "cat" / "0.bmp"])
    assert [answer["input"] for answer in answers] == [answer["input"] for answer in expected]
    for answer, reference in zip(answers, expected):
        assert_same_answer(answer, reference)
    assert lines[0].split() == ["input", "label", "probability", "next"] and len(lines) == 1 + len(answers)
    for line, answer in zip(lines[1:], answers):
        ranked = sorted(answer["probabilities"].items(), key=lambda item: -item[1])
        assert line.split() == [answer["input"], answer["label"], f"{ranked[0][1]:.1%}", ranked[1][0],
                                f"{ranked[1][1]:.1%},", ranked[2][0], f"{ranked[2][1]:.1%}"]
    assert main(["predict", str(folder_run), str(tmp_path / "nothing.png")]) == 2
    assert "nothing.png': no such file or folder" in capsys.readouterr().err
    assert main(["predict", str(folder_run), str(image_folder / "cat" / "0.bmp"), "--out", "x.csv"]) == 2
    assert "--out: writes a forecast CSV; this run's task is 'classify'" in capsys.readouterr().err


def test_prompts_generate_what_generate_text_and_model_generate_give(trained_run, capsys, tmp_path):
    run = trained_run("char-lm", **TWO_STEPS)
    model, _, _ = load_run_model(run)
    tokenizer = load_run_tokenizer(run)
    predictor = formerkit.load_run(run)
    for prompt, options in (("def ", {"temperature": 0.9, "seed": 3}), ("import os", {"temperature": 0.0})):
        text = predictor(prompt, max_new_tokens=12, **options)
        ids = tokenizer.encode(prompt)
        assert text == "".join(generate_text(model, tokenizer, ids, max_new_tokens=12, **options))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), 12, temperature=options["temperature"],
                                 seed=options.get("seed"))
        assert text == tokenizer.decode(out[0, len(ids):].tolist())
    # Beyond the context (32) generation goes on from the last half-context, as generate_text does.
    long = predictor("x", max_new_tokens=50, seed=1)
    assert long == "".join(generate_text(model, tokenizer, [ord("x")], max_new_tokens=50, temperature=0.8, seed=1))
    assert predictor(["a", "b"], max_new_tokens=5, seed=2) == [predictor(p, max_new_tokens=5, seed=2) for p in "ab"]
    # The CLI prints prompt + continuation per prompt, and the same as JSON.
    assert main(["predict", str(run), "def ", "--max-new-tokens", "12", "--temperature", "0.9", "--seed", "3",
                 "--json", str(tmp_path / "a.json")]) == 0
    expected = predictor("def ", max_new_tokens=12, temperature=0.9, seed=3)
    assert capsys.readouterr().out == "def " + expected + "\n"
    assert json.loads((tmp_path / "a.json").read_text()) == [{"input": "def ", "text": expected}]
    with pytest.raises(InputError, match=r"max_new_tokens: expected an integer >= 1, got 0"):
        predictor("def ", max_new_tokens=0)
    with pytest.raises(InputError, match=r"stop: 'ab' is 2 tokens for this tokenizer"):
        predictor("def ", stop="ab")


def test_a_forecast_equals_the_model_on_the_test_splits_first_window_in_the_series_units(trained_run, tmp_path,
                                                                                         capsys):
    run = trained_run("timeseries-forecast")
    model, recipe, extra = load_run_model(run)
    bundle = build_data(recipe.data)
    pre = extra["preprocessing"]
    window, horizon = pre["window"], pre["horizon"]
    # The demo series' first 3200 steps (its training part): the first test window is their last `window` steps.
    text = (tmp_path / "demo.csv")
    write_demo_series_csv(text)
    lines = text.read_text().splitlines()
    boundary = 4000 - round(4000 * 0.2)
    history = tmp_path / "history.csv"
    history.write_text("\n".join(lines[:1 + boundary]) + "\n")
    with torch.no_grad():
        output = model(bundle.test.tensors["inputs"][:1])
    std, mean = torch.tensor(pre["std"], dtype=torch.float64), torch.tensor(pre["mean"], dtype=torch.float64)
    expected = output.double().reshape(horizon, 2) * std + mean
    predictor = formerkit.load_run(run)
    assert predictor.columns == ["load", "temperature"]
    forecast = predictor(history)
    assert forecast.shape == (horizon, 2) and torch.allclose(forecast, expected, rtol=0, atol=1e-9)
    # The targets of that window, in the series' units, are what the forecast is after (the loss compares these).
    targets = bundle.test.tensors["targets"][0].double() * std + mean
    rows = list(csv.reader(io.StringIO("\n".join(lines[1 + boundary:1 + boundary + horizon]))))
    assert torch.allclose(targets, torch.tensor([[float(r[1]), float(r[2])] for r in rows], dtype=torch.float64),
                          atol=1e-4)
    # Recent values as an array answer the same.
    values = [[float(r[1]), float(r[2])] for r in csv.reader(io.StringIO("\n".join(lines[1 + boundary - window:
                                                                                             1 + boundary])))]
    assert torch.allclose(predictor(values), forecast, atol=1e-9)
    # The CLI: a table, the CSV with the forecast rows appended, the JSON.
    out, answers = tmp_path / "with-forecast.csv", tmp_path / "forecast.json"
    assert main(["predict", str(run), str(history), "--out", str(out), "--json", str(answers)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["step", "load", "temperature"] and printed[-1] == f"wrote {out}"
    assert printed[1].split() == ["+1", f"{forecast[0, 0]:.4f}", f"{forecast[0, 1]:.4f}"]
    written = out.read_text().splitlines()
    assert written[:1 + boundary] == lines[:1 + boundary] and len(written) == 1 + boundary + horizon
    appended = list(csv.reader(io.StringIO("\n".join(written[1 + boundary:]))))
    # The time stamps go on, one hour apart, as the demo series itself goes on.
    assert [row[0] for row in appended] == [line.split(",")[0] for line in lines[1 + boundary:1 + boundary + horizon]]
    assert torch.equal(torch.tensor([[float(row[1]), float(row[2])] for row in appended], dtype=torch.float64),
                       forecast)
    assert json.loads(answers.read_text()) == {"input": str(history), "columns": ["load", "temperature"],
                                               "forecast": forecast.tolist()}


def test_bad_forecast_inputs_get_one_clear_message(trained_run, tmp_path, capsys):
    run = trained_run("timeseries-forecast")
    predictor = formerkit.load_run(run)
    short = tmp_path / "short.csv"
    short.write_text("time,load,temperature\n" + "".join(f"t{i},{i},{i}\n" for i in range(10)))
    with pytest.raises(InputError, match=rf"{short}: the model forecasts from the last 32 steps, got 10"):
        predictor(short)
    other = tmp_path / "other.csv"
    other.write_text("time,power\n" + "".join(f"t{i},{i}\n" for i in range(40)))
    with pytest.raises(formerkit.FormerkitError, match=r"other\.csv: no column 'load' \(data.columns\)"):
        predictor(other)
    with pytest.raises(InputError, match=r"no such file or folder; this run's inputs are a CSV file"):
        predictor(tmp_path / "missing.csv")
    with pytest.raises(InputError, match=r"values: expected \[steps\]\[2\] values \(columns load, temperature\), got "
                                         r"shape \[40\]"):
        predictor(list(range(40)))
    with pytest.raises(InputError, match=r"values: values must be finite numbers"):
        predictor([[math.nan, 1.0]] * 40)
    assert main(["predict", str(run), str(short), str(short)]) == 2
    assert "INPUT: a forecaster takes one CSV file, got 2 inputs" in capsys.readouterr().err
    assert main(["predict", str(run), str(short), "--seed", "1"]) == 2
    assert "--seed: options of language models; this run forecasts" in capsys.readouterr().err


def test_runs_without_a_prediction_path_are_refused_by_name(trained_run):
    run = trained_run("seq2seq-reverse")
    with pytest.raises(CheckpointError, match=r"predict takes image and text classifiers, language models and "
                                              r"forecasters; this run trained 'seq2seq'"):
        formerkit.load_run(run)


def test_the_forecast_csv_continues_even_integer_steps_and_leaves_other_columns_empty(trained_run, tmp_path):
    run = trained_run("timeseries-forecast")
    predictor = formerkit.load_run(run)
    source = tmp_path / "series.csv"
    lines = ["step,when,note,temperature,load"] + [
        f"{10 + 5 * i},2024-03-0{1 + i % 2} 10:00,x,{math.sin(i):.3f},{50 + math.cos(i):.3f}" for i in range(40)]
    source.write_text("\n".join(lines) + "\n")
    forecast = predictor(source)
    assert main(["predict", str(run), str(source), "--out", str(tmp_path / "out.csv")]) == 0
    appended = list(csv.reader(io.StringIO((tmp_path / "out.csv").read_text())))[41:]
    assert [row[0] for row in appended] == [str(10 + 5 * (40 + k)) for k in range(8)]
    assert all(row[1] == "" and row[2] == "" for row in appended)  # time stamps that go back and forth; text
    assert [[float(row[4]), float(row[3])] for row in appended] == forecast.tolist()  # columns by name
