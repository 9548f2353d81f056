"""Tokenizers: byte, char and BPE round trips, vocabularies, and saving/loading through one JSON file."""

from __future__ import annotations

import json
import random
import sys

import pytest

from formerkit.data import DataError, load_tokenizer, save_tokenizer
from formerkit.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer

CORPUS = [
    "the cat sat on the mat.\nthe dog sat on the log.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Überall Größe, naïve café — 東京 and emoji 🙂 too.\n",
] * 4

TRICKY = ["", " ", "  two leading spaces", "tabs\tand\r\nCRLF\n\n", "\x00nul and \x7f del", "é (composed) vs e\u0301",
          "🙂🙃 emoji, 東京, עברית, ﷽", "trailing spaces   "]


def random_texts(count: int = 20, seed: int = 0) -> list[str]:
    """Texts drawn from several Unicode ranges (no surrogates: they cannot be encoded as UTF-8)."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            low, high = rng.choice(ranges)
            chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    return texts


# ----- byte -----


@pytest.mark.parametrize("text", TRICKY + random_texts())
def test_byte_tokenizer_round_trips_any_text_and_its_ids_are_the_utf8_bytes(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_saves_and_loads(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == 256


# ----- char -----


def test_char_vocabulary_is_the_sorted_training_characters_plus_one_unknown_id():
    tokenizer = CharTokenizer.train(CORPUS)
    chars = sorted(set("".join(CORPUS)))
    assert tokenizer.vocab_size == len(chars) + 1
    assert tokenizer.encode("".join(chars)) == list(range(len(chars)))
    assert tokenizer.unknown_id == len(chars)
    assert tokenizer.describe() == {"kind": "char", "vocab_size": len(chars) + 1, "unknown_id": len(chars)}


@pytest.mark.parametrize("text", CORPUS + ["", "the log sat on the cat 🙂"])
def test_char_tokenizer_round_trips_texts_made_of_training_characters(text):
    tokenizer = CharTokenizer.train(CORPUS)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_tokenizer_maps_unseen_characters_to_the_unknown_id_which_decodes_to_replacement_char():
    tokenizer = CharTokenizer.train(["abc"])
    ids = tokenizer.encode("abzc")
    assert ids == [0, 1, tokenizer.unknown_id, 2]
    assert tokenizer.decode(ids) == "ab\ufffdc"
    # An id past the vocabulary (a masked LM's [MASK], say) also shows as U+FFFD instead of failing.
    assert tokenizer.decode([tokenizer.vocab_size]) == "\ufffd"


def test_char_tokenizer_saves_and_loads_with_the_same_ids(tmp_path):
    tokenizer = CharTokenizer.train(CORPUS)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, CharTokenizer)
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in CORPUS + ["unseen ✓"]:
        assert loaded.encode(text) == tokenizer.encode(text)


# ----- bpe -----


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=300)


def test_bpe_vocabulary_holds_every_byte_plus_learned_merges(bpe):
    assert 256 < bpe.vocab_size <= 300
    assert bpe.describe() == {"kind": "bpe", "vocab_size": bpe.vocab_size}
    # The merges pay off on the training text: fewer tokens than bytes.
    text = "".join(CORPUS)
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))
    assert all(0 <= i < bpe.vocab_size for i in bpe.encode(text))


@pytest.mark.parametrize("text", CORPUS + TRICKY + random_texts(seed=1))
def test_bpe_round_trips_any_text_even_characters_never_seen_in_training(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_training_is_deterministic():
    first = BPETokenizer.train(CORPUS, vocab_size=280)
    second = BPETokenizer.train(CORPUS, vocab_size=280)
    assert first.to_dict() == second.to_dict()


def test_bpe_saves_the_libraries_json_and_loads_with_the_same_ids(bpe, tmp_path):
    data = bpe.to_dict()
    assert data["kind"] == "bpe" and isinstance(json.loads(data["tokenizer"]), dict)
    save_tokenizer(bpe, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == bpe.vocab_size
    for text in CORPUS + TRICKY:
        assert loaded.encode(text) == bpe.encode(text)
        assert loaded.decode(bpe.encode(text)) == text


def test_bpe_without_the_tokenizers_library_asks_for_the_train_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(DataError, match=r"pip install 'formerkit\[train\]'"):
        BPETokenizer.train(CORPUS, vocab_size=300)


# ----- loading bad files -----


def test_loading_an_unknown_kind_or_a_broken_file_names_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(DataError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(path)
    path.write_text(json.dumps({"kind": "bpe", "tokenizer": "{\"broken\": true}"}))
    with pytest.raises(DataError, match="bpe tokenizer"):
        load_tokenizer(path)
    path.write_text(json.dumps({"kind": "char", "chars": 5}))
    with pytest.raises(DataError, match="char tokenizer"):
        load_tokenizer(path)
