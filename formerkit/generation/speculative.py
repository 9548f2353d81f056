"""Speculative decoding: a cheap proposer guesses the next k tokens, the model checks all of them in one forward pass.

A decoder's step costs about the same whether it reads one new token or a few (the weights are read once either way),
so if something cheap can guess what the model would say, one pass over ``[last token, guess 1 .. guess k]`` yields
the model's own next-token distributions at all k + 1 places. The guesses are kept up to the first one the model
would not have made; in the same pass the model makes one token of its own after them (the correction at the first
rejected place, or a bonus token after k accepted ones). The cache is then rolled back past the rejected guesses
(``KVCache.truncate``). Each pass therefore yields between 1 and k + 1 tokens.

- Greedy: a guess is kept when it is the model's most likely token, so the output is the model's own greedy output,
  token for token (up to the float rounding of a pass over several tokens instead of one).
- Sampling: the acceptance rule of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
  Decoding") and Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"): a guess x
  drawn from the proposer's q is kept with probability min(1, p(x) / q(x)); on rejection the token is drawn from
  norm(max(0, p - q)), and after k kept guesses a bonus token is drawn from p. The tokens then follow the model's
  distribution p exactly, whatever q is. p and q both have temperature, top-k and top-p applied.

Proposers (``draft=`` of ``generate``): another formerkit model over the same vocabulary, e.g. a smaller distilled run,
with its own cache (``ModelDraft``), or prompt lookup (``NGramDraft``, ``draft="ngram"``; Saxena 2023, "Prompt Lookup
Decoding"): the tokens that followed the latest earlier occurrence of the text's last n-gram, free to compute and
often right on text that repeats its input (code edits, summaries, extraction). Any object with ``num_tokens`` and
``start`` (see ``Draft``) works as well.

Batch 1 only: rows of a batch accept different numbers of guesses, and the one-sequence case is where speculative
decoding helps (a batch already reads the weights once for many tokens).

``sampling`` arguments here are ``formerkit.generation.sampling.SamplingConfig``s (``greedy``, ``pick`` and
``probabilities`` are what is used); this module does not import it, since ``generate(draft=...)`` calls into this one.
``speculative_serving`` answers a serving engine's ``TokenRequest`` with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from formerkit.errors import InputError
from formerkit.generation.lean_step import LeanStep
from formerkit.nn.cache import KVCache

__all__ = ["Draft", "ModelDraft", "NGramDraft", "SpeculativeDecoder", "SpeculativeStats", "as_draft", "verify"]


def _check_count(value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")


class Draft:
    """What a proposer provides: ``num_tokens`` (k, the most tokens guessed per pass of the model) and
    ``start(model, max_length)``, called once per generation, returning an object whose
    ``propose(sequence, count, sampling, generator)`` guesses up to ``count`` tokens after ``sequence`` (the prompt
    and every token generated so far, a list of ids). It returns the guesses (a list of ids) and, if they were drawn
    at random, the distributions they were drawn from ([guesses, vocab], with ``sampling`` applied); None means
    the guesses were picked deterministically (each q is then one-hot on its guess)."""

    num_tokens: int

    def start(self, model, max_length: int):
        raise NotImplementedError


@dataclass(frozen=True)
class NGramDraft(Draft):
    """Prompt lookup: guesses the ``num_tokens`` tokens that followed the latest earlier occurrence of the
    sequence's last ``ngram_size`` tokens (then of its last ngram_size - 1, ..., down to 1 when the longer ones never
    occurred before), as if the text from there were copied. Needs no model and keeps no state."""

    ngram_size: int = 3
    num_tokens: int = 8

    def __post_init__(self) -> None:
        _check_count(self.ngram_size, "NGramDraft.ngram_size")
        _check_count(self.num_tokens, "NGramDraft.num_tokens")

    def start(self, model, max_length: int) -> NGramDraft:
        return self

    def propose(self, sequence: list[int], count: int, sampling,
                generator: torch.Generator | None) -> tuple[list[int], None]:
        tokens = torch.tensor(sequence)
        for size in range(min(self.ngram_size, len(sequence) - 1), 0, -1):
            # Every earlier window of this size (the last one is the n-gram itself) that equals the last n tokens.
            windows = tokens[:-1].unfold(0, size, 1)
            found = (windows == tokens[-size:]).all(dim=1).nonzero()
            if len(found):
                # Copy on from there; a match close to the end runs into the copied tokens themselves, which
                # continues a repeating pattern (a run of spaces, a repeated line) instead of stopping short.
                follows, guesses = int(found[-1]) + size, []
                for index in range(count):
                    place = follows + index
                    guesses.append(sequence[place] if place < len(sequence) else guesses[place - len(sequence)])
                return guesses, None
        return [], None


@dataclass(frozen=True)
class ModelDraft(Draft):
    """A smaller model over the same vocabulary (e.g. a distilled run) guesses ``num_tokens`` tokens, one decode step
    each, with its own key/value cache. It samples with the same temperature / top-k / top-p as the target."""

    model: torch.nn.Module
    # Each guess costs a step of the draft: on a CPU, where a 1-layer draft's step is a fifth of a 4-layer target's,
    # 3 did better than 4 or 6 (benchmarks/speculative.py).
    num_tokens: int = 3

    def __post_init__(self) -> None:
        _check_count(self.num_tokens, "ModelDraft.num_tokens")
        config = getattr(self.model, "config", None)
        if not isinstance(self.model, torch.nn.Module) or config is None:
            raise InputError(f"draft: expected a formerkit model, got {type(self.model).__name__}")
        if config.arch != "decoder" or config.head.kind != "lm":
            raise InputError(f"draft: the draft model must be a decoder with an lm head, it is arch {config.arch!r} "
                             f"with head {config.head.kind!r}")

    def start(self, model, max_length: int) -> _ModelProposals:
        draft_vocab, vocab = self.model.config.stem.vocab_size, model.config.stem.vocab_size
        if draft_vocab != vocab:
            raise InputError(f"draft: the draft model's vocabulary has {draft_vocab} tokens, the model's {vocab}; "
                             "a draft must share the model's tokenizer")
        config = self.model.config
        if max_length > config.num_positions and config.position.kind in ("learned", "sinusoidal", "rope"):
            raise InputError(f"draft: the draft model's max_seq_len {config.num_positions} is shorter than the "
                             f"{max_length} tokens this generation needs")
        return _ModelProposals(self.model, max_length)


class _ModelProposals:
    """One generation's state of a ``ModelDraft``: its cache and the tokens in it."""

    def __init__(self, model, max_length: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, max_length, rolling=False)
        self.fed: list[int] = []
        self.virtual = 0  # slots before the first token (prompt tuning's virtual tokens)
        self.device = next(model.parameters()).device
        # One token after cached ones (most of a draft's feeds): the eager step without the general forward's
        # per-call work (``LeanStep``; None: this model takes the general forward), built at the first such feed.
        self.lean: LeanStep | None | bool = False

    def _feed(self, tokens: list[int]) -> Tensor:
        if len(tokens) == 1 and self.fed:
            if self.lean is False:
                self.lean = LeanStep.build(self.model, self.cache)
            if self.lean is not None:
                logits = self.lean(torch.tensor(tokens, device=self.device))[0]
                self.fed.extend(tokens)
                return logits
        logits = self.model(torch.tensor([tokens], device=self.device), cache=self.cache, logits_to_keep=1)[0, -1]
        if not self.fed:
            self.virtual = self.cache.length - len(tokens)
        self.fed.extend(tokens)
        return logits

    def propose(self, sequence: list[int], count: int, sampling,
                generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
        # Keep the cached tokens the sequence still starts with (the accepted guesses), feed the rest; at least the
        # last token is fed, whose logits give the first guess.
        same = 0
        for cached, token in zip(self.fed, sequence):
            if cached != token:
                break
            same += 1
        same = min(same, len(sequence) - 1)
        if same < len(self.fed):
            self.cache.truncate(self.virtual + same)
            del self.fed[same:]
        logits = self._feed(sequence[same:])
        guesses, distributions = [], []
        for index in range(count):
            if sampling.greedy:
                token = int(logits.argmax())
            else:
                q = sampling.probabilities(logits)
                token = int(torch.multinomial(q, 1, generator=generator))
                distributions.append(q)
            guesses.append(token)
            if index + 1 < count:
                logits = self._feed([token])
        return guesses, torch.stack(distributions) if distributions else None


def as_draft(draft) -> Draft:
    """The proposer ``draft=`` names: "ngram" (``NGramDraft()``), a formerkit model (``ModelDraft(model)``), or a
    ``Draft``-like object (``num_tokens`` and ``start``) as it is."""
    if isinstance(draft, str):
        if draft != "ngram":
            raise InputError(f"draft: expected 'ngram', a formerkit model or a Draft (NGramDraft, ModelDraft), got "
                             f"{draft!r}")
        return NGramDraft()
    if isinstance(draft, torch.nn.Module):
        return ModelDraft(draft)
    if not (hasattr(draft, "start") and hasattr(draft, "num_tokens")):
        raise InputError(f"draft: expected 'ngram', a formerkit model or a Draft (NGramDraft, ModelDraft), got "
                         f"{type(draft).__name__}")
    _check_count(draft.num_tokens, "draft.num_tokens")
    return draft


@dataclass
class SpeculativeStats:
    """Counts of one or more speculative generations: passes of the model after the prompt (``rounds``), tokens
    guessed (``proposed``), guesses kept (``accepted``) and tokens generated (``tokens``)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Kept guesses per guess (0 without guesses)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


def verify(logits: Tensor, guesses: Tensor, draft_probabilities: Tensor | None, sampling,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """How many of the ``guesses`` [m] the model keeps, and its own next token after them.

    logits: the model's [m + 1, vocab] for the places of the m guesses and the one after them.
    draft_probabilities: [m, vocab] the distributions the guesses were drawn from, or None for guesses picked
    deterministically (one-hot q). Greedy: a guess is kept while it is the model's argmax. Sampling: the rule of
    Leviathan et al. 2023 / Chen et al. 2023 (see the module's docstring).
    """
    count = guesses.shape[0]
    if sampling.greedy:
        best = logits.argmax(dim=-1)
        missed = (best[:count] != guesses).nonzero()
        kept = int(missed[0]) if len(missed) else count
        return kept, int(best[kept])
    p = sampling.probabilities(logits)
    places = torch.arange(count, device=p.device)
    p_guess = p[places, guesses]
    q_guess = torch.ones_like(p_guess) if draft_probabilities is None else draft_probabilities[places, guesses]
    # Keep x with probability min(1, p(x) / q(x)): u < p / q, written u * q < p.
    uniform = torch.rand(count, generator=generator, device=p.device)
    rejected = (uniform * q_guess >= p_guess).nonzero()
    if not len(rejected):
        return count, int(torch.multinomial(p[count], 1, generator=generator))
    kept = int(rejected[0])
    if draft_probabilities is None:
        q = torch.zeros_like(p[kept]).index_fill_(0, guesses[kept], 1.0)
    else:
        q = draft_probabilities[kept]
    residual = (p[kept] - q).clamp(min=0)
    # p == q up to rounding: rejection then had probability ~0, and p is the right distribution.
    residual = residual if float(residual.sum()) > 0 else p[kept]
    return kept, int(torch.multinomial(residual, 1, generator=generator))


class SpeculativeDecoder:
    """One sequence (batch 1) decoded speculatively: ``tokens()`` yields each new token with the model's logits
    [vocab] at its place (for log-probabilities).

    model: a decoder with an lm head; prompt: token ids (a list); draft: a ``Draft`` (see ``as_draft``);
    sampling: ``SamplingConfig``; stop_ids: ids that end the sequence (the stop token is yielded, then it ends);
    stats: a ``SpeculativeStats`` to add this generation's counts to.
    """

    def __init__(self, model, prompt: list[int], max_new_tokens: int, draft: Draft, *, sampling,
                 stop_ids=frozenset(), generator: torch.Generator | None = None,
                 stats: SpeculativeStats | None = None):
        config = model.config
        if config.arch != "decoder" or config.head.kind != "lm":
            raise InputError(f"draft: speculative decoding needs a decoder with an lm head, this model is arch "
                             f"{config.arch!r} with head {config.head.kind!r}")
        if config.position.rope_scaling == "longrope":
            raise InputError("draft: speculative decoding does not support LongRoPE models (their cached keys are "
                             "recomputed once the sequence outgrows rope_original_max_len); generate without a draft")
        _check_count(max_new_tokens, "max_new_tokens", 0)
        if not prompt:
            raise InputError("input_ids: expected at least one prompt token, got none")
        self.model, self.draft, self.sampling = model, as_draft(draft), sampling
        self.prompt, self.max_new_tokens = list(prompt), max_new_tokens
        self.stop_ids, self.generator = frozenset(stop_ids), generator
        self.stats = stats if stats is not None else SpeculativeStats()
        self.device = next(model.parameters()).device
        # The last new token is never fed, so the cache holds the prompt and max_new_tokens - 1 tokens at most (a
        # pass never guesses past max_new_tokens).
        self.max_length = len(self.prompt) + max(max_new_tokens - 1, 0)
        virtual = model.input_prompt() if getattr(model, "input_prompt", None) is not None else None
        # Rolled back after every pass, so window layers keep full buffers (rolling ones overwrite what they drop).
        self.cache = KVCache.for_model(model, 1, self.max_length + (0 if virtual is None else virtual.shape[0]),
                                       rolling=False)
        self.proposals = None

    def _forward(self, tokens: list[int]) -> Tensor:
        return self.model(torch.tensor([tokens], device=self.device), cache=self.cache,
                          logits_to_keep=len(tokens))[0]

    def _pick(self, logits: Tensor) -> int:
        return int(self.sampling.pick(logits.unsqueeze(0), self.generator)[0])

    def tokens(self) -> Iterator[tuple[int, Tensor]]:
        if self.max_new_tokens == 0:
            return
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            # Each pass in inference mode, never across a yield (the caller's code between tokens runs outside it).
            with torch.inference_mode():
                sequence = list(self.prompt)
                # The first token comes from the prompt's pass, as in plain decoding.
                logits = self._forward(sequence)[-1]
                made = [(self._pick(logits), logits)]
                self.proposals = self.draft.start(self.model, self.max_length)
            count = 0
            while True:
                for token, logits in made:
                    self.stats.tokens += 1
                    count += 1
                    sequence.append(token)
                    yield token, logits
                    if token in self.stop_ids or count == self.max_new_tokens:
                        return
                with torch.inference_mode():
                    made = self._round(sequence, self.max_new_tokens - count)
        finally:
            if was_training:
                self.model.train()

    def _round(self, sequence: list[int], remaining: int) -> list[tuple[int, Tensor]]:
        """One pass of the model over the last token and the proposer's guesses: the tokens it makes (the kept
        guesses and its own one), each with the model's logits at its place."""
        # Never guess past max_new_tokens: the pass's own token comes after the guesses.
        count = min(self.draft.num_tokens, remaining - 1)
        guesses, draft_probabilities = (self.proposals.propose(sequence, count, self.sampling, self.generator)
                                        if count > 0 else ([], None))
        guesses = [int(token) for token in list(guesses)[:count]]
        vocab = self.model.config.stem.vocab_size
        if any(not 0 <= token < vocab for token in guesses):
            raise InputError(f"draft: the proposer guessed token ids outside [0, {vocab}): {guesses}")
        start = self.cache.length
        logits = self._forward([sequence[-1], *guesses])
        kept, token = verify(logits, torch.tensor(guesses, dtype=torch.long, device=logits.device),
                             None if draft_probabilities is None else draft_probabilities[:len(guesses)],
                             self.sampling, self.generator)
        # The last token and the kept guesses stay cached; the rejected guesses go.
        self.cache.truncate(start + 1 + kept)
        self.stats.rounds += 1
        self.stats.proposed += len(guesses)
        self.stats.accepted += kept
        return [(new, logits[index]) for index, new in enumerate([*guesses[:kept], token])]
