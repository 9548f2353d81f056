"""Training: recipes, the trainer, objectives, checkpoints and distributed runs."""

from formerkit.train.config import TrainConfig, list_recipes, load_recipe
from formerkit.train.trainer import RunError, TrainResult, train

__all__ = ["RunError", "TrainConfig", "TrainResult", "list_recipes", "load_recipe", "train"]
