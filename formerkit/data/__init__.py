"""Data sources that never download: the standard library's source, scikit-learn's digits, synthetic tasks, and the
user's own files. ``build_data(config)`` turns a recipe's data section into a DataBundle."""

from __future__ import annotations

from formerkit.data import files
from formerkit.data.base import ArraySplit, DataBundle, DataError, TokenSplit, step_generator
from formerkit.data.images import digits_bundle
from formerkit.data.synthetic import synthetic_bundle
from formerkit.data.text import stdlib_bundle
from formerkit.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, save_tokenizer

__all__ = [
    "ArraySplit",
    "ByteTokenizer",
    "DataBundle",
    "DataError",
    "TokenSplit",
    "Tokenizer",
    "build_data",
    "load_tokenizer",
    "save_tokenizer",
    "step_generator",
]

# Synthetic data is generated from this fixed seed, whatever the run's seed: the task's test set never changes.
SYNTHETIC_DATA_SEED = 1234


def build_data(config, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Loads the data a recipe's ``data`` section describes. Raises DataError before any training on bad input.
    ``tokenizer`` (text sources: the starting model's, ``model.from``) replaces the one data.tokenizer would build."""
    source = config.source
    if tokenizer is not None and source not in ("stdlib", "text", "jsonl", "instruct"):
        raise DataError(f"data.source {source!r} takes no tokenizer")
    if source == "stdlib":
        return stdlib_bundle(config, tokenizer)
    if source == "digits":
        return digits_bundle(config)
    if source == "instruct":
        from formerkit.data.instruct import instruct_bundle

        return instruct_bundle(config, tokenizer)
    if source == "synthetic":
        return synthetic_bundle(config, SYNTHETIC_DATA_SEED)
    return files.build(config, tokenizer)
