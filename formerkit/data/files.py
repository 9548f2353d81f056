"""The user's own files: text (a file or a folder), JSON lines, image folders and CSV time series.

``build(config)`` reads ``config.path`` for ``config.source`` in ``text``, ``jsonl``, ``image_folder`` and ``csv``, and
raises DataError, naming the file (and the line, row or column), before any training when the input is unusable.

How each source splits its data (deterministically, so a run and its resumption see the same splits):

- ``text``: a folder's .txt/.md/.py/.rst files (recursively, sorted, hidden folders skipped) are the documents and
  every k-th file (k = round(1 / data.valid_fraction)) is held out for validation, as for the stdlib corpus. A single
  file (or a folder holding only one) is cut into about ``max(100, 2k)`` chunks of similar size,
  at paragraph ends (blank lines) when the file has that many paragraphs and at line ends otherwise, and every k-th
  chunk is held out: the validation text is a set of contiguous passages spread over the whole file.
- ``jsonl``: each line's ``data.text_field`` is a document; every k-th document is held out for validation. With
  ``data.label_field`` (text classification) a stratified **test** split, as for image folders.
- ``image_folder``: a stratified **test** split of data.valid_fraction of each class's images (20% when
  data.valid_fraction is 0), evenly spaced over the class's sorted file names; there is no separate validation split.
- ``csv``: a chronological **test** split: the last data.valid_fraction of the time steps (20% when it is 0).

image_folder and csv have no validation split, so their recipes set ``eval.split: test`` for periodic evaluation.

The demo series: data.path ``"demo:series"`` (``DEMO_SERIES``) with data.source ``csv`` builds the series of
``demo_series_csv()`` in memory, through the same CSV parser as a file. It is an explicit value rather than a file
name that appears when missing, so a mistyped path to a real file is always an error, never silently synthetic data.
``write_demo_series_csv(path)`` writes the same CSV to a file to look at or edit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from datetime import datetime, timedelta
from pathlib import Path

import torch

from formerkit.data.base import ArraySplit, DataBundle, DataError
from formerkit.data.images import image_bundle
from formerkit.data.text import build_text_bundle, encode_padded, make_tokenizer

__all__ = ["DEMO_SERIES", "IMAGE_SUFFIXES", "TEXT_SUFFIXES", "build", "demo_series_csv", "existing_path",
           "image_to_tensor", "jsonl_records",
           "read_image", "write_demo_series_csv"]

# The file types a text folder contributes (anything else in the folder is ignored).
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# data.path for the csv source that means "the synthetic demo series", generated in memory (see demo_series_csv).
DEMO_SERIES = "demo:series"
# The held-out fraction image_folder and csv use when data.valid_fraction is 0: they always need a test split.
DEFAULT_TEST_FRACTION = 0.2


def build(config, tokenizer=None) -> DataBundle:
    """The DataBundle for one of the user-file sources (``config`` is a DataConfig)."""
    builders = {"text": text_bundle, "jsonl": jsonl_bundle, "image_folder": image_folder_bundle, "csv": csv_bundle}
    if config.source not in builders:
        raise DataError(f"data.source {config.source!r} is not a known data source")
    if tokenizer is not None:  # (build_data allows one for the text sources only)
        return builders[config.source](config, tokenizer)
    return builders[config.source](config)


# What data.path names for each source, for the message when it does not exist.
_WHAT_PATH = {"text": "text file or folder of text files", "jsonl": "JSON-lines file",
              "image_folder": "folder of class folders", "csv": "CSV file"}


def existing_path(config) -> Path:
    if not config.path:
        raise DataError(f"data.path is required for data.source={config.source!r}")
    path = Path(config.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {str(path)!r} does not exist (data.source={config.source!r}); set data.path to "
                        f"your {_WHAT_PATH[config.source]}, in the recipe or with --set data.path=...")
    return path


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# --- text


def text_bundle(config, tokenizer=None) -> DataBundle:
    path = existing_path(config)
    if path.is_dir():
        # Hidden folders (.git, .venv, ...) are skipped: they hold tooling, not the user's corpus.
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() in TEXT_SUFFIXES and p.is_file() and not _is_hidden(p, path))
        if not files:
            raise DataError(f"data.path {str(path)!r}: no {', '.join(TEXT_SUFFIXES)} files in this folder "
                            f"(data.source='text')")
    else:
        files = [path]
    documents, total = [], 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as error:
            raise DataError(f"{file}: cannot read this file ({error})") from error
        if config.max_bytes is not None and total + len(data) > config.max_bytes:
            data = data[:config.max_bytes - total]
        documents.append(data)
        total += len(data)
        if config.max_bytes is not None and total >= config.max_bytes:
            break
    if len(documents) == 1:  # one file (or a folder holding one): chunk it so a validation split exists
        documents = split_single_text(documents[0], config.valid_fraction)
    return build_text_bundle(documents, config, source=f"text {path}", tokenizer=tokenizer)


def split_single_text(data: bytes, valid_fraction: float) -> list[bytes]:
    """Cuts one file into about ``max(100, 2k)`` chunks (k = round(1 / valid_fraction)) of similar size: at paragraph
    ends when there are enough paragraphs, else at line ends. Every k-th chunk then goes to validation."""
    if valid_fraction <= 0:
        return [data]
    pieces = max(100, 2 * round(1 / valid_fraction))
    paragraphs = re.split(rb"\n[ \t\r]*\n", data)
    units, separator = (paragraphs, b"\n\n") if len(paragraphs) >= pieces else (data.split(b"\n"), b"\n")
    target = len(data) / pieces
    chunks, current, size = [], [], 0
    for unit in units:
        current.append(unit)
        size += len(unit) + len(separator)
        if size >= target:
            chunks.append(separator.join(current))
            current, size = [], 0
    if current:
        chunks.append(separator.join(current))
    return chunks


# --- jsonl


def jsonl_records(path: Path):
    """(line number, object) of each non-blank line of a JSON-lines file; DataError naming the line otherwise."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataError(f"{path}, line {number}: not a JSON object ({error})") from error
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _field(path: Path, number: int, record: dict, field: str, key: str, types: tuple[type, ...], expected: str):
    """``record[field]``; DataError naming the file, line, field and recipe key when it is missing or not of
    ``types``."""
    if field not in record:
        raise DataError(f"{path}, line {number}: no field {field!r} ({key}); the object has {sorted(record)[:10]}")
    value = record[field]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{path}, line {number}: field {field!r} ({key}) holds {type(value).__name__}, "
                        f"expected {expected}")
    return value


def jsonl_bundle(config, tokenizer=None) -> DataBundle:
    path = existing_path(config)
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r}: expected a JSON-lines file, found a folder (data.source='jsonl')")
    if config.label_field is not None:
        return jsonl_classification_bundle(path, config)
    documents, total = [], 0
    for number, record in jsonl_records(path):
        document = _field(path, number, record, config.text_field, "data.text_field", (str,), "a string")
        documents.append(document.encode("utf-8"))
        total += len(documents[-1])
        if config.max_bytes is not None and total >= config.max_bytes:
            break
    return build_text_bundle(documents, config, source=f"jsonl {path}", tokenizer=tokenizer)


def jsonl_classification_bundle(path: Path, config) -> DataBundle:
    """Each line's data.text_field is a text, its data.label_field the class (strings, or integers; the classes are
    the distinct values in sorted order). A stratified data.valid_fraction of each class (20% when it is 0) is the
    test split (``stratified_test_mask``). Texts are tokenized, cut to data.seq_len tokens and padded with id 0; the
    ``attention_mask`` is False at padding."""
    texts, values, total = [], [], 0
    for number, record in jsonl_records(path):
        text = _field(path, number, record, config.text_field, "data.text_field", (str,), "a string")
        label = _field(path, number, record, config.label_field, "data.label_field", (str, int),
                       "a string or an integer (the class)")
        if not text.strip():
            raise DataError(f"{path}, line {number}: field {config.text_field!r} (data.text_field) is blank")
        if values and isinstance(label, str) != isinstance(values[0], str):
            raise DataError(f"{path}, line {number}: field {config.label_field!r} (data.label_field) holds "
                            f"{label!r}, but earlier lines hold {type(values[0]).__name__}s; use one type")
        texts.append(text)
        values.append(label)
        total += len(text.encode("utf-8"))
        if config.max_bytes is not None and total >= config.max_bytes:
            break
    if not texts:
        raise DataError(f"{path}: no records (expected one JSON object a line)")
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise DataError(f"{path}: every record has the class {distinct[0]!r} (data.label_field "
                        f"{config.label_field!r}); a classifier needs at least two classes")
    labels = torch.tensor([distinct.index(value) for value in values], dtype=torch.long)
    test_mask = stratified_test_mask(labels, config.valid_fraction or DEFAULT_TEST_FRACTION)
    if not test_mask.any():
        raise DataError(f"{path}: too few records for a test split (every class has one record)")
    train_texts = [text for text, held in zip(texts, test_mask.tolist()) if not held]
    tokenizer = make_tokenizer(config, [text.encode("utf-8") for text in train_texts])
    ids, mask = encode_padded(tokenizer, texts, config.seq_len)
    classes = [str(value) for value in distinct]

    def split(chosen: torch.Tensor) -> ArraySplit:
        return ArraySplit({"inputs": ids[chosen], "attention_mask": mask[chosen], "labels": labels[chosen]})

    cut = int((mask.sum(dim=1) == config.seq_len).sum())
    return DataBundle(
        train=split(~test_mask), valid=None, test=split(test_mask),
        model_fields={"vocab_size": tokenizer.vocab_size, "max_seq_len": config.seq_len, "num_classes": len(classes)},
        preprocessing={"kind": "text", "tokenizer": tokenizer.describe(), "seq_len": config.seq_len,
                       "classes": classes},
        tokenizer=tokenizer, unit="examples",
        description=f"jsonl {path}: {len(train_texts)} training and {int(test_mask.sum())} test texts, "
                    f"{len(classes)} classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); "
                    f"{cut} texts fill data.seq_len={config.seq_len} tokens (longer ones are cut)",
    )


# --- images

_GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


def read_image(image, size: tuple[int, int], *, gray: bool = False):
    """(``image`` as image folders are read for training, whether it was grayscale): a PIL image made grayscale (mode
    L) when it is grayscale or ``gray`` asks for it, RGB otherwise (alpha dropped), resized to ``size`` (height,
    width) with Pillow's bilinear filter."""
    from PIL import Image

    is_gray = image.mode in _GRAYSCALE_MODES
    image = image.convert("L" if is_gray or gray else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return image, is_gray


def image_folder_bundle(config) -> DataBundle:
    """data.path/<class name>/<images>: classes in folder-name order, images resized to data.image_size (bilinear).

    Images become grayscale (1 channel) when every image is grayscale, RGB (3 channels) otherwise; alpha is dropped.
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError("data.source 'image_folder' needs Pillow: pip install 'formerkit[train]'") from error
    path = existing_path(config)
    if config.image_size is None:
        raise DataError("data.image_size: expected an integer (the side images are resized to) for "
                        "data.source='image_folder', got None")
    if not path.is_dir():
        raise DataError(f"data.path {str(path)!r}: expected a folder of class folders (data.source='image_folder')")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data.path {str(path)!r}: no class folders; expected {path}/<class name>/<images>")
    size = config.image_size
    images, labels, gray, skipped = [], [], True, []
    for label, folder in enumerate(class_dirs):
        found = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_hidden(p, folder))
        files = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += [p.relative_to(path) for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{folder}: class folder {folder.name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    image, is_gray = read_image(image, (size, size))
            except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
                raise DataError(f"{file}: cannot read this image ({type(error).__name__}: {error})") from error
            gray = gray and is_gray
            images.append(image)
            labels.append(label)
    channels = 1 if gray else 3
    pixels = torch.stack([image_to_tensor(image if gray else image.convert("RGB"), channels) for image in images])
    labels_t = torch.tensor(labels, dtype=torch.long)
    fraction = config.valid_fraction or DEFAULT_TEST_FRACTION
    test_mask = stratified_test_mask(labels_t, fraction)
    if not test_mask.any():
        raise DataError(f"data.path {str(path)!r}: too few images for a test split (every class has one image)")
    bundle = image_bundle(pixels[~test_mask], labels_t[~test_mask], pixels[test_mask], labels_t[test_mask], config,
                          scale=1 / 255, classes=[d.name for d in class_dirs], source=f"image folder {path}")
    if skipped:
        bundle.description += f"; {skipped_note(skipped, IMAGE_SUFFIXES)}"
    return bundle


def skipped_note(skipped: list[Path], suffixes: tuple[str, ...], shown: int = 3) -> str:
    """'skipped 5 files that are not images (.png, ...): a/x.txt, b/y.csv, b/z.json and 2 more'."""
    names = ", ".join(str(name) for name in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    kind = "file that is" if len(skipped) == 1 else "files that are"
    return f"skipped {len(skipped)} {kind} not images ({', '.join(suffixes)}): {names}{more}"


def image_to_tensor(image, channels: int) -> torch.Tensor:
    """A PIL image (mode L or RGB) as a uint8 tensor [C, H, W]."""
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, channels).permute(2, 0, 1).contiguous()


def stratified_test_mask(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for test examples: ``round(fraction * n)`` of each class's n examples (at least one when n >= 2), evenly
    spaced over the class in order. Deterministic, and every class with two or more examples is in both splits."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = len(members)
        if count < 2:
            continue
        chosen = min(max(1, round(fraction * count)), count - 1)
        positions = [int((i + 0.5) * count / chosen) for i in range(chosen)]
        mask[members[positions]] = True
    return mask


# --- csv


def csv_bundle(config) -> DataBundle:
    """A numeric time series, one row per time step: windows of data.window steps predict the next data.horizon.

    The last data.valid_fraction of the steps (20% when it is 0) is the test part, the rest the training part. A
    training window lies entirely in the training part. A test window's *targets* lie entirely in the test part; its
    inputs may reach back into the training part (those steps are history the forecaster is allowed to see), so the
    first test window predicts the test part's first steps. Every column is normalized with the training part's mean
    and standard deviation (1 for a constant column). data.path ``"demo:series"`` is the synthetic demo series.
    """
    if config.path == DEMO_SERIES:
        name, text = DEMO_SERIES, demo_series_csv()
    else:
        path = existing_path(config)
        if not path.is_file():
            raise DataError(f"data.path {str(path)!r}: expected a CSV file, found a folder (data.source='csv')")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: cannot read this file as UTF-8 text ({error})") from error
        name = str(path)
    columns, values = read_numeric_csv(text, config.columns, name=name)
    return series_bundle(values, columns, config, name=name)


def read_numeric_csv(text: str, columns: tuple[str, ...] | None, *, name: str) -> tuple[list[str], torch.Tensor]:
    """The chosen columns of a CSV with a header row, as a float64 tensor [steps, columns].

    Without ``columns``, every column whose first data row holds a number is chosen (a time stamp column is skipped).
    """
    reader = csv.reader(io.StringIO(text))
    header = next((row for row in reader if row), None)
    if header is None:
        raise DataError(f"{name}: the file is empty (expected a header row and numeric rows)")
    header = [cell.strip() for cell in header]
    rows = []
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{name}, row {reader.line_num}: {len(row)} fields, the header has {len(header)}")
        rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"{name}: no data rows after the header")
    if columns is not None:
        if not columns:
            raise DataError("data.columns: expected at least one column name, or null for every numeric column")
        for column in columns:
            if column not in header:
                raise DataError(f"{name}: no column {column!r} (data.columns); the header has {header}")
            if header.count(column) > 1:
                raise DataError(f"{name}: column {column!r} (data.columns) appears {header.count(column)} times "
                                f"in the header")
        chosen = list(columns)
    else:
        chosen = [column for column, cell in zip(header, rows[0][1]) if _number(cell) is not None]
        if not chosen:
            raise DataError(f"{name}: no numeric column (the first data row has no number); header {header}")
    indices = [header.index(column) for column in chosen]
    values = []
    for line, row in rows:
        numbers = []
        for column, index in zip(chosen, indices):
            number = _number(row[index])
            if number is None:
                raise DataError(f"{name}, row {line}, column {column!r}: {row[index]!r} is not a finite number")
            numbers.append(number)
        values.append(numbers)
    return chosen, torch.tensor(values, dtype=torch.float64)


def _number(cell: str) -> float | None:
    try:
        value = float(cell.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def series_bundle(values: torch.Tensor, columns: list[str], config, *, name: str) -> DataBundle:
    """Windows a [steps, columns] series into training and test splits (the rule is in ``csv_bundle``)."""
    window, horizon = config.window, config.horizon
    steps = len(values)
    fraction = config.valid_fraction or DEFAULT_TEST_FRACTION
    boundary = steps - round(steps * fraction)  # the first test step
    if boundary < window + horizon or steps - boundary < horizon:
        raise DataError(
            f"{name}: {steps} rows is too few for data.window={window} and data.horizon={horizon}: the training part "
            f"(first {boundary} rows) needs at least window + horizon = {window + horizon} rows and the test part "
            f"(last {steps - boundary} rows, {fraction:.0%}) at least horizon = {horizon} rows")
    train_part = values[:boundary]
    mean = train_part.mean(dim=0)
    std = train_part.std(dim=0) if boundary > 1 else torch.zeros_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    normalized = ((values - mean) / std).float()
    # windows[s] holds steps s .. s + window + horizon - 1: [count, columns, window + horizon] -> [count, W + H, C]
    windows = normalized.unfold(0, window + horizon, 1).permute(0, 2, 1)
    train_starts = torch.arange(0, boundary - window - horizon + 1)
    test_starts = torch.arange(max(boundary - window, 0), steps - window - horizon + 1)

    def split(starts: torch.Tensor) -> ArraySplit:
        chosen = windows[starts]
        return ArraySplit({"inputs": chosen[:, :window].contiguous(), "targets": chosen[:, window:].contiguous()})

    count = len(columns)
    return DataBundle(
        train=split(train_starts), valid=None, test=split(test_starts),
        model_fields={"input_dim": count, "output_dim": horizon * count, "max_seq_len": window},
        preprocessing={"kind": "series", "columns": list(columns), "mean": mean.tolist(), "std": std.tolist(),
                       "window": window, "horizon": horizon},
        unit="examples",
        description=f"csv {name}: {steps} steps of {count} columns ({', '.join(columns)}); {len(train_starts)} "
                    f"training windows (first {boundary} steps), {len(test_starts)} test windows (last "
                    f"{steps - boundary} steps); window {window}, horizon {horizon}",
    )


# --- the demo series


def demo_series_csv(steps: int = 4000, seed: int = 0) -> str:
    """A synthetic hourly series as CSV text: columns ``time`` (ISO time stamps), ``load`` and ``temperature``.

    Temperature follows a daily cycle and a slow seasonal drift; load has a daily and a weekly cycle, a linear trend
    and a response to temperature; both carry Gaussian noise. Python's ``random`` and ``math`` only, so the text is
    the same on every machine for a given (steps, seed).
    """
    rng = random.Random(seed)
    start = datetime(2024, 1, 1)
    lines = ["time,load,temperature"]
    for step in range(steps):
        day = 2 * math.pi * step / 24
        week = 2 * math.pi * step / (24 * 7)
        season = 2 * math.pi * step / (24 * 365)
        weekend = (step // 24) % 7 >= 5
        temperature = 10 - 8 * math.cos(season) - 4 * math.cos(day - math.pi / 6) + rng.gauss(0, 0.8)
        load = (50 + 0.002 * step + 12 * math.sin(day - math.pi / 2) + 3 * math.sin(2 * day) + 4 * math.sin(week)
                - 6 * weekend + 0.4 * abs(temperature - 15) + rng.gauss(0, 1.5))
        stamp = (start + timedelta(hours=step)).strftime("%Y-%m-%dT%H:%M")
        lines.append(f"{stamp},{load:.4f},{temperature:.4f}")
    return "\n".join(lines) + "\n"


def write_demo_series_csv(path: str | Path, steps: int = 4000, seed: int = 0) -> Path:
    """Writes ``demo_series_csv(steps, seed)`` to ``path`` (creating its folder) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(demo_series_csv(steps, seed))
    return path
