"""The model config: one validated dataclass that describes a whole Transformer.

``ModelConfig`` holds the core's shape (``arch``, ``width``, ``num_layers``) and one small section per part: attention,
feed-forward, norms, positions, stem (what turns inputs into vectors) and head (what turns vectors into outputs). Every
value is checked when the config is constructed; an error names the field, the value given and what is allowed.

Configs are frozen. Derive a new one with ``config.replace(...)``, which accepts top-level fields, whole sections as
dicts, dotted paths (``"attention.num_heads"``) and unambiguous field names of a section (``num_classes=10``).
"""

from formerkit.config.model import ModelConfig
from formerkit.config.sections import (
    AttentionConfig,
    ConditionConfig,
    FeedForwardConfig,
    HeadConfig,
    NormConfig,
    PositionConfig,
    StemConfig,
)
from formerkit.schema import load_yaml  # noqa: F401 - load_yaml: also read from here

__all__ = [
    "AttentionConfig",
    "ConditionConfig",
    "FeedForwardConfig",
    "HeadConfig",
    "ModelConfig",
    "NormConfig",
    "PositionConfig",
    "StemConfig",
]
