"""Assemblies: the Transformer built from parts, early exit through its layers, the masked-autoencoder pretraining
wrapper, and the preset registry."""

from formerkit.models import presets  # noqa: F401  (registers the built-in presets)
from formerkit.models.early_exit import EarlyExit, early_exit
from formerkit.models.mae import MAEOutput, MaskedAutoencoder, finetune_model
from formerkit.models.registry import create_model, get_preset, list_models, model_config, register_model
from formerkit.models.transformer import ModelOutput, Transformer, TransformerStack, build_model

__all__ = [
    "EarlyExit",
    "MAEOutput",
    "MaskedAutoencoder",
    "ModelOutput",
    "Transformer",
    "TransformerStack",
    "build_model",
    "create_model",
    "early_exit",
    "finetune_model",
    "get_preset",
    "list_models",
    "model_config",
    "register_model",
]
