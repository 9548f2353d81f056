"""One ``TokenRequest`` decoded alone: the simplest engine behind the serving seam (``formerkit.generation.requests``).

``decode_sequence`` runs the prompt through the model into a ``KVCache``, then feeds one token at a time, reporting a
``TokenEvent`` per new token. The log-probabilities it reports are the model's own ``log_softmax`` over the whole
vocabulary, before temperature or truncation; the token is picked as ``generate`` picks it (``SamplingConfig.pick``
with a generator seeded by the request's seed), so a seeded request gives what ``model.generate(..., seed=seed)``
gives for that prompt alone. A continuous-batching engine steps many sequences together behind the same seam.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from formerkit.errors import InputError
from formerkit.generation.requests import TokenEvent, TokenRequest
from formerkit.nn.cache import KVCache

__all__ = ["decode_sequence"]


def decode_sequence(model, request: TokenRequest, cancelled: threading.Event | None = None) -> Iterator[TokenEvent]:
    """The events of ``request`` decoded alone (call it in the thread that owns the model). It stops early, without
    a last event, once ``cancelled`` is set; and with finish_reason "length" when the model's context is full."""
    config = model.config
    if config.arch != "decoder" or config.head.kind != "lm":
        raise InputError(f"decode_sequence: needs a decoder with an lm head, this model is arch {config.arch!r} "
                         f"with head {config.head.kind!r}")
    vocab = config.stem.vocab_size
    if any(not 0 <= token < vocab for token in request.ids):
        raise InputError(f"ids: expected token ids in [0, {vocab})")
    limit = config.max_seq_len
    count = request.max_new_tokens
    if limit is not None:
        if len(request.ids) > limit:
            raise InputError(f"ids: {len(request.ids)} prompt tokens exceed the model's context of {limit}")
        # The last new token is never fed back, so a prompt of n tokens can grow to limit + 1.
        count = min(count, limit + 1 - len(request.ids))
    device = next(model.parameters()).device
    generator = None if request.seed is None else torch.Generator(device=device).manual_seed(request.seed)
    with torch.inference_mode():
        prompt = torch.tensor([request.ids], dtype=torch.long, device=device)
        length = len(request.ids) + count - 1
        if getattr(model, "input_prompt", None) is not None:  # prompt tuning: the virtual tokens are cached too
            virtual = model.input_prompt()
            length += 0 if virtual is None else virtual.shape[0]
        # Full-length buffers for sliding-window layers too (rolling=False): the prompt then goes in one piece.
        cache = KVCache.for_model(model, 1, length, rolling=False)
        logits = model(prompt, cache=cache, logits_to_keep=1)[:, -1]
        for step in range(count):
            if cancelled is not None and cancelled.is_set():
                return
            token = request.sampling.pick(logits, generator)
            chosen = int(token[0])
            logprob = top = None
            if request.logprobs is not None:
                logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                logprob = float(logprobs[chosen])
                if request.logprobs > 0:
                    values, indices = logprobs.topk(min(request.logprobs, vocab))
                    top = tuple((int(index), float(value)) for index, value in zip(indices, values))
            finish = "stop" if chosen in request.stop_ids else "length" if step + 1 == count else None
            yield TokenEvent(chosen, logprob, top, finish)
            if finish is not None:
                return
            logits = model(token.view(1, 1), cache=cache, logits_to_keep=1)[:, -1]
