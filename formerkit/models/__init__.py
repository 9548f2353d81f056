"""Assemblies: the Transformer built from parts, the masked-autoencoder pretraining wrapper, and the preset
registry."""

from formerkit.models import presets  # noqa: F401  (registers the built-in presets)
from formerkit.models.mae import MAEOutput, MaskedAutoencoder, finetune_model
from formerkit.models.registry import create_model, get_preset, list_models, model_config, register_model
from formerkit.models.transformer import ModelOutput, Transformer, TransformerStack, build_model

__all__ = [
    "MAEOutput",
    "MaskedAutoencoder",
    "ModelOutput",
    "Transformer",
    "TransformerStack",
    "build_model",
    "create_model",
    "finetune_model",
    "get_preset",
    "list_models",
    "model_config",
    "register_model",
]
