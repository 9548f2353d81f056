"""What a serving engine is asked and what it answers, one token at a time.

A ``TokenRequest`` is one sequence to continue (its prompt ids, how many new tokens at most, how to pick them, which
token ids end it, how many log-probabilities to report). The engine answers with a ``TokenEvent`` per new token; the
last one carries ``finish_reason``. The HTTP layer (``formerkit serve``) turns these into its response formats; the
engine that schedules the sequences (one alone, or many stepped together) is free to change behind this seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from formerkit.errors import InputError
from formerkit.generation.sampling import SamplingConfig

__all__ = ["EngineFull", "TokenEvent", "TokenRequest"]


class EngineFull(Exception):
    """The engine takes no more requests now (its queue is full); the HTTP layer answers 429, and the client retries
    later. ``retry_after``: seconds the client may wait before retrying, if the engine can tell."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class TokenRequest:
    """One sequence to generate.

    ids: the prompt's token ids. max_new_tokens: at most this many new tokens. sampling: temperature / top-k / top-p
    (temperature 0 is greedy). seed: makes a sampled sequence reproducible whatever else runs beside it.
    stop_ids: token ids that end the sequence (the stop token is reported, then the sequence finishes).
    logprobs: None reports no log-probabilities; 0 the chosen token's; k > 0 also the k most likely tokens' (all of
    the model's own log-softmax over the vocabulary, before temperature or truncation).
    """

    ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not self.ids:
            raise InputError("ids: expected at least one prompt token, got none")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or \
                self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise InputError(f"logprobs: expected None or an integer >= 0, got {self.logprobs!r}")


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a sequence.

    logprob: the token's log-probability (None unless the request asked for log-probabilities). top_logprobs: the
    ``logprobs`` most likely (token id, log-probability) pairs, most likely first (None unless asked for k > 0).
    finish_reason: None while the sequence goes on; on its last token "stop" (a stop token) or "length"
    (max_new_tokens or the model's context reached).
    """

    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None
