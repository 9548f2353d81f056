"""Saving and loading models: ``config.json`` + ``model.safetensors``, no pickle.

``config.json`` holds the ModelConfig and the SHA-256 of the weights file, so a corrupted, truncated or mismatched
``model.safetensors`` is refused at load. Files are written under a temporary name and renamed into place, weights
first, so a save interrupted half-way never leaves a directory that loads as something else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, ConfigError
from formerkit.models.transformer import build_model
from formerkit.nn.int8 import quantized_state, rebuild_quantized
from formerkit.version import __version__

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "load", "load_config", "load_extra", "read_document",
           "replace_atomically", "save", "sha256_file", "with_default_permissions"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def with_default_permissions(path: Path) -> None:
    """Gives a written file the permissions a plain ``open`` would (0666 less the umask): safetensors creates its
    files readable by their owner alone, which hides a saved model from the other users of a shared machine."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def replace_atomically(tmp: Path, final: Path) -> None:
    """Moves the written file ``tmp`` to ``final`` once its bytes are on disk, so ``final`` is never half-written."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    with_default_permissions(tmp)
    os.replace(tmp, final)



def save(model: torch.nn.Module, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` (a formerkit model carrying ``.config``) to ``directory``; returns the directory.

    ``extra`` is stored under "extra" in config.json (for tools that keep their own notes beside the model).
    """
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise CheckpointError(f"save: expected a formerkit model with a .config ModelConfig, got "
                              f"{type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    metadata = {"format": "pt", "formerkit_version": __version__}
    quantization = getattr(model, "quantization", None)
    if quantization is not None:  # int8 layers are saved as plain int8 weights and float scales
        from safetensors.torch import save_file

        save_file(quantized_state(model), str(tmp), metadata=metadata)
    else:
        save_model(model, str(tmp), metadata=metadata)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    replace_atomically(tmp, weights)
    document = {
        "formerkit": {"format_version": FORMAT_VERSION, "version": __version__},
        "model": config.to_dict(),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "bytes": size},
    }
    if quantization is not None:
        document["quantization"] = quantization
    if extra:
        document["extra"] = extra
    tmp = directory / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    replace_atomically(tmp, directory / CONFIG_FILE)
    return directory


def read_document(directory: Path) -> dict[str, Any]:
    """The checked contents of a saved model's config.json (model config, weights record, quantization, extra)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected one holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a saved formerkit model has {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); the file is corrupted or truncated") from error
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise CheckpointError(f"{path}: expected a formerkit model file with a \"model\" section, got keys "
                              f"{sorted(document) if isinstance(document, dict) else type(document).__name__}")
    version = document.get("formerkit", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this formerkit reads "
                              f"({FORMAT_VERSION})")
    return document


def _config_of(document: dict[str, Any], directory: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(document["model"])
    except ConfigError as error:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config: {error}") from error


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a saved model, without reading its weights."""
    directory = Path(directory)
    return _config_of(read_document(directory), directory)


def load_extra(directory: str | Path) -> dict[str, Any]:
    """What ``save(..., extra=...)`` stored beside the config (an empty dict if nothing)."""
    return read_document(Path(directory)).get("extra", {})


def load(directory: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuilds a model saved by ``save``: same config, same weights, same outputs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    document = read_document(directory)
    config = _config_of(document, directory)
    record = document.get("weights", {})
    weights = directory / record.get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the model's weights should be beside {CONFIG_FILE}")
    size = weights.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        raise CheckpointError(f"{weights}: {size} bytes, but {CONFIG_FILE} records {record['bytes']}; the file is "
                              "truncated or was replaced")
    if "sha256" in record and sha256_file(weights) != record["sha256"]:
        raise CheckpointError(f"{weights}: contents do not match the SHA-256 recorded in {CONFIG_FILE}; the file is "
                              "corrupted or was replaced")
    model = build_model(config).to(device)
    quantization = document.get("quantization")
    try:
        if quantization is not None:
            from safetensors.torch import load_file

            if quantization.get("mode") == "dynamic-int8" and torch.device(device).type != "cpu":
                raise CheckpointError(f"{directory}: a dynamic-int8 model runs on the CPU only, not on {device}")
            return rebuild_quantized(model, quantization, load_file(str(weights), device=str(device)), str(weights))
        load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(f"{weights}: does not hold this model's weights ({error})") from error
    return model
