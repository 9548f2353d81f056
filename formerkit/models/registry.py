"""Named presets: a preset is a name, a one-line description and a function returning a ModelConfig.

The registry knows no preset: ``formerkit.models.presets`` registers the built-in ones, and importing
``formerkit.models`` (which Python does before any of its modules) imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError
from formerkit.models.transformer import build_model

__all__ = ["Preset", "create_model", "get_preset", "list_models", "model_config", "register_model"]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    make_config: Callable[[], ModelConfig]


_PRESETS: dict[str, Preset] = {}


def register_model(name: str, description: str):
    """Decorator: registers a function returning a ModelConfig under ``name``."""

    def decorate(make_config: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        if name in _PRESETS:
            raise ValueError(f"a preset named {name!r} is already registered")
        _PRESETS[name] = Preset(name, description, make_config)
        return make_config

    return decorate


def list_models() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=1, cutoff=0.4)
        raise ConfigError("preset", name, "a registered preset name (formerkit.list_models())",
                          hint=f"did you mean {close[0]!r}?" if close else "")
    return _PRESETS[name]


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig with ``overrides`` applied (see ModelConfig.replace for the accepted keys)."""
    config = get_preset(name).make_config()
    return config.replace(**overrides) if overrides else config


def create_model(name: str, **overrides: Any):
    """Builds a preset, e.g. ``create_model("vit_tiny_patch16_224", num_classes=10, image_size=32)``."""
    return build_model(model_config(name, **overrides))
