"""Assemblies: the Transformer built from parts, and the preset registry."""

from formerkit.models.registry import create_model, get_preset, list_models, model_config, register_model
from formerkit.models.transformer import ModelOutput, Transformer, TransformerStack, build_model

__all__ = [
    "ModelOutput",
    "Transformer",
    "TransformerStack",
    "build_model",
    "create_model",
    "get_preset",
    "list_models",
    "model_config",
    "register_model",
]
