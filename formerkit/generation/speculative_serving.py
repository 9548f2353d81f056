"""Speculative decoding of one serving request (see ``formerkit.generation.speculative``): the function a serving
engine calls for a batch-1 request when the server has a draft."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from formerkit.generation.requests import TokenEvent, TokenRequest
from formerkit.generation.speculative import SpeculativeDecoder, as_draft

__all__ = ["speculative_events"]


def speculative_events(model, request: TokenRequest, draft) -> Iterator[TokenEvent]:
    """One request decoded speculatively (batch 1, alone), as the serving engine's ``TokenEvent``s: the seam for
    ``formerkit serve --draft``. ``draft``: see ``as_draft`` (a model, "ngram", a ``NGramDraft`` / ``ModelDraft``);
    build it once and pass it to every request (it keeps no state between generations). The request's prompt plus
    max_new_tokens must fit the model's context (as for plain decoding); finish_reason is "stop" after a stop token,
    else "length"."""
    generator = None
    if request.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(request.seed)
    decoder = SpeculativeDecoder(model, list(request.ids), request.max_new_tokens, as_draft(draft),
                                 sampling=request.sampling, stop_ids=request.stop_ids, generator=generator)
    made = 0
    for token, logits in decoder.tokens():
        made += 1
        logprob = top = None
        if request.logprobs is not None:
            # The model's own log-softmax, before temperature or truncation (as TokenEvent documents).
            logprobs = logits.float().log_softmax(dim=-1)
            logprob = float(logprobs[token])
            if request.logprobs > 0:
                values, ids = logprobs.topk(min(request.logprobs, logprobs.shape[-1]))
                top = tuple(zip(ids.tolist(), values.tolist()))
        finish = "stop" if token in request.stop_ids else "length" if made == request.max_new_tokens else None
        yield TokenEvent(token=token, logprob=logprob, top_logprobs=top, finish_reason=finish)
