"""The text side of a Hugging Face checkpoint: its tokenizer and generation config, read and written.

Reading (``read_hf_tokenizer``, ``read_generation_config``): ``tokenizer.json`` (the ``tokenizers`` library's file)
with ``tokenizer_config.json`` (special tokens, ``add_bos_token``/``add_eos_token``, the chat template, also read from
``chat_template.jinja``/``chat_template.json`` and ``special_tokens_map.json`` where transformers writes them) becomes
an ``HFTokenizer`` that encodes as ``transformers.AutoTokenizer`` does; ``generation_config.json`` is kept as written.

Writing (``write_hf_tokenizer``, ``generation_config_for``): any formerkit tokenizer becomes a ``tokenizer.json`` and a
``tokenizer_config.json`` that ``AutoTokenizer`` reads with the same ids. The byte tokenizer is a byte-level BPE with
no merges whose vocabulary puts byte b at id b; the char tokenizer a BPE with no merges over its characters (ids in
formerkit's order) whose unknown token is its last id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from formerkit.data.tokenizers import (
    SPECIAL_TOKEN_NAMES,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    special_token_text,
    tokenizers_library,
)
from formerkit.errors import InteropError

__all__ = ["GENERATION_FILE", "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE", "generation_config_for", "hf_tokenizer_of",
           "read_generation_config", "read_hf_tokenizer", "write_generation_config", "write_hf_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_FILE = "generation_config.json"
# Files of tokenizers transformers builds in Python ("slow" tokenizers), which formerkit does not read.
_SLOW_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InteropError(f"{path}: cannot read it as JSON ({error})") from error


# ----- reading -----


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json with the special tokens of special_tokens_map.json and the chat template of its own
    files filled in where the config lacks them (transformers writes them to separate files)."""
    path = directory / TOKENIZER_CONFIG_FILE
    config = _read_json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(config).__name__}")
    special = directory / "special_tokens_map.json"
    if special.is_file():
        for name, value in (_read_json(special) or {}).items():
            if name in SPECIAL_TOKEN_NAMES and config.get(name) is None:
                config[name] = value
    if config.get("chat_template") is None:
        if (directory / "chat_template.jinja").is_file():
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").is_file():
            config["chat_template"] = (_read_json(directory / "chat_template.json") or {}).get("chat_template")
    return config


def _apply_config(tokenizer, config: dict[str, Any]) -> None:
    """What transformers' tokenizer does to the ``tokenizers`` object on loading, done once here: special tokens the
    config names but the vocabulary lacks are added, and an explicit ``add_bos_token``/``add_eos_token`` (or a file
    with no post-processor) replaces the post-processor by one adding exactly those tokens."""
    from tokenizers import AddedToken, processors

    missing = [text for text in (special_token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES)
               if text is not None and tokenizer.token_to_id(text) is None]
    if missing:
        tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
    if "add_bos_token" not in config and "add_eos_token" not in config and tokenizer.post_processor is not None:
        return
    single, specials = "$A:0", []
    for name, flag in (("bos_token", "add_bos_token"), ("eos_token", "add_eos_token")):
        text = special_token_text(config.get(name))
        if config.get(flag) and text is not None:
            single = f"{text}:0 {single}" if name == "bos_token" else f"{single} {text}:0"
            specials.append((text, tokenizer.token_to_id(text)))
    pair = single + " " + single.replace("$A", "$B").replace(":0", ":1")
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def read_hf_tokenizer(directory: str | Path) -> HFTokenizer | None:
    """The tokenizer of a Hugging Face checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``), or None
    when it holds no tokenizer files at all.

    A directory with only a "slow" tokenizer (a sentencepiece ``tokenizer.model``, ``vocab.txt``, ``vocab.json`` +
    ``merges.txt``) is refused with an ``InteropError`` naming what was found: formerkit reads ``tokenizer.json``, which
    transformers writes for such a tokenizer with ``AutoTokenizer.from_pretrained(dir).save_pretrained(dir)``.
    """
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        slow = [name for name in _SLOW_FILES if (directory / name).is_file()]
        if slow:
            raise InteropError(
                f"{directory}: the tokenizer is in {', '.join(slow)} (a \"slow\" tokenizer transformers builds in "
                f"Python); formerkit reads the tokenizers library's {TOKENIZER_FILE}. Write one with transformers: "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir) (it needs the sentencepiece package for a "
                f".model file), then convert again")
        return None
    tokenizers = tokenizers_library()
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises its own exception types
        raise InteropError(f"{path}: the tokenizers library cannot read it ({error})") from error
    config = _tokenizer_config(directory)
    _apply_config(tokenizer, config)
    return HFTokenizer(tokenizer, config)


def read_generation_config(directory: str | Path) -> dict[str, Any] | None:
    """generation_config.json of a checkpoint directory as written (None without one)."""
    path = Path(directory) / GENERATION_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----- writing -----


def _byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level pre-tokenizer shows each byte as, by byte value: printable Latin-1
    bytes stand for themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _byte_backend():
    tokenizers = tokenizers_library()
    from tokenizers import decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    if sorted(symbols) != sorted(pre_tokenizers.ByteLevel.alphabet()):  # the library's own table, as a check
        raise InteropError("the tokenizers library's byte-level alphabet is not GPT-2's; cannot write a byte tokenizer")
    backend = tokenizers.Tokenizer(models.BPE(vocab={symbol: byte for byte, symbol in enumerate(symbols)}, merges=[]))
    # No regex split, no prefix space: the text becomes its bytes, each one token whose id is the byte's value.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _char_backend(tokenizer: CharTokenizer):
    tokenizers = tokenizers_library()
    from tokenizers import decoders, models

    # The unknown token decodes to U+FFFD, as formerkit's does, unless that character is itself in the vocabulary.
    unknown = "\ufffd" if "\ufffd" not in tokenizer.chars else "<unk>"
    vocab = {char: index for index, char in enumerate(tokenizer.chars)}
    vocab[unknown] = tokenizer.unknown_id
    # BPE with no merges splits the text into characters and looks each up; no pre-tokenizer, so spaces and
    # newlines are characters like any other; Fuse joins the pieces back with nothing between them.
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unknown))
    backend.decoder = decoders.Fuse()
    return backend


def hf_tokenizer_of(tokenizer: Tokenizer) -> HFTokenizer:
    """A formerkit tokenizer as an ``HFTokenizer`` with the same ids (the form ``write_hf_tokenizer`` writes)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return HFTokenizer(_byte_backend())
    if isinstance(tokenizer, CharTokenizer):
        return HFTokenizer(_char_backend(tokenizer))
    raise InteropError(f"to_hf: a {tokenizer.kind!r} tokenizer has no Hugging Face form formerkit writes "
                       "(byte, char, bpe and tokenizers imported from Hugging Face do)")


def write_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, *, max_length: int | None = None) -> list[Path]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (and the chat template, inside the config) so that
    ``transformers.AutoTokenizer.from_pretrained(directory)`` encodes as ``tokenizer`` does; returns the paths."""
    directory = Path(directory)
    hf = hf_tokenizer_of(tokenizer)
    config = dict(hf.config)
    if not config:  # formerkit's own tokenizers: the generic fast tokenizer, no special tokens, no cleanup
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if max_length is not None:
            config["model_max_length"] = max_length
    paths = [directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG_FILE]
    paths[0].write_text(hf.backend.to_str(pretty=True) + "\n", encoding="utf-8")
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def generation_config_for(tokenizer: Tokenizer | None, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The generation_config.json of an exported model: the one it was imported with, else formerkit's own defaults
    (sampling at temperature 0.8, no top-k, 200 new tokens; ``formerkit generate``'s) and the tokenizer's special
    ids."""
    if stored:
        return dict(stored)
    data: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_k": 0, "max_new_tokens": 200}
    if isinstance(tokenizer, HFTokenizer):
        for name in ("bos_token", "eos_token", "pad_token"):
            if tokenizer.special_id(name) is not None:
                data[name.replace("_token", "_token_id")] = tokenizer.special_id(name)
    return data


def write_generation_config(data: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / GENERATION_FILE
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
