"""Generation: ``generate`` and ``stream`` decode new tokens with a key/value cache (``sampling``), optionally
through a compiled fixed-shape decode step (``compiled_step``)."""

from formerkit.generation.sampling import SamplingConfig, generate, stream

__all__ = ["SamplingConfig", "generate", "stream"]
