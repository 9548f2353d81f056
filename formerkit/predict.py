"""Predictions from a trained run: raw inputs in, answers out, preprocessed exactly as the run's training did.

    import formerkit
    predictor = formerkit.load_run("runs/digits")       # the model, its tokenizer and its preprocessing
    predictor("seven.png")                              # {"input": "seven.png", "label": "7", "probabilities": {...}}
    predictor(["a.png", "b.png"])                       # one answer per input (a folder counts as its images)
    formerkit.load_run("runs/char-lm")("def ", max_new_tokens=40, seed=0)     # the generated continuation
    formerkit.load_run("runs/forecast")("series.csv")   # the next `horizon` steps [horizon, columns], in its units
    formerkit.load_run("runs/reviews")("great film")    # {"input": "great film", "label": ..., "probabilities": ...}

Image classifiers take image files, folders of them, PIL images and arrays ([C, H, W] or [H, W] in the data source's
raw units); text classifiers take texts (tokenized and cut or padded as in training); language models take prompts
(text); forecasters take a CSV file or the recent values ([steps, columns]).
``formerkit predict`` is the command over ``Predictor`` (``predict_command``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from formerkit.data.files import IMAGE_SUFFIXES, read_numeric_csv
from formerkit.data.text import encode_padded
from formerkit.errors import CheckpointError, InputError
from formerkit.runs import (
    check_language_model,
    denormalize_forecast,
    generate_text,
    generation_defaults,
    image_input,
    load_run_model,
    load_run_tokenizer,
    prompt_ids,
    run_objective,
    series_input,
    stop_ids,
)

__all__ = ["Predictor", "load_run", "predict_command"]

BATCH = 64  # images per forward pass


class Predictor:
    """A run's model with its tokenizer and preprocessing; call it with raw inputs (see the module's docstring).

    ``task`` is ``"classify"`` (image classifiers), ``"classify_text"`` (text classifiers), ``"generate"``
    (language models) or ``"forecast"``.
    """

    def __init__(self, target: str | Path):
        self.target = target
        self.model, self.recipe, self.extra = load_run_model(target, imported=True)
        self.preprocessing = self.extra.get("preprocessing") or {}
        kind = run_objective(self.recipe, self.extra)
        self.tokenizer = None
        if self.recipe is None and kind != "causal_lm":
            raise CheckpointError(f"{target}: predict takes converted checkpoints that are decoder language models; "
                                  "this one is not")
        if kind == "causal_lm":
            check_language_model(self.model, kind, target)
            self.task, self.tokenizer = "generate", load_run_tokenizer(target)
        elif kind == "classification" and self.preprocessing.get("kind") == "image":
            self.task = "classify"
        elif kind == "classification" and self.preprocessing.get("kind") == "text":
            self.task, self.tokenizer = "classify_text", load_run_tokenizer(target)
        elif kind == "forecast":
            self.task = "forecast"
        else:
            data = f" on {self.preprocessing.get('kind') or 'non-image'} data" if kind == "classification" else ""
            raise CheckpointError(f"{target}: predict takes image and text classifiers, language models and "
                                  f"forecasters; this run trained {kind!r}{data}")

    def __repr__(self) -> str:
        return f"Predictor({str(self.target)!r}, task={self.task!r})"

    def __call__(self, inputs, **options):
        """Answers for ``inputs``: one answer for one input, a list for a list (or for a folder of images).

        ``options`` go to ``generate`` (language models); other tasks take none.
        """
        if self.task == "generate":
            if isinstance(inputs, str):
                return self.generate(inputs, **options)
            return [self.generate(prompt, **options) for prompt in _each_text(inputs)]
        if options:
            raise InputError(f"{', '.join(options)}: options of generation; this run's task is {self.task!r}")
        if self.task == "forecast":
            return self.forecast(inputs)
        if self.task == "classify_text":
            texts = [inputs] if isinstance(inputs, str) else _each_text(inputs, "text", "a text classifier")
            answers = self.classify_text(texts)
            return answers[0] if isinstance(inputs, str) else answers
        answers = self.classify(inputs)
        return answers if _is_batch(inputs) else answers[0]

    # ----- image classifiers -----

    def image_inputs(self, inputs) -> tuple[list[str | None], Tensor]:
        """(names, the model's inputs [N, C, H, W]) of images: paths (folders give their images, sorted), PIL images,
        arrays, or a list of those. Every input is read and checked before the model runs."""
        names, tensors = [], []
        for name, image in _each_image(inputs):
            tensors.append(image_input(image, self.preprocessing, name=name or "image"))
            names.append(name)
        if not tensors:
            raise InputError("inputs: expected at least one image, got none")
        return names, torch.stack(tensors)

    def classify(self, inputs) -> list[dict[str, Any]]:
        """[{"input": the path (None for an in-memory image), "label": the most probable class, "probabilities":
        {class: probability}}] for the images of ``inputs``."""
        names, batch = self.image_inputs(inputs)
        return self._answers(names, batch)

    # ----- text classifiers -----

    def text_inputs(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(token ids [N, seq_len], attention mask [N, seq_len]) of texts, encoded with the run's tokenizer exactly
        as its training encoded the data (``formerkit.data.text.encode_padded``)."""
        if self.task != "classify_text":
            raise InputError(f"texts: this run's task is {self.task!r}, not text classification")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text: expected a non-blank text, got {text!r}")
        return encode_padded(self.tokenizer, texts, self.preprocessing["seq_len"])

    def classify_text(self, texts: list[str]) -> list[dict[str, Any]]:
        """[{"input": the text, "label": the most probable class, "probabilities": {class: probability}}]."""
        if not texts:
            raise InputError("inputs: expected at least one text, got none")
        ids, mask = self.text_inputs(texts)
        return self._answers(list(texts), ids, mask)

    def _answers(self, names: list, batch: Tensor, mask: Tensor | None = None) -> list[dict[str, Any]]:
        """The answers of a classifier for its inputs ``batch`` (and their attention mask, for texts)."""
        with torch.inference_mode():
            probabilities = torch.cat([
                self.model(batch[start:start + BATCH],
                           attention_mask=None if mask is None else mask[start:start + BATCH]).float().softmax(-1)
                for start in range(0, len(batch), BATCH)])
        classes = self.preprocessing.get("classes") or [str(index) for index in range(probabilities.shape[1])]
        return [{"input": name, "label": classes[int(row.argmax())],
                 "probabilities": {label: float(p) for label, p in zip(classes, row)}}
                for name, row in zip(names, probabilities)]

    # ----- language models -----

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                 stop: str | None = None) -> str:
        """The continuation of ``prompt`` (``formerkit.runs.generate_text`` with the run's tokenizer; settings left
        at None take the model's defaults, ``formerkit.runs.generation_defaults``)."""
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop=stop))

    def stream(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
               stop: str | None = None) -> Iterator[str]:
        """The continuation of ``prompt``, one piece per new token; it ends at ``stop`` (a text of one token) and at
        the end-of-sequence tokens of a converted checkpoint."""
        if self.task != "generate":
            raise InputError(f"prompt: this run's task is {self.task!r}, not generation")
        defaults = generation_defaults(self.extra, self.tokenizer)
        max_new_tokens = defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens
        temperature = defaults["temperature"] if temperature is None else temperature
        if top_k is None and top_p is None:
            top_k, top_p = defaults["top_k"], defaults["top_p"]
        if not isinstance(prompt, str):
            raise InputError(f"prompt: expected text, got {type(prompt).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        if temperature < 0:
            raise InputError(f"temperature: expected a number >= 0 (0 is greedy), got {temperature!r}")
        stop_tokens = list(stop_ids(self.tokenizer, stop, name="stop") or []) + list(defaults["stop_tokens"] or [])
        with torch.inference_mode():
            yield from generate_text(self.model, self.tokenizer, prompt_ids(self.tokenizer, prompt),
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, stop_tokens=stop_tokens or None)

    # ----- forecasters -----

    @property
    def columns(self) -> list[str]:
        """A forecaster's columns, in the order of its forecasts' last dimension."""
        return list(self.preprocessing["columns"])

    def series_values(self, inputs) -> Tensor:
        """The recent values of a series [steps, columns] (float64, the series' units): a CSV file's columns the run
        trained on, or an array [steps, columns] / [steps]."""
        if isinstance(inputs, (str, Path)):
            path = _existing(inputs, "a CSV file")
            if path.is_dir():
                raise InputError(f"{path}: expected a CSV file, found a folder")
            try:
                text = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as error:
                raise InputError(f"{path}: cannot read this file as UTF-8 CSV text ({error})") from None
            return read_numeric_csv(text, tuple(self.columns), name=str(path))[1]
        try:
            return torch.as_tensor(inputs, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InputError(f"values: expected a CSV file or numbers [steps][columns] ({error})") from None

    def forecast(self, inputs) -> Tensor:
        """The next ``horizon`` steps [horizon, columns] (float64, the series' units) after the last ``window``
        steps of ``inputs`` (see ``series_values``)."""
        name = str(inputs) if isinstance(inputs, (str, Path)) else "values"
        window = series_input(self.series_values(inputs), self.preprocessing, name=name)
        with torch.inference_mode():
            return denormalize_forecast(self.model(window[None]).float(), self.preprocessing)[0]


def load_run(target: str | Path) -> Predictor:
    """A run (or a model directory a run saved) ready to map raw inputs to predictions: see ``Predictor``."""
    return Predictor(target)


def _existing(path: str | Path, expected: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"INPUT {str(path)!r}: no such file or folder; this run's inputs are {expected}")
    return path


def _each_text(inputs, name: str = "prompt", model: str = "a language model") -> list[str]:
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(text, str) for text in inputs):
        raise InputError(f"{name}: {model} takes text or a list of texts, got {type(inputs).__name__}")
    return list(inputs)


def _is_batch(inputs) -> bool:
    """Whether ``inputs`` holds several images: a list, a folder, or an array [N, C, H, W]."""
    if isinstance(inputs, (str, Path)):
        return Path(inputs).is_dir()
    return isinstance(inputs, (list, tuple)) or getattr(inputs, "ndim", 0) == 4


def _each_image(inputs) -> Iterator[tuple[str | None, Any]]:
    """(name, PIL image or array) of every image in ``inputs``; paths are opened (folders give their images)."""
    for item in inputs if _is_batch(inputs) and not isinstance(inputs, (str, Path)) else [inputs]:
        if not isinstance(item, (str, Path)):
            yield None, item
            continue
        path = _existing(item, "image files or folders of them")
        files = [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise InputError(f"{path}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            yield str(file), _open_image(file)


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise InputError(f"{path}: not an image this run can read (expected {', '.join(IMAGE_SUFFIXES)}; "
                         f"{type(error).__name__}: {error})") from None


# ----- formerkit predict


def predict_command(target: str | Path, inputs: list[str], *, json_path: str | None = None,
                    out: str | None = None, **options) -> str:
    """What ``formerkit predict`` prints: a table of labels and probabilities (image classifiers), each prompt's
    continuation (language models), or the forecast (forecasters; ``out`` also writes the CSV with the forecast rows
    appended). ``json_path`` also writes the answers as JSON."""
    predictor = Predictor(target)
    if predictor.task != "forecast" and out is not None:
        raise InputError(f"--out: writes a forecast CSV; this run's task is {predictor.task!r} (use --json)")
    if predictor.task in ("classify", "classify_text"):
        if options:
            what = "images" if predictor.task == "classify" else "texts"
            raise InputError(f"{', '.join('--' + key.replace('_', '-') for key in options)}: options of language "
                             f"models; this run classifies {what}")
        answers: Any = predictor.classify(inputs) if predictor.task == "classify" else predictor.classify_text(inputs)
        text = _classification_table(answers)
    elif predictor.task == "generate":
        answers = [{"input": prompt, "text": predictor.generate(prompt, **options)} for prompt in inputs]
        text = "\n".join(answer["input"] + answer["text"] for answer in answers)
    else:
        if options:
            raise InputError(f"{', '.join('--' + key.replace('_', '-') for key in options)}: options of language "
                             "models; this run forecasts")
        if len(inputs) != 1:
            raise InputError(f"INPUT: a forecaster takes one CSV file, got {len(inputs)} inputs")
        forecast = predictor.forecast(inputs[0])
        answers = {"input": inputs[0], "columns": predictor.columns, "forecast": forecast.tolist()}
        text = _forecast_table(predictor.columns, forecast)
        if out is not None:
            _write_forecast_csv(Path(inputs[0]), Path(out), predictor.columns, forecast)
            text += f"\nwrote {out}"
    if json_path is not None:
        Path(json_path).write_text(json.dumps(answers, indent=2) + "\n")
    return text


def _classification_table(answers: list[dict]) -> str:
    rows = [("input", "label", "probability", "next")]
    for answer in answers:
        ranked = sorted(answer["probabilities"].items(), key=lambda item: -item[1])
        following = ", ".join(f"{label} {p:.1%}" for label, p in ranked[1:3])
        rows.append((answer["input"], answer["label"], f"{ranked[0][1]:.1%}", following))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows)


def _forecast_table(columns: list[str], forecast: Tensor) -> str:
    rows = [["step", *columns]] + [[f"+{step + 1}", *(f"{value:.4f}" for value in row.tolist())]
                                   for step, row in enumerate(forecast)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def _write_forecast_csv(source: Path, out: Path, columns: list[str], forecast: Tensor) -> None:
    """The input CSV with one row per forecast step appended: the forecast columns filled; a column of time stamps or
    integers that step evenly over its last rows continued; any other column empty."""
    text = source.read_text(encoding="utf-8-sig")
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    header = [cell.strip() for cell in rows[0]]
    indices = [header.index(column) for column in columns]
    others = {index: _continue_column([row[index] for row in rows[-3:]], len(forecast))
              for index in range(len(header)) if index not in indices and len(rows) >= 4}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for step, row in enumerate(forecast.tolist()):
        cells = [others[index][step] if others.get(index) else "" for index in range(len(header))]
        for index, value in zip(indices, row):
            cells[index] = repr(value)
        writer.writerow(cells)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + ("" if text.endswith("\n") else "\n") + buffer.getvalue())


def _continue_column(cells: list[str], count: int) -> list[str] | None:
    """The next ``count`` cells of a column whose last cells are evenly spaced integers or ISO time stamps (written as
    the column writes them); None for any other column."""
    cells = [cell.strip() for cell in cells]
    if all(cell.lstrip("-").isdigit() for cell in cells):
        values = [int(cell) for cell in cells]
        step = values[-1] - values[-2]
        if step > 0 and all(b - a == step for a, b in zip(values, values[1:])):
            return [str(values[-1] + step * (k + 1)) for k in range(count)]
        return None
    try:
        stamps = [datetime.fromisoformat(cell) for cell in cells]
    except ValueError:
        return None
    step = stamps[-1] - stamps[-2]
    if step <= timedelta(0) or any(b - a != step for a, b in zip(stamps, stamps[1:])):
        return None
    for write in (lambda t: t.isoformat(timespec="minutes"), lambda t: t.isoformat(sep=" ", timespec="minutes"),
                  lambda t: t.isoformat(), lambda t: t.isoformat(sep=" "), lambda t: t.date().isoformat()):
        if write(stamps[-1]) == cells[-1]:
            return [write(stamps[-1] + step * (k + 1)) for k in range(count)]
    return None
