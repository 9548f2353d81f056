"""Text corpora: the Python standard library's own source (on every machine), and the user's text files."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from formerkit.data import tokenizers
from formerkit.data.base import DataBundle, DataError, TokenSplit
from formerkit.data.packing import PackedSplit, pack_documents
from formerkit.data.tokenizers import ByteTokenizer, Tokenizer

__all__ = ["build_text_bundle", "encode_padded", "make_tokenizer", "stdlib_files"]

# Folders of the standard library that hold its test suites (excluded: they are data for CPython's tests, not
# representative code, and some are huge generated files).
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}

# data.pack: documents are packed with this fixed seed whatever the run's seed, so the rows are a property of the data;
# the run's seed chooses the order rows are drawn in.
PACKING_SEED = 0


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by path, test packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"stdlib corpus: the standard library folder {root} does not exist")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _EXCLUDED_DIRS and not d.startswith("."))
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files)


def split_documents(documents: list[bytes], valid_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """Deterministic split by document: every k-th document (k = round(1 / fraction)) goes to validation."""
    if valid_fraction <= 0 or len(documents) < 2:
        return documents, []
    every = max(2, round(1 / valid_fraction))
    held = {i for i in range(len(documents)) if i % every == every - 1} or {len(documents) - 1}
    train = [doc for i, doc in enumerate(documents) if i not in held]
    valid = [doc for i, doc in enumerate(documents) if i in held]
    return train, valid


def _encode(tokenizer: Tokenizer, documents: list[bytes]) -> torch.Tensor:
    if isinstance(tokenizer, ByteTokenizer):
        data = b"\n\n".join(documents)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    text = "\n\n".join(doc.decode("utf-8", errors="replace") for doc in documents)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _encode_each(tokenizer: Tokenizer, documents: list[bytes]) -> list[torch.Tensor]:
    """Each document's token ids on its own (no separator: packing keeps documents apart by their ids)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [torch.frombuffer(bytearray(doc), dtype=torch.uint8) for doc in documents]
    return [torch.tensor(tokenizer.encode(doc.decode("utf-8", errors="replace")), dtype=torch.long)
            for doc in documents]


def encode_padded(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, seq_len], attention_mask [N, seq_len]) of texts for a classifier: each text's first ``seq_len`` token
    ids, padded on the right with id 0; the mask is True at the text's tokens and False at padding. Training and
    ``formerkit predict`` both encode texts here."""
    ids = torch.zeros(len(texts), seq_len, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.bool)
    for row, text in enumerate(texts):
        tokens = tokenizer.encode(text)[:seq_len]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = True
    return ids, mask


def build_text_bundle(documents: list[bytes], config, *, source: str, tokenizer: Tokenizer | None = None
                      ) -> DataBundle:
    """Splits documents, fits the tokenizer on the training split, and cuts token streams into windows (or, with
    ``data.pack``, packs the documents into rows: see ``formerkit.data.packing``)."""
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"{source}: the corpus is empty (no non-blank text found)")
    train_docs, valid_docs = split_documents(documents, config.valid_fraction)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(config, train_docs)
    if config.pack:
        return _packed_bundle(tokenizer, train_docs, valid_docs, config, source)
    train = _encode(tokenizer, train_docs)
    if len(train) < config.seq_len + 1:
        raise DataError(f"{source}: the training text has {len(train)} tokens, fewer than one window of "
                        f"data.seq_len + 1 = {config.seq_len + 1}")
    valid_tokens = _encode(tokenizer, valid_docs) if valid_docs else None
    valid = TokenSplit(valid_tokens, config.seq_len) if valid_tokens is not None and len(
        valid_tokens) > config.seq_len else None
    return DataBundle(
        train=TokenSplit(train, config.seq_len), valid=valid, test=None,
        model_fields={"vocab_size": tokenizer.vocab_size, "max_seq_len": config.seq_len},
        preprocessing={"tokenizer": tokenizer.describe(), "seq_len": config.seq_len},
        tokenizer=tokenizer, unit="tokens",
        description=f"{source}: {len(train_docs)} training documents ({len(train):,} tokens), "
                    f"{len(valid_docs)} validation documents"
                    f" ({len(valid_tokens) if valid_tokens is not None else 0:,} tokens)",
    )


def _packed_bundle(tokenizer: Tokenizer, train_docs: list[bytes], valid_docs: list[bytes], config,
                   source: str) -> DataBundle:
    """data.pack: each split's documents packed into rows of seq_len + 1 tokens (the model reads the first seq_len,
    the last is only predicted, as in a TokenSplit window)."""
    row_len = config.seq_len + 1
    train_tokens = _encode_each(tokenizer, train_docs)
    if max(len(tokens) for tokens in train_tokens) < 2:
        raise DataError(f"{source}: every training document is a single token; packed rows need documents of at "
                        "least 2 tokens (one to read, one to predict)")
    train = pack_documents(train_tokens, row_len, seed=PACKING_SEED)
    valid = pack_documents(_encode_each(tokenizer, valid_docs), row_len, seed=PACKING_SEED) if valid_docs else None

    def describe(name: str, count: int, rows) -> str:
        cut = f"; {rows.split_documents} documents longer than a row cut into pieces" if rows.split_documents else ""
        return (f"{count} {name} documents ({rows.real_tokens:,} tokens) packed into {len(rows.tokens):,} rows of "
                f"{row_len} ({rows.fill:.1%} filled{cut})")

    return DataBundle(
        train=PackedSplit(train), valid=PackedSplit(valid) if valid is not None else None, test=None,
        model_fields={"vocab_size": tokenizer.vocab_size, "max_seq_len": config.seq_len},
        preprocessing={"tokenizer": tokenizer.describe(), "seq_len": config.seq_len, "packed": True},
        tokenizer=tokenizer, unit="tokens",
        description=f"{source}: {describe('training', len(train_docs), train)}"
                    + (f", {describe('validation', len(valid_docs), valid)}" if valid is not None else ""),
    )


def make_tokenizer(config, train_documents: list[bytes]) -> Tokenizer:
    if config.tokenizer == "byte":
        return ByteTokenizer()
    factory = {"char": "CharTokenizer", "bpe": "BPETokenizer"}[config.tokenizer]
    if not hasattr(tokenizers, factory):
        raise DataError(f"data.tokenizer {config.tokenizer!r} is not available in this build")
    texts = [doc.decode("utf-8", errors="replace") for doc in train_documents]
    cls = getattr(tokenizers, factory)
    return cls.train(texts, vocab_size=config.vocab_size) if config.tokenizer == "bpe" else cls.train(texts)


def stdlib_bundle(config, tokenizer: Tokenizer | None = None) -> DataBundle:
    documents, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        documents.append(data)
        total += len(data)
        if config.max_bytes is not None and total >= config.max_bytes:
            break
    return build_text_bundle(documents, config, source="stdlib corpus", tokenizer=tokenizer)
