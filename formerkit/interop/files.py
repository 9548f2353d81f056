"""The files of a Hugging Face checkpoint directory: ``config.json`` read as typed fields, the weights read from one
safetensors file or an index of shards (pickle only when trusted), and a directory written as ``transformers`` expects.

``transformers`` itself is never imported (it is a development dependency only): config.json is plain JSON, read and
written here.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from formerkit.checkpoint import replace_atomically
from formerkit.errors import InteropError

__all__ = ["CONFIG_FILE", "SAFETENSORS_FILE", "Fields", "WeightFiles", "read_hf_config", "write_hf_files"]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# A field's absence, told apart from a null value.
_MISSING = object()



class Fields:
    """A Hugging Face config.json as read: typed look-ups whose errors name the file and the field."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    @property
    def model_type(self) -> Any:
        return self.data.get("model_type")

    def fail(self, name: str, expected: str, value: Any = _MISSING, hint: str = "") -> NoReturn:
        got = "nothing (the field is missing)" if value is _MISSING else repr(value)
        raise InteropError(f"{self.source}: {name}: expected {expected}, got {got}" + (f" ({hint})" if hint else ""))

    def refuse(self, name: str, expected: str, hint: str = "") -> NoReturn:
        """Fails on the field's own value, or on its absence."""
        self.fail(name, expected, self.data.get(name, _MISSING), hint=hint)

    def value(self, name: str, default: Any = _MISSING) -> Any:
        """The raw value; ``default`` (Hugging Face's class default) when the field is absent, an error if none."""
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            self.fail(name, "a value")
        return default

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int = 1, nullable: bool = False) -> int | None:
        value = self.value(name, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(name, f"an integer >= {minimum}" + (" or null" if nullable else ""), value)
        return value

    def number(self, name: str, default: Any = _MISSING, *, nullable: bool = False) -> float | None:
        value = self.value(name, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, "a number" + (" or null" if nullable else ""), value)
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.value(name, default)
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def expect(self, name: str, wanted: Any, why: str) -> None:
        """Refuses a field whose value (absent means ``wanted``, the class default) formerkit cannot reproduce."""
        value = self.value(name, wanted)
        if type(value) is not type(wanted) or value != wanted:
            self.fail(name, repr(wanted), value, hint=why)

    def choice(self, name: str, table: dict[str, str], default: str, why: str) -> str:
        """A name looked up in ``table`` (Hugging Face's spelling -> formerkit's)."""
        value = self.value(name, default)
        if not isinstance(value, str) or value not in table:
            self.fail(name, "one of " + ", ".join(map(repr, table)), value, hint=why)
        return table[value]

    def num_labels(self) -> int:
        labels = self.value("id2label", None)
        if isinstance(labels, dict) and labels:
            return len(labels)
        return self.integer("num_labels", 2)


def read_hf_config(directory: Path) -> Fields:
    """The config.json of a Hugging Face checkpoint directory, refused early when the directory is not one."""
    if not directory.is_dir():
        raise InteropError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory with "
                           f"{CONFIG_FILE} and {SAFETENSORS_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InteropError(f"{path}: missing; a Hugging Face checkpoint directory holds {CONFIG_FILE} beside its "
                           "weights")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InteropError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "formerkit" in data:
        raise InteropError(f"{path}: a formerkit model directory, not a Hugging Face one; read it with formerkit.load")
    return Fields(data, str(path))




class WeightFiles:
    """The weights of a checkpoint directory: one file or an index of shards, safetensors or (only when trusted)
    pickle. Safetensors is preferred when both are present."""

    def __init__(self, directory: Path, trust_pickle: bool):
        self.directory = directory
        self.pickled = False
        self.weight_map: dict[str, str] | None = None
        for single, index, pickled in ((SAFETENSORS_FILE, SAFETENSORS_INDEX, False), (PICKLE_FILE, PICKLE_INDEX, True)):
            if (directory / single).is_file():
                self.files = [directory / single]
            elif (directory / index).is_file():
                self.weight_map = self._read_index(directory / index)
                self.files = [directory / name for name in sorted(set(self.weight_map.values()))]
            else:
                continue
            self.pickled = pickled
            break
        else:
            raise InteropError(f"{directory}: no weights found; expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                               f"with its shards (or {PICKLE_FILE}, read only with trust_pickle)")
        if self.pickled and not trust_pickle:
            raise InteropError(f"{self.files[0]}: a pickled PyTorch checkpoint, which can run code when loaded; "
                               "formerkit reads it only when asked: from_hf(..., trust_pickle=True) or --trust-pickle "
                               "(it then uses torch.load(weights_only=True)); better, convert it to safetensors")
        for path in self.files:
            if not path.is_file():
                raise InteropError(f"{path}: missing; the index lists it as a shard of this checkpoint")

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(path.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise InteropError(f"{path}: expected a JSON index with a \"weight_map\" ({error})") from error
        root = self.directory.resolve()
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and isinstance(file, str) and (root / file).resolve().parent == root
                for name, file in weight_map.items()):
            raise InteropError(f"{path}: weight_map: expected a mapping of tensor names to shard files in "
                               f"{self.directory}, got {weight_map!r:.200}")
        return weight_map

    def load(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Every tensor by name, and the file each came from (for error messages)."""
        tensors: dict[str, Tensor] = {}
        origins: dict[str, str] = {}
        if self.pickled:
            warnings.warn(f"{self.directory}: reading pickled weights because trust_pickle=True "
                          "(torch.load with weights_only=True)", UserWarning, stacklevel=4)
        for path in self.files:
            part = self._load_pickle(path) if self.pickled else self._load_safetensors(path)
            tensors.update(part)
            origins.update(dict.fromkeys(part, path.name))
        for name, file in (self.weight_map or {}).items():
            if origins.get(name) != file:
                raise InteropError(f"{self.directory / file}: does not hold {name!r}, which the index places there")
        return tensors, origins

    @staticmethod
    def _load_safetensors(path: Path) -> dict[str, Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise InteropError(f"{path}: not a readable safetensors file ({error})") from error

    @staticmethod
    def _load_pickle(path: Path) -> dict[str, Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types on a bad or unsafe file
            raise InteropError(f"{path}: not readable as a weights-only PyTorch checkpoint ({error})") from error
        if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
            raise InteropError(f"{path}: expected a mapping of tensor names to tensors, got {type(state).__name__}")
        return state


def write_hf_files(directory: Path, state: dict[str, Tensor], data: dict[str, Any]) -> None:
    """Writes ``state`` as model.safetensors and ``data`` as config.json, each under a temporary name renamed into
    place, after refusing a directory whose other weight files transformers could read instead."""
    from safetensors.torch import save_file

    stale = [name for name in (SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX) if (directory / name).exists()]
    if stale:
        raise InteropError(f"{directory}: already holds {', '.join(stale)}, which transformers could read instead of "
                           f"the {SAFETENSORS_FILE} written here; choose an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{SAFETENSORS_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})  # transformers checks the "format" entry
    replace_atomically(tmp, directory / SAFETENSORS_FILE)
    tmp = directory / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    replace_atomically(tmp, directory / CONFIG_FILE)
