"""Generation: sampling and the generate/stream API, decoding new tokens one at a time with a key/value cache.

``generate`` returns the prompt followed by the new tokens; ``stream`` yields each step's tokens as they are made.
Both run the prompt through the model's ordinary forward pass with a ``KVCache``, then each new token through the
same layers (``LeanStep``: the forward pass without its per-call checks, masks and module calls, for the decoders
it covers; the forward pass itself otherwise; a compiled step with ``compile=True``), so what is generated is what a
full recompute of the growing sequence would give (the tests check the logits of every step against one).

Batched prompts of different lengths are left-padded, with ``attention_mask`` marking the real tokens: padding is
never attended to and positions count real tokens only, so a padded row generates what it would alone.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from formerkit.errors import InputError
from formerkit.generation.compiled_step import bind_compiled_step
from formerkit.generation.lean_step import LeanStep
from formerkit.nn.cache import KVCache

__all__ = ["SamplingConfig", "generate", "stream"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits.

    temperature: 0 picks the most likely token (greedy); otherwise logits are divided by it and a token is drawn.
    top_k: draw only among the k most likely tokens. top_p: only among the most likely tokens whose probabilities add
    up to p (nucleus sampling; the most likely token always stays).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not self.temperature >= 0:
            raise InputError(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise InputError(f"top_k: expected an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise InputError(f"top_p: expected a number in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """The next token of each row [batch] from logits [batch, vocab]."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probabilities(logits), 1, generator=generator).squeeze(-1)

    def probabilities(self, logits: Tensor) -> Tensor:
        """The distribution [..., vocab] a token is drawn from (temperature, then top-k, then top-p; not greedy)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            threshold = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token when the more likely ones already reach p (so the most likely one always stays).
            drop = (cumulative - ordered.softmax(dim=-1)) >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return logits.softmax(dim=-1)


def _decode_step(model, tokens: Tensor, cache: KVCache, source: Tensor) -> Tensor:
    """Logits [batch, vocab] of one new token per row, appended to the cache."""
    if model.config.arch == "encoder_decoder":
        return model(source, decoder_input_ids=tokens.unsqueeze(1), cache=cache, logits_to_keep=1)[:, -1]
    return model(tokens.unsqueeze(1), cache=cache, logits_to_keep=1)[:, -1]


def _recompute(model, cache: KVCache, prompt: Tensor, prompt_keep: Tensor | None, history: list[Tensor],
               compile: bool) -> tuple[KVCache, Tensor]:
    """A fresh cache holding the prompt and every token chosen so far (the last one not yet fed), all computed in
    one pass, and the last token's logits."""
    fresh = KVCache.for_model(model, cache.batch_size, cache.max_length, rolling=not compile)
    chosen = torch.stack(history, dim=1)
    keep = None if prompt_keep is None else torch.cat([prompt_keep, torch.ones_like(chosen, dtype=prompt_keep.dtype)],
                                                       dim=1)
    return fresh, _prefill(model, fresh, torch.cat([prompt, chosen], dim=1), keep, None, None)


def _prefill(model, cache: KVCache, prompt: Tensor, prompt_keep: Tensor | None, source: Tensor | None,
             source_keep: Tensor | None) -> Tensor:
    """Runs the prompt through the model into the cache; returns the last token's logits [batch, vocab]. With rolling
    window buffers the prompt goes in pieces of one window, so each piece attends over at most two windows of keys
    and a long prompt costs time and memory linear in its length."""
    piece = cache.window if cache.window is not None else prompt.shape[1]
    logits = None
    for begin in range(0, prompt.shape[1], piece):
        tokens = prompt[:, begin:begin + piece]
        keep = None if prompt_keep is None else prompt_keep[:, begin:begin + piece]
        if model.config.arch == "encoder_decoder":
            logits = model(source, attention_mask=source_keep, decoder_input_ids=tokens,
                           decoder_attention_mask=keep, cache=cache, logits_to_keep=1)
        else:
            logits = model(tokens, attention_mask=keep, cache=cache, logits_to_keep=1)
    return logits[:, -1]


def _as_ids(input_ids, name: str) -> tuple[Tensor, bool]:
    """[batch, tokens] long ids, and whether the input was a single 1-D prompt."""
    if isinstance(input_ids, (list, tuple)):
        try:
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError) as error:
            raise InputError(f"{name}: expected a tensor or a list of token ids (rows of equal length; pad them and "
                             f"pass attention_mask), got {error}") from None
    if not isinstance(input_ids, Tensor):
        raise InputError(f"{name}: expected a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(f"{name}: expected integer token ids, got dtype {input_ids.dtype}")
    single = input_ids.dim() == 1
    if single:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty [batch, tokens] (or [tokens]) tensor, got shape "
                         f"{list(input_ids.shape)}")
    return input_ids.long(), single


def _check_left_padded(attention_mask: Tensor | None, shape: tuple[int, int], name: str) -> Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise InputError(f"{name}: expected a tensor [batch, tokens] of 1 (token) and 0 (padding), got "
                         f"{type(attention_mask).__name__}")
    if attention_mask.dim() == 1 and shape[0] == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if list(attention_mask.shape) != list(shape):
        raise InputError(f"{name}: expected shape {list(shape)} like the prompt, got {list(attention_mask.shape)}")
    keep = attention_mask != 0
    last_real = keep[:, -1]
    if not bool(last_real.all()):
        rows = (~last_real).nonzero().flatten().tolist()[:5]
        raise InputError(f"{name}: generation needs prompts padded on the left (real tokens last); rows {rows} end "
                         "with padding")
    return keep


def _stop_set(stop_tokens, vocab_size: int) -> Tensor | None:
    if stop_tokens is None:
        return None
    if isinstance(stop_tokens, int):
        stop_tokens = [stop_tokens]
    if not isinstance(stop_tokens, Iterable):
        raise InputError(f"stop_tokens: expected a token id or a list of them, got {type(stop_tokens).__name__}")
    tokens = list(stop_tokens)
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InputError(f"stop_tokens: expected token ids in [0, {vocab_size}), got {token!r}")
    return torch.tensor(tokens, dtype=torch.long) if tokens else None


def stream(model, input_ids, max_new_tokens: int, *, attention_mask: Tensor | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           stop_tokens: int | Iterable[int] | None = None, pad_token_id: int | None = None, seed: int | None = None,
           decoder_input_ids=None, decoder_start_token_id: int | None = None,
           compile: bool = False, draft=None, draft_stats=None) -> Iterator[Tensor]:
    """Yields the new tokens [batch] of each step as they are generated (see ``generate`` for the arguments).

    A row that has produced a stop token yields ``pad_token_id`` afterwards (default: its first stop token); the
    stream ends when every row has stopped or after ``max_new_tokens`` steps. With a ``draft``, each token is yielded
    on its own, though a pass of the model may make several.
    """
    if draft is not None:
        yield from _speculative_steps(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                                      sampling=SamplingConfig(temperature, top_k, top_p), stop_tokens=stop_tokens,
                                      seed=seed, decoder_input_ids=decoder_input_ids, compile=compile, draft=draft,
                                      stats=draft_stats)
        return
    yield from _steps(model, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                      top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_token_id=pad_token_id, seed=seed,
                      decoder_input_ids=decoder_input_ids, decoder_start_token_id=decoder_start_token_id,
                      compile=compile, between_steps=True)


def _steps(model, input_ids, max_new_tokens: int, *, attention_mask: Tensor | None, temperature: float,
           top_k: int | None, top_p: float | None, stop_tokens, pad_token_id: int | None, seed: int | None,
           decoder_input_ids, decoder_start_token_id: int | None, compile: bool,
           between_steps: bool) -> Iterator[Tensor]:
    """``stream``'s steps. With ``between_steps`` the caller runs its own code between them: each computation
    enters inference mode by itself (never across a yield) and each token is yielded as an ordinary tensor.
    Without, the caller (``generate``) runs everything in inference mode and only collects the tokens: at a
    step of about a millisecond, the per-step context switches and copies are worth sparing."""
    config = model.config
    if config.arch == "encoder" or config.head.kind != "lm":
        raise InputError(f"generate: needs a decoder or encoder_decoder with an lm head, this model is arch "
                         f"{config.arch!r} with head {config.head.kind!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    sampling = SamplingConfig(temperature, top_k, top_p)
    vocab = config.stem.vocab_size
    stops = _stop_set(stop_tokens, vocab)
    if pad_token_id is None:
        pad_token_id = int(stops[0]) if stops is not None else 0
    elif isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise InputError(f"pad_token_id: expected a token id in [0, {vocab}), got {pad_token_id!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed: expected an integer or None, got {seed!r}")

    source, _ = _as_ids(input_ids, "input_ids")
    device = next(model.parameters()).device
    source = source.to(device)
    if config.arch == "encoder_decoder":
        source_keep = _check_source_mask(attention_mask, tuple(source.shape))
        if decoder_input_ids is None:
            decoder_input_ids = _start_tokens(_start_token(config, decoder_start_token_id), source.shape[0], vocab)
        prompt, _ = _as_ids(decoder_input_ids, "decoder_input_ids")
        prompt = prompt.to(device)
        if prompt.shape[0] != source.shape[0]:
            raise InputError(f"decoder_input_ids: batch {prompt.shape[0]} differs from the source batch "
                             f"{source.shape[0]}")
        prompt_keep = None
    else:
        if decoder_input_ids is not None:
            raise InputError(f"decoder_input_ids: only an encoder_decoder model takes them (arch is {config.arch!r})")
        prompt, prompt_keep = source, _check_left_padded(attention_mask, tuple(source.shape), "attention_mask")
        source_keep = None
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # The last new token is returned, never fed back: the cache holds everything before it.
    length = prompt.shape[1] + max_new_tokens - 1
    if getattr(model, "input_prompt", None) is not None:  # prompt tuning: the virtual tokens are cached too
        virtual = model.input_prompt()
        length += 0 if virtual is None else virtual.shape[0]
    if compile and config.position.kind in ("learned", "sinusoidal", "rope"):
        # One cache length for every call, so the compiled step (whose shapes are fixed) is compiled once.
        length = max(length, config.num_positions)
    # A compiled step reads whole buffers of fixed shape, so it keeps full-length buffers for window layers too.
    cache = KVCache.for_model(model, prompt.shape[0], length, rolling=not compile)
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    stops = None if stops is None else stops.to(device)
    was_training = model.training
    if was_training:  # switching modes walks every module: skipped when there is nothing to switch
        model.eval()

    def choose(logits: Tensor, finished: Tensor, best: Tensor | None = None) -> tuple[Tensor, Tensor]:
        token = best if best is not None and sampling.greedy else sampling.pick(logits, generator)
        if stops is not None:
            token = token.masked_fill(finished, pad_token_id)
            finished = finished | torch.isin(token, stops)
        return token, finished

    # LongRoPE (Phi-3): once the sequence outgrows the original length, its long factors rotate every position; the
    # keys cached under the short ones are then computed again, in one pass over the whole sequence, at the step that
    # first feeds a token past that length (counting padding), as transformers' Phi-3 generation does.
    switch = (config.position.rope_original_max_len
              if config.position.rope_scaling == "longrope" and config.arch == "decoder" else None)
    history: list[Tensor] = []
    lean: LeanStep | None | bool = False  # built at the first eager step (False: not yet)
    inference = torch.inference_mode if between_steps else contextlib.nullcontext
    try:
        with inference():
            logits = _prefill(model, cache, prompt, prompt_keep, source, source_keep)
            step, slots = None, None
            if compile and max_new_tokens > 1:
                step, slots = bind_compiled_step(model, cache)
            token, finished = choose(logits, finished)
        for index in range(max_new_tokens):
            yield token.clone() if between_steps else token
            if index + 1 == max_new_tokens or (stops is not None and bool(finished.all())):
                return
            with inference():
                logits = best = None
                if switch is not None:
                    history.append(token.clone())  # a compiled step may reuse its output buffer
                    if cache.length == switch:
                        cache, logits = _recompute(model, cache, prompt, prompt_keep, history, compile)
                        if step is not None:
                            step, slots = bind_compiled_step(model, cache)
                if logits is None and step is not None:
                    try:
                        logits, best = step(token.view(-1, 1))
                    except Exception as error:  # no C++ compiler, an unsupported platform...: decode without it
                        if int(slots.slot) != cache.length:
                            raise  # the step failed after it began writing: the cache cannot be trusted
                        step = None
                        warnings.warn(f"generate(compile=True): compiling the decode step failed "
                                      f"({type(error).__name__}: {error}); decoding without compiling",
                                      RuntimeWarning, stacklevel=2)
                    else:
                        cache.took_static_step()
                if logits is None and lean is False:
                    lean = LeanStep.build(model, cache) if switch is None else None
                if logits is None:
                    logits = lean(token) if lean is not None else _decode_step(model, token, cache, source)
                token, finished = choose(logits, finished, best)
    finally:
        if was_training:
            model.train()


def _speculative_steps(model, input_ids, max_new_tokens: int, *, attention_mask: Tensor | None,
                       sampling: SamplingConfig, stop_tokens, seed: int | None, decoder_input_ids, compile: bool,
                       draft, stats) -> Iterator[Tensor]:
    """``stream`` with a draft (see ``formerkit.generation.speculative``): one prompt, each new token as a [1]
    tensor."""
    from formerkit.generation.speculative import SpeculativeDecoder, SpeculativeStats, as_draft

    if model.config.arch != "decoder" or decoder_input_ids is not None:
        raise InputError(f"draft: speculative decoding needs a decoder (arch is {model.config.arch!r})")
    if compile:
        raise InputError("draft: speculative decoding does not run a compiled decode step; pass compile=False")
    if stats is not None and not isinstance(stats, SpeculativeStats):
        raise InputError(f"draft_stats: expected a SpeculativeStats, got {type(stats).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed: expected an integer or None, got {seed!r}")
    prompt, _ = _as_ids(input_ids, "input_ids")
    if prompt.shape[0] != 1:
        raise InputError(f"draft: speculative decoding takes one prompt (batch 1), got a batch of {prompt.shape[0]}; "
                         "generate the prompts one by one")
    keep = _check_left_padded(attention_mask, tuple(prompt.shape), "attention_mask")
    # A single row's left padding changes nothing (padding is never attended to and positions count real tokens).
    ids = prompt[0] if keep is None else prompt[0][keep[0].to(prompt.device)]
    stops = _stop_set(stop_tokens, model.config.stem.vocab_size)
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    decoder = SpeculativeDecoder(model, ids.tolist(), max_new_tokens, as_draft(draft), sampling=sampling,
                                 stop_ids=frozenset(() if stops is None else stops.tolist()), generator=generator,
                                 stats=stats)
    for token, _ in decoder.tokens():
        yield torch.tensor([token], device=device)


def _start_token(config, given: int | None) -> int | None:
    """The decoder's start token: the one given, else the model's own (config.decoder_start_token_id)."""
    return given if given is not None else config.decoder_start_token_id


def _start_tokens(start: int | None, batch: int, vocab_size: int) -> Tensor:
    if start is None:
        raise InputError("decoder_start_token_id: an encoder_decoder model starts the target from a start token; "
                         "pass decoder_start_token_id=... or decoder_input_ids=..., or set the model's "
                         "config.decoder_start_token_id")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < vocab_size:
        raise InputError(f"decoder_start_token_id: expected a token id in [0, {vocab_size}), got {start!r}")
    return torch.full((batch, 1), start, dtype=torch.long)


def _check_source_mask(attention_mask: Tensor | None, shape: tuple[int, int]) -> Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or list(attention_mask.shape) != list(shape):
        got = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise InputError(f"attention_mask: expected shape {list(shape)} like the source ids, got {got}")
    return attention_mask


def generate(model, input_ids, max_new_tokens: int, *, attention_mask: Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: int | Iterable[int] | None = None, pad_token_id: int | None = None, seed: int | None = None,
             decoder_input_ids=None, decoder_start_token_id: int | None = None, compile: bool = False,
             draft=None, draft_stats=None) -> Tensor:
    """Generates up to ``max_new_tokens`` tokens after each prompt; returns prompt + new tokens [batch, tokens].

    input_ids: [batch, tokens] or [tokens] prompt ids (for an encoder_decoder: the source ids). Prompts of different
        lengths are left-padded, with ``attention_mask`` (1 = token, 0 = padding).
    temperature, top_k, top_p: how the next token is picked (temperature 0 = greedy; see ``SamplingConfig``).
    stop_tokens: a token id or ids that end a row; later tokens of that row are ``pad_token_id`` (default: the first
        stop token). Generation ends early when every row has stopped.
    seed: seeds a private random generator, so sampling is reproducible and leaves the global RNG alone.
    decoder_input_ids / decoder_start_token_id: encoder_decoder only, the target prompt (default: the start token
        alone; by default the model's config.decoder_start_token_id). The result is then the target prompt followed
        by the new tokens.
    compile: run each decode step compiled (fixed shapes, weights frozen into the compiled code): ahead of time by
        AOTInductor, or by ``torch.compile`` where that cannot. The first call compiles (tens of seconds); later
        calls with the same batch size reuse it, until a parameter changes. If compiling fails, decoding goes on
        without it (with a warning).
    draft: speculative decoding (decoders, one prompt; see ``formerkit.generation.speculative``): "ngram" (prompt
        lookup), a smaller formerkit model with the same vocabulary, or an ``NGramDraft`` / ``ModelDraft`` (which set
        how many tokens are guessed per pass). Greedy output is the model's own; sampled output follows the model's
        distribution (not the same draws as without a draft). ``draft_stats``: a ``SpeculativeStats`` that receives
        the counts of passes, guessed and kept tokens.
    """
    prompt = decoder_input_ids if model.config.arch == "encoder_decoder" else input_ids
    with torch.inference_mode():
        if draft is not None:
            steps = _speculative_steps(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                                       sampling=SamplingConfig(temperature, top_k, top_p), stop_tokens=stop_tokens,
                                       seed=seed, decoder_input_ids=decoder_input_ids, compile=compile, draft=draft,
                                       stats=draft_stats)
        else:
            steps = _steps(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                           temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
                           pad_token_id=pad_token_id, seed=seed, decoder_input_ids=decoder_input_ids,
                           decoder_start_token_id=decoder_start_token_id, compile=compile, between_steps=False)
        steps = list(steps)
        new_tokens = torch.stack(steps, dim=1) if steps else None
    if prompt is None:
        prompt = _start_tokens(_start_token(model.config, decoder_start_token_id),
                               _as_ids(input_ids, "input_ids")[0].shape[0], model.config.stem.vocab_size)
    prompt, single = _as_ids(prompt, "input_ids")
    prompt = prompt.to(next(model.parameters()).device)
    # The new tokens were made in inference mode; the result is an ordinary tensor.
    result = torch.cat([prompt, new_tokens], dim=1) if new_tokens is not None else prompt.clone()
    return result[0] if single else result
