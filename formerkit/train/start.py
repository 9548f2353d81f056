"""Where a recipe's model starts: ``model.from`` (a run, a saved model, a Hugging Face directory or a preset).

- a **run directory** (``runs/char-lm``) or a **saved model** (``formerkit save``/a run's ``model/``): its weights,
  and the tokenizer the run saved beside them;
- a **Hugging Face directory** (``config.json`` with a ``model_type``): ``formerkit.from_hf``, and its tokenizer
  (``tokenizer.json`` + ``tokenizer_config.json``, chat template included);
- a **preset name**: a freshly initialized model, as ``model.preset`` gives (no weights to load).

A start with weights fixes the model: ``model.overrides`` may change what keeps every tensor's shape (``dropout``),
and the data must fit it (its vocabulary within the model's, its seq_len within ``max_seq_len``). The data's other
fields (a classifier's ``num_classes``) become the model's, and a tensor whose shape they change (that head) starts
fresh, with a note. A text source reads its text with the starting model's tokenizer when the start brings one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

__all__ = ["Start", "is_preset", "load_start", "start_model"]


@dataclass
class Start:
    """A loaded starting point: the model with its weights, its tokenizer (or None) and what it was."""

    model: nn.Module = field(repr=False)
    tokenizer: Any
    kind: str  # "run", "saved model" or "Hugging Face directory"
    path: Path


def is_preset(source: str) -> bool:
    """Whether ``model.from`` names a preset (and not an existing path)."""
    from formerkit.models.registry import list_models

    return not Path(source).exists() and source in list_models()


def load_start(source: str) -> Start:
    """The model (and tokenizer) at ``source``, a run directory, a saved model or a Hugging Face directory."""
    from formerkit.checkpoint import load

    path = Path(source)
    if (path / "model" / "config.json").is_file() or _is_formerkit_model(path):
        directory = path / "model" if (path / "model" / "config.json").is_file() else path
        tokenizer = None
        if (directory / "tokenizer.json").is_file():  # the tokenizer the run saved beside its model
            from formerkit.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(directory / "tokenizer.json")
        kind = "run" if directory != path else "saved model"
        return Start(load(directory), tokenizer, kind, path)
    if (path / "config.json").is_file():
        from formerkit.interop import from_hf
        from formerkit.interop.tokenizers import read_hf_tokenizer

        return Start(from_hf(path), read_hf_tokenizer(path), "Hugging Face directory", path)
    from formerkit.models.registry import list_models

    raise ConfigError("model.from", source, "a run directory, a saved model, a Hugging Face directory or a preset "
                      f"name ({', '.join(list_models()[:6])}, ... : formerkit models)",
                      hint="no such directory" if not path.exists() else f"{path} holds no config.json")


def _is_formerkit_model(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" not in data


def start_model(start: Start, overrides: dict[str, Any], data_fields: dict[str, Any], *, vocab_size: int | None,
                seq_len: int | None, build) -> tuple[nn.Module, ModelConfig, list[str]]:
    """The model a run trains from ``start``: its config with ``overrides`` and ``data_fields`` (other than the
    vocabulary size and sequence length, checked against the model instead), built with ``build`` and given every
    start tensor of the same name and shape. Returns (model, config, names of the tensors that start fresh)."""
    base = start.model.config
    where = f"model.from {str(start.path)!r} ({start.kind})"
    if vocab_size is not None and vocab_size > base.stem.vocab_size:
        raise ConfigError("model.from", str(start.path), f"a model whose vocabulary holds the data's {vocab_size} "
                          f"token ids", hint=f"{where} has vocab_size {base.stem.vocab_size}; read the data with its "
                                             "own tokenizer (a start that saved one brings it)")
    if seq_len is not None and base.max_seq_len is not None and seq_len > base.max_seq_len:
        raise ConfigError("data.seq_len", seq_len, f"at most the starting model's max_seq_len ({base.max_seq_len})",
                          hint=where)
    fields = {key: value for key, value in data_fields.items()
              if key not in ("vocab_size", "max_seq_len") and key not in overrides}
    fields = {key: value for key, value in fields.items() if _current(base, key) != value}
    if not fields and not overrides:
        # the start itself, whatever its layers (int8 weights from formerkit quantize included)
        return start.model, base, []
    config = base.replace(**fields, **overrides)
    model = build(config)
    source = start.model.state_dict()
    target = model.state_dict()
    kept = {name: tensor for name, tensor in source.items() if name in target and target[name].shape == tensor.shape}
    fresh = sorted(name for name in target if name not in kept)
    # Only a head may start fresh (a new task's); anything else would silently train from random weights.
    changed = [name for name in fresh if not name.startswith("head.")]
    if changed:
        raise ConfigError("model.overrides", overrides, f"values that keep the weights of {where}",
                          hint=f"{changed[0]} would not come from the start"
                               + (" (its int8 layers cannot be rebuilt with other values)"
                                  if getattr(start.model, "quantization", None) else ""))
    model.load_state_dict(kept, strict=False)
    return model, config, fresh


def _current(config: ModelConfig, key: str) -> Any:
    """The value of a ``replace`` key (a field name of one section, or dotted) in ``config``, or None."""
    data = config.to_dict()
    if "." in key:
        for part in key.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        return data
    if key in data:
        return data[key]
    for section in data.values():
        if isinstance(section, dict) and key in section:
            return section[key]
    return None
