"""Tokenizers: byte-level and character-level built in; BPE trained, and any Hugging Face ``tokenizer.json`` with its
config, through the ``tokenizers`` library.

Every tokenizer saves to one JSON file (``tokenizer.json`` beside a saved model) and loads back with
``load_tokenizer``; ``describe()`` is the small JSON record kept in the model's preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formerkit.data.base import DataError

__all__ = ["SPECIAL_TOKEN_NAMES", "BPETokenizer", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "Tokenizer",
           "load_tokenizer", "register_tokenizer", "save_tokenizer", "special_token_text", "tokenizers_library"]


class Tokenizer:
    kind = "base"
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_label(self, token: int) -> str:
        """One token as a label (plots, inspection): its text, or a special token's name where decoding drops it."""
        return self.decode([token])

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


def tokenizers_library():
    """The Hugging Face ``tokenizers`` module, or a DataError saying how to install it."""
    try:
        import tokenizers
    except ImportError as error:
        raise DataError("this tokenizer needs the `tokenizers` library: pip install 'formerkit[train]'") from error
    return tokenizers


# The special tokens a Hugging Face tokenizer_config.json names, and the ones generation uses.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken record {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization_spaces``: the spaces a word-level decoder leaves before punctuation and
    English contractions removed (applied only when the tokenizer's config asks for it)."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


@register_tokenizer
class HFTokenizer(Tokenizer):
    """A tokenizer of the Hugging Face ``tokenizers`` library (any ``tokenizer.json``: BPE, WordPiece, Unigram, ...)
    with what its ``tokenizer_config.json`` adds: the special tokens, the chat template, decoding options.

    ``encode`` gives the ids ``transformers.AutoTokenizer`` gives, special tokens included (a BOS its post-processor
    adds); ``decode`` leaves the special tokens out, as text generation shows them. ``config`` is the checkpoint's
    tokenizer_config.json (with its chat template), kept whole so it is written back unchanged; the chat template is
    stored, never rendered here.
    """

    kind = "hf"

    def __init__(self, tokenizer, config: dict[str, Any] | None = None):
        self._tokenizer = tokenizer
        self.config = dict(config or {})
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer``."""
        return self._tokenizer

    @property
    def chat_template(self) -> str | dict | list | None:
        return self.config.get("chat_template")

    def special_token(self, name: str) -> str | None:
        """The text of a special token named in the config (``bos_token``, ``eos_token``, ...), or None."""
        return special_token_text(self.config.get(name))

    def special_id(self, name: str) -> int | None:
        """The id of a special token named in the config, or None (no such token, or not in the vocabulary)."""
        text = self.special_token(name)
        return None if text is None else self._tokenizer.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return _clean_up_spaces(text) if self.config.get("clean_up_tokenization_spaces") else text

    def token_label(self, token: int) -> str:
        return self._tokenizer.decode([int(token)], skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": self.kind, "tokenizer": self._tokenizer.to_str()}
        if self.config:
            data["config"] = self.config
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        hf = tokenizers_library()
        text, config = data.get("tokenizer"), data.get("config", {})
        if not isinstance(text, str):
            raise DataError(f"{cls.kind} tokenizer: expected 'tokenizer' to hold the tokenizers library's JSON string")
        if not isinstance(config, dict):
            raise DataError(f"{cls.kind} tokenizer: expected 'config' to be a mapping, got {type(config).__name__}")
        try:
            tokenizer = hf.Tokenizer.from_str(text)
        except Exception as error:  # the library raises its own exception types for malformed JSON
            raise DataError(f"{cls.kind} tokenizer: cannot rebuild it from the saved JSON ({error})") from error
        return cls(tokenizer, config)

    def describe(self) -> dict[str, Any]:
        record = super().describe()
        for name in ("bos_token", "eos_token", "pad_token"):
            if self.special_id(name) is not None:
                record[name.replace("_token", "_id")] = self.special_id(name)
        return record


@register_tokenizer
class BPETokenizer(HFTokenizer):
    """Byte-level BPE (as in GPT-2) trained with the Hugging Face ``tokenizers`` library.

    The 256 byte symbols are always in the vocabulary, so every text encodes and decodes back exactly; merges learned
    on the training texts fill the rest of ``vocab_size`` (fewer if the texts run out of pairs worth merging).
    """

    kind = "bpe"

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        hf = tokenizers_library()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = hf.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def describe(self) -> dict[str, Any]:
        return Tokenizer.describe(self)
