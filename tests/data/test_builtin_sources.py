"""The sources that never download (the standard library's source, scikit-learn's digits, synthetic tasks) and how
batches are drawn from splits. Expected values are recomputed here by hand from the raw data."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from formerkit.data import ArraySplit, DataError, TokenSplit, build_data
from formerkit.data.images import augment_images
from formerkit.data.synthetic import BOS, EOS, PAD, SPECIAL
from formerkit.data.text import stdlib_files
from formerkit.errors import ConfigError
from formerkit.train.config import DataConfig

# ----- stdlib -----


def test_stdlib_files_are_sorted_python_files_without_test_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files and files == sorted(files)
    for path in files:
        assert path.suffix == ".py"
        folders = path.relative_to(root).parts[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(folders), path


def test_stdlib_bundle_byte_tokens_are_the_raw_file_bytes_split_every_kth_file():
    config = DataConfig(source="stdlib", max_bytes=150_000, seq_len=64, valid_fraction=0.25)
    first, second = build_data(config), build_data(config)
    # By hand: whole files in sorted order until max_bytes is reached, blank files dropped, every 4th to validation.
    documents, total = [], 0
    for path in stdlib_files():
        documents.append(path.read_bytes())
        total += len(documents[-1])
        if total >= config.max_bytes:
            break
    documents = [doc for doc in documents if doc.strip()]
    train = b"\n\n".join(doc for i, doc in enumerate(documents) if i % 4 != 3)
    valid = b"\n\n".join(doc for i, doc in enumerate(documents) if i % 4 == 3)
    assert bytes(first.train.tokens.tolist()) == train
    assert bytes(first.valid.tokens.tolist()) == valid
    assert first.model_fields == {"vocab_size": 256, "max_seq_len": 64}
    # Deterministic: the same split twice.
    assert torch.equal(first.train.tokens, second.train.tokens)
    assert torch.equal(first.valid.tokens, second.valid.tokens)


# ----- digits -----


@pytest.fixture(scope="module")
def digits_raw() -> torch.Tensor:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return torch.tensor(sklearn_datasets.load_digits().images, dtype=torch.float64).unsqueeze(1)


def unnormalize(inputs: torch.Tensor, preprocessing) -> torch.Tensor:
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float64).view(1, -1, 1, 1)
    return inputs.double() * std + mean


def test_digits_is_a_stratified_1347_450_split_with_every_class_on_both_sides(digits_raw):
    bundle = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False))
    train_labels, test_labels = bundle.train.tensors["labels"], bundle.test.tensors["labels"]
    assert (len(bundle.train), len(bundle.test)) == (1347, 450)
    assert bundle.valid is None
    all_labels = torch.cat([train_labels, test_labels])
    for label in range(10):
        total = int((all_labels == label).sum())
        in_test = int((test_labels == label).sum())
        assert in_test > 0 and (train_labels == label).sum() > 0
        assert abs(in_test - 0.25 * total) <= 1  # stratified: each class is split 75/25
    assert bundle.model_fields == {"image_size": [8, 8], "in_channels": 1, "num_classes": 10}


def test_digits_normalization_comes_from_the_training_split_only(digits_raw):
    bundle = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False))
    train, test = bundle.train.tensors["inputs"].double(), bundle.test.tensors["inputs"].double()
    # The training split is exactly standardized; the test split only approximately (it used the train statistics).
    assert train.mean().abs() < 1e-5 and (train.std() - 1).abs() < 1e-4
    assert test.mean().abs() > 1e-4
    # Undoing the recorded statistics gives back the raw 0..16 pixel values / 16 of every digit, each exactly once.
    recovered = unnormalize(torch.cat([train, test]), bundle.preprocessing) * 16
    assert torch.allclose(recovered, recovered.round(), atol=1e-3)
    as_rows = lambda images: sorted(map(tuple, images.flatten(1).round().long().tolist()))  # noqa: E731
    assert as_rows(recovered) == as_rows(digits_raw)


def test_digits_valid_fraction_holds_out_a_stratified_validation_split():
    bundle = build_data(DataConfig(source="digits", valid_fraction=0.1, augment=False))
    assert len(bundle.train) + len(bundle.valid) == 1347
    assert set(bundle.valid.tensors["labels"].tolist()) == set(range(10))


def test_digits_labels_per_class_keeps_the_first_images_of_each_class_and_the_whole_test_split(digits_raw):
    full = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False))
    few = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False, labels_per_class=5))
    full_labels, full_raw = full.train.tensors["labels"], unnormalize(full.train.tensors["inputs"], full.preprocessing)
    few_raw = unnormalize(few.train.tensors["inputs"], few.preprocessing)
    assert len(few.train) == 50 and few.train.tensors["labels"].bincount().tolist() == [5] * 10
    # The kept images are, in order, the first five of each class in the full training split.
    expected = torch.cat([full_raw[(full_labels == c).nonzero().flatten()[:5]] for c in range(10)])
    order = few.train.tensors["labels"].argsort(stable=True)
    assert torch.allclose(few_raw[order], expected, atol=1e-5)
    assert torch.allclose(unnormalize(few.test.tensors["inputs"], few.preprocessing),
                          unnormalize(full.test.tensors["inputs"], full.preprocessing), atol=1e-5)
    assert torch.equal(few.test.tensors["labels"], full.test.tensors["labels"])
    # Normalization comes from the images trained on.
    assert few.train.tensors["inputs"].double().mean().abs() < 1e-5


def test_digits_labels_per_class_refuses_more_than_a_class_has_and_other_sources():
    with pytest.raises(DataError, match="labels_per_class.*has only"):
        build_data(DataConfig(source="digits", labels_per_class=1000))
    with pytest.raises(ConfigError, match="labels_per_class"):
        DataConfig(source="digits", labels_per_class=0)
    with pytest.raises(ConfigError, match="labels_per_class"):
        DataConfig(source="stdlib", labels_per_class=5)


def test_digits_image_size_upsamples_bilinearly():
    native = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False))
    larger = build_data(DataConfig(source="digits", valid_fraction=0.0, augment=False, image_size=16))
    assert larger.train.tensors["inputs"].shape[1:] == (1, 16, 16)
    assert larger.model_fields["image_size"] == [16, 16]
    assert torch.equal(native.train.tensors["labels"], larger.train.tensors["labels"])
    by_hand = F.interpolate(unnormalize(native.train.tensors["inputs"], native.preprocessing), size=(16, 16),
                            mode="bilinear", align_corners=False)
    assert torch.allclose(unnormalize(larger.train.tensors["inputs"], larger.preprocessing), by_hand, atol=1e-5)


def test_augmentation_is_a_deterministic_function_of_the_generator_and_keeps_shapes():
    bundle = build_data(DataConfig(source="digits", valid_fraction=0.0))
    assert bundle.augment is not None
    batch = bundle.train.take(torch.arange(16))
    first = bundle.augment(batch, torch.Generator().manual_seed(7))
    again = augment_images(batch, torch.Generator().manual_seed(7))
    other = augment_images(batch, torch.Generator().manual_seed(8))
    assert first["inputs"].shape == batch["inputs"].shape
    assert torch.equal(first["inputs"], again["inputs"])
    assert not torch.equal(first["inputs"], other["inputs"])
    assert not torch.equal(first["inputs"], batch["inputs"])
    assert torch.equal(first["labels"], batch["labels"])
    assert build_data(DataConfig(source="digits", augment=False)).augment is None


# ----- synthetic -----


TASKS = {"copy": list, "reverse": lambda symbols: symbols[::-1], "sort": sorted}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_targets_are_the_task_applied_to_each_source_row(task):
    config = DataConfig(source="synthetic", task=task, seq_len=9, min_len=3, num_symbols=6, num_examples=300)
    bundle = build_data(config)
    assert bundle.model_fields == {"vocab_size": SPECIAL + 6, "max_seq_len": 10}
    for split in (bundle.train, bundle.valid, bundle.test):
        source, decoder_input, target = (split.tensors[k].tolist() for k in ("source", "decoder_input", "target"))
        for source_row, decoder_row, target_row in zip(source, decoder_input, target):
            assert len(source_row) == len(target_row) == len(decoder_row) == 10
            length = next(i for i, token in enumerate(source_row + [PAD]) if token == PAD)
            symbols = source_row[:length]
            assert 3 <= length <= 9 and all(SPECIAL <= s < SPECIAL + 6 for s in symbols)
            assert source_row[length:] == [PAD] * (10 - length)
            # target = task(symbols), EOS, padding; the decoder reads BOS then the target shifted right.
            assert target_row == TASKS[task](symbols) + [EOS] + [PAD] * (9 - length)
            assert decoder_row == [BOS] + target_row[:-1]


def test_synthetic_data_is_the_same_every_time_and_splits_differ():
    config = DataConfig(source="synthetic", seq_len=8, num_examples=100)
    first, second = build_data(config), build_data(config)
    for split in ("train", "valid", "test"):
        for key in ("source", "target"):
            assert torch.equal(getattr(first, split).tensors[key], getattr(second, split).tensors[key])
    assert not torch.equal(first.valid.tensors["source"], first.test.tensors["source"])


# ----- drawing batches -----


def test_array_split_covers_every_example_once_per_epoch():
    split = ArraySplit({"inputs": torch.arange(12) * 10, "labels": torch.arange(12)})
    for epoch in range(3):
        seen = torch.cat([split.sample_indices(4, seed=5, step=epoch * 3 + s) for s in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
    epochs = [torch.cat([split.sample_indices(4, 5, e * 3 + s) for s in range(3)]) for e in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch


def test_array_split_batches_are_a_pure_function_of_seed_and_step():
    split = ArraySplit({"inputs": torch.arange(50)})
    later_first = split.sample_indices(8, seed=3, step=17)
    for step in range(17):  # drawing other steps in between changes nothing
        split.sample_indices(8, seed=3, step=step)
    assert torch.equal(split.sample_indices(8, seed=3, step=17), later_first)
    assert not torch.equal(split.sample_indices(8, seed=4, step=17), later_first)
    batch = split.take(later_first)
    assert torch.equal(batch["inputs"], later_first)


def test_array_split_smaller_than_a_batch_wraps_around():
    split = ArraySplit({"inputs": torch.arange(3)})
    indices = split.sample_indices(8, seed=0, step=0)
    assert len(indices) == 8 and set(indices.tolist()) == {0, 1, 2}


def test_token_split_windows_are_slices_of_the_stream():
    tokens = (torch.arange(100) * 7) % 31
    split = TokenSplit(tokens, seq_len=10)
    assert len(split) == 90
    starts = split.sample_indices(16, seed=1, step=4)
    assert torch.equal(starts, split.sample_indices(16, seed=1, step=4))
    assert starts.min() >= 0 and starts.max() < 90
    windows = split.take(starts)["tokens"]
    for start, window in zip(starts.tolist(), windows):
        assert window.tolist() == tokens[start:start + 11].tolist()
    evaluated = torch.cat([batch["tokens"] for batch in split.eval_batches(batch_size=3)])
    assert evaluated.tolist() == [tokens[s:s + 11].tolist() for s in range(0, 90, 10)]
