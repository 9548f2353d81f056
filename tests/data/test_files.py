"""The user-file sources: text files and folders, JSON lines, image folders and CSV time series.

Every input is written here into tmp_path, and every expectation is computed from what the test wrote.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from formerkit.data import DataError, build_data
from formerkit.data.files import DEMO_SERIES, demo_series_csv, write_demo_series_csv
from formerkit.data.tokenizers import BPETokenizer, CharTokenizer
from formerkit.train.config import DataConfig

Image = pytest.importorskip("PIL.Image")


def as_bytes(tokens: torch.Tensor) -> bytes:
    return bytes(tokens.tolist())


# ----- text -----


def write_text_folder(root) -> dict[str, bytes]:
    """Four documents in sorted order (one in a subfolder), plus files the source must ignore."""
    documents = {
        "a.txt": b"alpha file: the first document of the folder.\n",
        "b/c.md": b"# bravo\n\nThe second document is markdown in a subfolder.\n",
        "d.py": b"def delta():\n    return 'the third document is code'\n",
        "e.rst": b"Echo\n====\n\nThe fourth document is reStructuredText.\n",
    }
    for name, data in documents.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "ignored.json").write_text('{"not": "text"}')
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("SECRET hidden folder text")
    return documents


def test_text_folder_reads_text_files_sorted_and_holds_out_every_kth_file(tmp_path):
    documents = list(write_text_folder(tmp_path).values())
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=8, valid_fraction=0.5))
    # valid_fraction 0.5: every second file is validation; the byte tokens are the files' bytes.
    assert as_bytes(bundle.train.tokens) == documents[0] + b"\n\n" + documents[2]
    assert as_bytes(bundle.valid.tokens) == documents[1] + b"\n\n" + documents[3]
    assert bundle.test is None and bundle.unit == "tokens"
    assert bundle.model_fields == {"vocab_size": 256, "max_seq_len": 8}


def test_text_folder_skips_hidden_folders_and_other_file_types(tmp_path):
    write_text_folder(tmp_path)
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=8, valid_fraction=0.0))
    text = as_bytes(bundle.train.tokens)
    assert b"SECRET" not in text and b'"not"' not in text
    assert bundle.valid is None


def test_text_folder_max_bytes_stops_reading_early(tmp_path):
    documents = list(write_text_folder(tmp_path).values())
    limit = len(documents[0]) + 10
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=8, valid_fraction=0.0,
                                   max_bytes=limit))
    assert as_bytes(bundle.train.tokens) == documents[0] + b"\n\n" + documents[1][:10]


def test_a_single_text_file_is_cut_into_contiguous_chunks_so_a_validation_split_exists(tmp_path):
    paragraphs = [f"Paragraph {i}: " + "word " * (i % 7 + 3) for i in range(300)]
    text = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "book.txt").write_text(text)
    bundle = build_data(DataConfig(source="text", path=str(tmp_path / "book.txt"), seq_len=16, valid_fraction=0.1))
    train, valid = as_bytes(bundle.train.tokens).decode(), as_bytes(bundle.valid.tokens).decode()
    # Every paragraph lands in exactly one split, whole, and about a tenth of them in validation.
    in_train = [p for p in paragraphs if p + "\n" in train + "\n"]
    in_valid = [p for p in paragraphs if p + "\n" in valid + "\n"]
    assert sorted(in_train + in_valid) == sorted(paragraphs)
    assert 0.05 * len(paragraphs) <= len(in_valid) <= 0.15 * len(paragraphs)
    # The validation text is made of contiguous passages of the file.
    for passage in valid.split("\n\n"):
        assert passage in text


def test_a_single_file_without_blank_lines_is_cut_at_line_ends(tmp_path):
    lines = [f"line {i} of a log without paragraphs" for i in range(400)]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    bundle = build_data(DataConfig(source="text", path=str(tmp_path / "log.txt"), seq_len=16, valid_fraction=0.05))
    valid = as_bytes(bundle.valid.tokens).decode()
    valid_lines = [line for line in valid.split("\n") if line]
    assert valid_lines and set(valid_lines) <= set(lines)
    assert len(valid_lines) < 0.1 * len(lines)


def test_a_folder_holding_one_file_is_chunked_like_a_single_file(tmp_path):
    lines = [f"the only file, line {i}" for i in range(200)]
    (tmp_path / "only.txt").write_text("\n".join(lines) + "\n")
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=16, valid_fraction=0.1))
    single = build_data(DataConfig(source="text", path=str(tmp_path / "only.txt"), seq_len=16, valid_fraction=0.1))
    assert torch.equal(bundle.train.tokens, single.train.tokens) and torch.equal(bundle.valid.tokens,
                                                                                  single.valid.tokens)
    no_split = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=16, valid_fraction=0.0))
    assert no_split.valid is None
    assert as_bytes(no_split.train.tokens) == (tmp_path / "only.txt").read_bytes()


def test_text_with_char_tokenizer_covers_the_training_characters(tmp_path):
    documents = list(write_text_folder(tmp_path).values())
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=8, valid_fraction=0.5,
                                   tokenizer="char"))
    train_text = (documents[0] + b"\n\n" + documents[2]).decode()
    assert isinstance(bundle.tokenizer, CharTokenizer)
    assert bundle.model_fields["vocab_size"] == len(set(train_text)) + 1
    assert bundle.tokenizer.decode(bundle.train.tokens.tolist()) == train_text
    assert bundle.preprocessing["tokenizer"]["kind"] == "char"


def test_text_with_bpe_tokenizer_is_trained_on_the_training_split_and_decodes_back(tmp_path):
    documents = list(write_text_folder(tmp_path).values())
    bundle = build_data(DataConfig(source="text", path=str(tmp_path), seq_len=8, valid_fraction=0.5,
                                   tokenizer="bpe", vocab_size=280))
    assert isinstance(bundle.tokenizer, BPETokenizer)
    assert 256 < bundle.model_fields["vocab_size"] <= 280
    assert bundle.tokenizer.decode(bundle.train.tokens.tolist()) == (documents[0] + b"\n\n" + documents[2]).decode()
    assert bundle.tokenizer.decode(bundle.valid.tokens.tolist()) == (documents[1] + b"\n\n" + documents[3]).decode()


def test_text_missing_path_or_folder_without_text_files_is_a_data_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*data.source='text'"):
        build_data(DataConfig(source="text", path=str(missing)))
    (tmp_path / "only.json").write_text("{}")
    with pytest.raises(DataError, match="no .txt"):
        build_data(DataConfig(source="text", path=str(tmp_path)))


# ----- jsonl -----


def write_jsonl(path, records, extra_lines=()) -> None:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_documents_are_the_text_field_of_each_line(tmp_path):
    records = [{"body": f"record number {i} says hello", "id": i} for i in range(8)]
    write_jsonl(tmp_path / "data.jsonl", records, extra_lines=[""])  # blank lines are skipped
    bundle = build_data(DataConfig(source="jsonl", path=str(tmp_path / "data.jsonl"), text_field="body",
                                   seq_len=8, valid_fraction=0.25))
    texts = [r["body"].encode() for r in records]
    # valid_fraction 0.25: every fourth record is validation.
    assert as_bytes(bundle.train.tokens) == b"\n\n".join(t for i, t in enumerate(texts) if i % 4 != 3)
    assert as_bytes(bundle.valid.tokens) == b"\n\n".join(t for i, t in enumerate(texts) if i % 4 == 3)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not a JSON object"),
    ('{"other": "field"}', "no field 'text'"),
    ('{"text": 42}', r"field 'text' \(data\.text_field\) holds int, expected a string"),
    ('["a", "list"]', "expected a JSON object"),
])
def test_jsonl_bad_line_names_the_file_and_line_number(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "fine"}, {"text": "also fine"}], extra_lines=[bad_line])
    with pytest.raises(DataError, match=rf"data\.jsonl, line 3: {message}"):
        build_data(DataConfig(source="jsonl", path=str(path), seq_len=4))


def test_jsonl_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl.*data.source='jsonl'"):
        build_data(DataConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")))


# ----- image folders -----

COLORS = {"blue": (20, 40, 220), "green": (30, 200, 60), "red": (230, 30, 20)}


def write_image_folder(root, per_class: int = 10, colors=COLORS, mode: str = "RGB") -> None:
    """Solid-color images of varying sizes, one class per color, in PNG and JPEG."""
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            fill = color if mode == "RGB" else color[0]
            image = Image.new(mode, (6 + i, 10 - i % 3), fill)
            image.save(root / name / f"{i:02d}.{'png' if i % 2 else 'bmp'}")
    (root / "red" / "notes.txt").write_text("not an image: ignored")


def image_config(root, **fields) -> DataConfig:
    return DataConfig(source="image_folder", path=str(root), image_size=fields.pop("image_size", 8),
                      augment=False, **fields)


def raw_pixels(split, preprocessing) -> torch.Tensor:
    """The split's images back in [0, 1], undoing the recorded normalization."""
    mean = torch.tensor(preprocessing["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, -1, 1, 1)
    return split.tensors["inputs"] * std + mean


def test_image_folder_classes_are_sorted_folder_names_and_images_are_resized(tmp_path):
    write_image_folder(tmp_path)
    bundle = build_data(image_config(tmp_path, valid_fraction=0.2))
    names = sorted(COLORS)
    assert bundle.preprocessing["classes"] == names
    assert bundle.model_fields == {"image_size": [8, 8], "in_channels": 3, "num_classes": 3}
    assert bundle.train.tensors["inputs"].shape[1:] == (3, 8, 8)
    # A solid image stays solid: every pixel is the class's color / 255.
    for split in (bundle.train, bundle.test):
        pixels = raw_pixels(split, bundle.preprocessing)
        for image, label in zip(pixels, split.tensors["labels"]):
            expected = torch.tensor(COLORS[names[label]], dtype=torch.float32).view(3, 1, 1) / 255
            assert torch.allclose(image, expected.expand_as(image), atol=1e-4)


def test_image_folder_test_split_is_stratified_and_deterministic(tmp_path):
    write_image_folder(tmp_path, per_class=10)
    first = build_data(image_config(tmp_path, valid_fraction=0.2))
    second = build_data(image_config(tmp_path, valid_fraction=0.2))
    for label in range(3):
        assert (first.test.tensors["labels"] == label).sum() == 2  # 20% of 10
        assert (first.train.tensors["labels"] == label).sum() == 8
    assert first.valid is None
    for name in ("inputs", "labels"):
        assert torch.equal(first.train.tensors[name], second.train.tensors[name])
        assert torch.equal(first.test.tensors[name], second.test.tensors[name])
    # Normalization comes from the training split alone.
    train = first.train.tensors["inputs"]
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_image_folder_valid_fraction_zero_holds_out_twenty_percent(tmp_path):
    write_image_folder(tmp_path, per_class=10)
    bundle = build_data(image_config(tmp_path, valid_fraction=0.0))
    assert len(bundle.test) == 6 and len(bundle.train) == 24


def test_image_folder_labels_per_class_limits_training_images_and_keeps_the_test_split(tmp_path):
    # Which images are kept (the first of each class) is checked on digits, whose images differ.
    write_image_folder(tmp_path, per_class=10)
    full = build_data(image_config(tmp_path, valid_fraction=0.2))
    few = build_data(image_config(tmp_path, valid_fraction=0.2, labels_per_class=3))
    assert few.train.tensors["labels"].bincount().tolist() == [3, 3, 3]
    assert torch.equal(few.test.tensors["labels"], full.test.tensors["labels"])
    assert torch.allclose(raw_pixels(few.test, few.preprocessing), raw_pixels(full.test, full.preprocessing),
                          atol=1e-4)


def test_small_classes_still_get_a_test_image(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    bundle = build_data(image_config(tmp_path))  # 5% of 3 rounds to 0: still one per class
    assert sorted(bundle.test.tensors["labels"].tolist()) == [0, 1, 2]


def test_grayscale_folders_give_one_channel_and_mixed_folders_three(tmp_path):
    write_image_folder(tmp_path / "gray", mode="L")
    bundle = build_data(image_config(tmp_path / "gray", image_size=5))
    assert bundle.model_fields["in_channels"] == 1
    assert bundle.train.tensors["inputs"].shape[1:] == (1, 5, 5)
    write_image_folder(tmp_path / "mixed")
    Image.new("L", (7, 7), 128).save(tmp_path / "mixed" / "blue" / "gray.png")
    bundle = build_data(image_config(tmp_path / "mixed"))
    assert bundle.model_fields["in_channels"] == 3


def test_corrupt_image_is_a_data_error_naming_the_file(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot read this image"):
        build_data(image_config(tmp_path))


def test_empty_class_folder_missing_image_size_and_no_classes_are_data_errors(tmp_path):
    write_image_folder(tmp_path / "data")
    with pytest.raises(DataError, match="data.image_size"):
        build_data(DataConfig(source="image_folder", path=str(tmp_path / "data")))
    (tmp_path / "data" / "yellow").mkdir()
    with pytest.raises(DataError, match="'yellow' holds no images"):
        build_data(image_config(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_data(image_config(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"does not exist.*image_folder"):
        build_data(image_config(tmp_path / "absent"))


# ----- csv time series -----


def write_series(path, steps: int, *, extra_rows=()) -> list[tuple[int, float]]:
    """Columns: stamp (text), t (the step), wave (a deterministic function of t). Returns the (t, wave) rows."""
    rows = [(t, (t * 37 % 11) - 0.5 * (t % 3)) for t in range(steps)]
    lines = ["stamp,t,wave"] + [f"day-{t},{t},{wave}" for t, wave in rows] + list(extra_rows)
    path.write_text("\n".join(lines) + "\n")
    return rows


def csv_config(path, **fields) -> DataConfig:
    fields = {"window": 4, "horizon": 2, "valid_fraction": 0.25, **fields}
    return DataConfig(source="csv", path=str(path), **fields)


def steps_of(split, key: str, preprocessing) -> torch.Tensor:
    """The original step numbers (column t) of a split's inputs or targets, undoing the normalization."""
    column = preprocessing["columns"].index("t")
    values = split.tensors[key][..., column].double()
    return (values * preprocessing["std"][column] + preprocessing["mean"][column]).round().long()


def test_csv_windows_are_consecutive_steps_normalized_with_training_statistics(tmp_path):
    rows = write_series(tmp_path / "series.csv", steps=40)
    bundle = build_data(csv_config(tmp_path / "series.csv"))
    prep = bundle.preprocessing
    assert prep["kind"] == "series" and prep["columns"] == ["t", "wave"]  # the text column is skipped
    assert (prep["window"], prep["horizon"]) == (4, 2)
    boundary = 30  # the last 25% of 40 steps is the test part
    for column, index in (("t", 0), ("wave", 1)):
        values = [row[index] for row in rows[:boundary]]
        assert prep["mean"][prep["columns"].index(column)] == pytest.approx(statistics.mean(values))
        assert prep["std"][prep["columns"].index(column)] == pytest.approx(statistics.stdev(values))
    assert bundle.model_fields == {"input_dim": 2, "output_dim": 4, "max_seq_len": 4}
    inputs, targets = bundle.train.tensors["inputs"], bundle.train.tensors["targets"]
    assert inputs.dtype == targets.dtype == torch.float32
    assert inputs.shape[1:] == (4, 2) and targets.shape[1:] == (2, 2)
    # Each window: inputs are steps s..s+3, targets s+4..s+5; every value is the normalized CSV value.
    for split in (bundle.train, bundle.test):
        inputs_t, targets_t = steps_of(split, "inputs", prep), steps_of(split, "targets", prep)
        for start, input_steps, target_steps in zip(inputs_t[:, 0], inputs_t, targets_t):
            assert input_steps.tolist() == list(range(start, start + 4))
            assert target_steps.tolist() == list(range(start + 4, start + 6))
        wave = split.tensors["inputs"][..., 1] * prep["std"][1] + prep["mean"][1]
        expected = torch.tensor([[rows[t][1] for t in window] for window in inputs_t.tolist()])
        assert torch.allclose(wave.double(), expected.double(), atol=1e-4)


def test_csv_split_is_chronological_and_windows_do_not_cross_into_the_test_targets(tmp_path):
    write_series(tmp_path / "series.csv", steps=40)
    bundle = build_data(csv_config(tmp_path / "series.csv"))
    prep, boundary = bundle.preprocessing, 30
    train_inputs, train_targets = steps_of(bundle.train, "inputs", prep), steps_of(bundle.train, "targets", prep)
    test_inputs, test_targets = steps_of(bundle.test, "inputs", prep), steps_of(bundle.test, "targets", prep)
    # Training windows lie entirely before the boundary, and every such window is there.
    assert train_targets.max() < boundary and train_inputs.min() == 0
    assert len(bundle.train) == boundary - 4 - 2 + 1
    # Test targets lie entirely at or after the boundary (inputs may look back), covering every test step.
    assert test_targets.min() == boundary and test_targets.max() == 39
    assert test_inputs.min() == boundary - 4
    assert len(bundle.test) == (40 - boundary) - 2 + 1
    assert bundle.valid is None


def test_csv_columns_choose_and_order_the_features(tmp_path):
    rows = write_series(tmp_path / "series.csv", steps=40)
    bundle = build_data(csv_config(tmp_path / "series.csv", columns=["wave"]))
    assert bundle.preprocessing["columns"] == ["wave"]
    assert bundle.model_fields["input_dim"] == 1
    assert bundle.preprocessing["mean"][0] == pytest.approx(statistics.mean(r[1] for r in rows[:30]))


def test_csv_valid_fraction_zero_holds_out_the_last_twenty_percent(tmp_path):
    write_series(tmp_path / "series.csv", steps=50)
    bundle = build_data(csv_config(tmp_path / "series.csv", valid_fraction=0.0))
    assert steps_of(bundle.test, "targets", bundle.preprocessing).min() == 40


@pytest.mark.parametrize("extra, message", [
    ("day-x,41,oops", r"row 42, column 'wave': 'oops' is not a finite number"),
    ("day-x,41,nan", r"row 42, column 'wave': 'nan' is not a finite number"),
    ("day-x,41", r"row 42: 2 fields, the header has 3"),
])
def test_csv_bad_rows_are_data_errors_naming_file_row_and_column(tmp_path, extra, message):
    write_series(tmp_path / "series.csv", steps=40, extra_rows=[extra])
    with pytest.raises(DataError, match=r"series\.csv, " + message):
        build_data(csv_config(tmp_path / "series.csv"))


def test_csv_missing_column_and_too_few_rows_are_data_errors(tmp_path):
    write_series(tmp_path / "series.csv", steps=40)
    with pytest.raises(DataError, match=r"series\.csv: no column 'pressure' \(data.columns\)"):
        build_data(csv_config(tmp_path / "series.csv", columns=["pressure"]))
    with pytest.raises(DataError, match=r"row 2, column 'stamp': 'day-0' is not a finite number"):
        build_data(csv_config(tmp_path / "series.csv", columns=["stamp"]))
    with pytest.raises(DataError, match=r"40 rows is too few for data.window=30"):
        build_data(csv_config(tmp_path / "series.csv", window=30))
    with pytest.raises(DataError, match=r"missing\.csv.*does not exist.*data.source='csv'"):
        build_data(csv_config(tmp_path / "missing.csv"))


def test_demo_series_is_deterministic_and_builds_from_file_or_in_memory(tmp_path):
    path = write_demo_series_csv(tmp_path / "demo" / "series.csv", steps=500, seed=0)
    assert path.read_text() == demo_series_csv(500, seed=0)
    assert demo_series_csv(500, seed=1) != demo_series_csv(500, seed=0)
    header = path.read_text().splitlines()[0]
    assert header == "time,load,temperature"
    from_file = build_data(csv_config(path, window=48, horizon=12, valid_fraction=0.1))
    assert from_file.preprocessing["columns"] == ["load", "temperature"]  # the time stamps are not features
    # data.path "demo:series" builds the default demo series (4000 steps) without a file.
    write_demo_series_csv(tmp_path / "full.csv")
    in_memory = build_data(csv_config(DEMO_SERIES, window=48, horizon=12))
    written = build_data(csv_config(tmp_path / "full.csv", window=48, horizon=12))
    for split in ("train", "test"):
        for key in ("inputs", "targets"):
            assert torch.equal(getattr(in_memory, split).tensors[key], getattr(written, split).tensors[key])
