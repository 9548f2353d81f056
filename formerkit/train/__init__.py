"""Training: recipes, the trainer, objectives, checkpoints and distributed runs."""

# Objectives in modules of their own register with formerkit.train.objectives when imported.
from formerkit.train import (
    diffusion,  # noqa: F401 - flow_matching, ddpm
    masked_generation,  # noqa: F401 - masked_generation, masked_diffusion_lm
)
from formerkit.train.config import TrainConfig, list_recipes, load_recipe
from formerkit.train.trainer import RunError, TrainResult, train

__all__ = ["RunError", "TrainConfig", "TrainResult", "list_recipes", "load_recipe", "train"]
