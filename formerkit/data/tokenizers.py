"""Tokenizers: byte-level and character-level built in, BPE through the ``tokenizers`` library.

Every tokenizer saves to one JSON file (``tokenizer.json`` beside a saved model) and loads back with
``load_tokenizer``; ``describe()`` is the small JSON record kept in the model's preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formerkit.data.base import DataError

__all__ = ["BPETokenizer", "ByteTokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer", "register_tokenizer",
           "save_tokenizer"]


class Tokenizer:
    kind = "base"
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are the tokens: 256 ids, nothing to train, every text representable."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


_KINDS: dict[str, type] = {"byte": ByteTokenizer}


def register_tokenizer(cls: type) -> type:
    """Class decorator: makes ``load_tokenizer`` know a tokenizer kind (its ``from_dict`` rebuilds it)."""
    _KINDS[cls.kind] = cls
    return cls


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tokenizer.to_dict()) + "\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the tokenizer ({error})") from error
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in _KINDS:
        raise DataError(f"{path}: unknown tokenizer kind {kind!r}; known: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    return cls() if kind == "byte" else cls.from_dict(data)


@register_tokenizer
class CharTokenizer(Tokenizer):
    """One id per character seen in the training texts (sorted), plus one last id for every unseen character.

    Unseen characters encode to ``unknown_id`` and decode to U+FFFD, so a round trip is exact only for texts made of
    training characters.
    """

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise DataError("CharTokenizer: the character list holds duplicates")
        self.chars = chars
        self._ids = {char: index for index, char in enumerate(chars)}
        self.unknown_id = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def train(cls, texts: list[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        ids, unknown = self._ids, self.unknown_id
        return [ids.get(char, unknown) for char in text]

    def decode(self, ids: list[int]) -> str:
        # Any id that is not a character (the unknown id, or ids past the vocabulary such as a [MASK]) shows as U+FFFD.
        chars, count = self.chars, len(self.chars)
        return "".join(chars[i] if 0 <= i < count else "\ufffd" for i in map(int, ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise DataError(f"char tokenizer: expected 'chars' to be a string, got {type(chars).__name__}")
        return cls(chars)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "unknown_id": self.unknown_id}


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise DataError("the bpe tokenizer needs the `tokenizers` library: pip install 'formerkit[train]'") from error
    return tokenizers


@register_tokenizer
class BPETokenizer(Tokenizer):
    """Byte-level BPE (as in GPT-2) trained with the Hugging Face ``tokenizers`` library.

    The 256 byte symbols are always in the vocabulary, so every text encodes and decodes back exactly; merges learned
    on the training texts fill the rest of ``vocab_size`` (fewer if the texts run out of pairs worth merging).
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        hf = _hf_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = hf.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": self._tokenizer.to_str()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        hf = _hf_tokenizers()
        text = data.get("tokenizer")
        if not isinstance(text, str):
            raise DataError("bpe tokenizer: expected 'tokenizer' to hold the tokenizers library's JSON string")
        try:
            return cls(hf.Tokenizer.from_str(text))
        except Exception as error:  # the library raises its own exception types for malformed JSON
            raise DataError(f"bpe tokenizer: cannot rebuild it from the saved JSON ({error})") from error
