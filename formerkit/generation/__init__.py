"""Generation: ``generate`` and ``stream`` decode new tokens with a key/value cache (``sampling``), optionally
through a compiled fixed-shape decode step (``compiled_step``), or speculatively with a draft (``speculative``);
a serving ``Engine`` steps many requests together, admitting new ones between steps (``engine``, continuous
batching)."""

from formerkit.generation.sampling import SamplingConfig, generate, stream
from formerkit.generation.speculative import ModelDraft, NGramDraft, SpeculativeStats

__all__ = ["ModelDraft", "NGramDraft", "SamplingConfig", "SpeculativeStats", "generate", "stream"]
