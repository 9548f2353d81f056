"""Masked generation: training masks drawn from a schedule, and iterative parallel unmasking (MaskGIT's decoding).

A bidirectional model sees a sequence where some tokens are replaced by [MASK] and predicts every position. Training
hides a random fraction of the tokens (``masking_ratio``, ``random_mask``); generation starts from all [MASK] and,
over N steps, commits the predictions it is most sure of, so that the number still masked follows a schedule
(``still_masked``), re-predicting the rest with the growing context (``iterative_unmask``).

- MaskGIT (Chang et al., 2022, "MaskGIT: Masked Generative Image Transformer"): the masking ratio of a training
  example is gamma(u) = cos(pi/2 * u), u ~ U(0, 1); decoding keeps the cosine schedule, ranks the positions by the
  probability of the token sampled there plus Gumbel noise annealed to 0 over the steps ("choice temperature"), and
  never re-masks a committed token.
- Masked diffusion language models (Sahoo et al., 2024, MDLM; Shi et al., 2024; Nie et al., 2025, LLaDA): the
  linear schedule alpha_t = 1 - t masks each token with probability t; their samplers reveal the same expected number
  of tokens at each of N equal time steps (``schedule="linear"``), in a random order (the ancestral sampler) or by
  confidence (LLaDA's low-confidence remasking).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from formerkit.errors import InputError

__all__ = ["SCHEDULES", "UNMASK_ORDERS", "cosine_masking_ratio", "gumbel_noise", "guided_logits", "iterative_unmask",
           "masked_count", "random_mask", "still_masked", "unmask_continuation"]

SCHEDULES = ("cosine", "linear")
UNMASK_ORDERS = ("confidence", "random")


def cosine_masking_ratio(u: Tensor) -> Tensor:
    """MaskGIT's training masking ratio gamma(u) = cos(pi/2 * u) for u in [0, 1]: a ratio near 1 (almost all masked)
    is as likely as the first decoding steps make it, near 0 as likely as the last ones."""
    return torch.cos(math.pi / 2 * u)


def masked_count(ratio: Tensor, length: int) -> Tensor:
    """How many of ``length`` tokens a masking ratio hides: ceil(ratio * length), at least 1 (an example with
    nothing masked would teach nothing) and at most ``length``."""
    return torch.ceil(ratio.double() * length).long().clamp(1, length)


def random_mask(counts: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """A bool mask [batch, length], True at ``counts[i]`` positions of row i chosen uniformly at random (the
    positions of the smallest of ``length`` uniform draws)."""
    scores = torch.rand(len(counts), length, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts.view(-1, 1).to(ranks.device)


def still_masked(length: int, steps: int, schedule: str = "cosine") -> list[int]:
    """The number of the ``length`` tokens still masked after each of ``steps`` decoding steps (step t = 1..N):
    floor(length * cos(pi/2 * t/N)) for ``cosine`` (MaskGIT), floor(length * (1 - t/N)) for ``linear`` (a masked
    diffusion LM's alpha_t = 1 - t). Non-increasing, and 0 after the last step; a step may reveal no token when
    ``steps`` exceeds what the schedule can spread over ``length`` tokens."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected an integer >= 1, got {steps!r}")
    if schedule not in SCHEDULES:
        raise InputError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    counts = []
    for step in range(1, steps + 1):
        fraction = math.cos(math.pi / 2 * step / steps) if schedule == "cosine" else 1 - step / steps
        counts.append(0 if step == steps else min(length, math.floor(length * fraction)))
    return counts


def gumbel_noise(shape, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel draws -log(-log U): argmax(logits + noise) samples softmax(logits) (the Gumbel-max trick)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-20, 1 - 1e-12)
    return -torch.log(-torch.log(u)).float()


def guided_logits(model: Callable[[Tensor], Tensor], conditional: Tensor, unconditional: Tensor | None,
                  guidance: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022) on logits: u + g * (c - u), c the model's logits given the
    condition, u given the null condition. At g = 1 this is c, computed in one pass (the unconditional inputs are not
    run); otherwise both inputs go through the model as one batch."""
    if guidance == 1.0 or unconditional is None:
        return model(conditional)
    both = model(torch.cat([conditional, unconditional]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def iterative_unmask(predict: Callable[[Tensor], Tensor], tokens: Tensor, masked: Tensor, *, steps: int,
                     schedule: str = "cosine", order: str = "confidence", temperature: float = 1.0,
                     choice_temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Fills the ``masked`` positions of ``tokens`` [batch, seq] in ``steps`` parallel steps and returns the tokens.

    predict: the model's logits [batch, seq, vocab] for a token batch, over the tokens it may write (the [MASK] id
        and any condition tokens left out).
    masked: bool [batch, seq], the positions to generate; every row the same count L (the schedule is per row).
    At step t every masked position draws a token from softmax(logits / temperature) (its argmax at temperature 0);
    the positions then rank by confidence: the log-probability of the drawn token (``order="confidence"``) or a
    uniform draw (``"random"``), plus Gumbel noise times ``choice_temperature * (1 - t/N)`` (MaskGIT's annealed
    randomness). The ``still_masked(L, steps, schedule)[t]`` lowest stay masked; the others keep their drawn token
    for good (committed positions rank above every masked one, so they never change).
    """
    if tokens.shape != masked.shape:
        raise InputError(f"masked: expected the tokens' shape {list(tokens.shape)}, got {list(masked.shape)}")
    if order not in UNMASK_ORDERS:
        raise InputError(f"order: expected one of {', '.join(UNMASK_ORDERS)}, got {order!r}")
    if temperature < 0 or choice_temperature < 0:
        name = "temperature" if temperature < 0 else "choice_temperature"
        raise InputError(f"{name}: expected a number >= 0, got {min(temperature, choice_temperature)}")
    counts = masked.sum(dim=1)
    if len(counts) and bool((counts != counts[0]).any()):
        raise InputError(f"masked: every row must hold the same number of masked positions, got {counts.tolist()}")
    length = int(counts[0]) if len(counts) else 0
    tokens, masked = tokens.clone(), masked.clone()
    for step, remaining in enumerate(still_masked(length, steps, schedule), start=1):
        logits = predict(tokens).float()
        if temperature == 0:
            drawn = logits.argmax(dim=-1)
        else:
            drawn = (logits / temperature + gumbel_noise(logits.shape, generator).to(logits.device)).argmax(dim=-1)
        if order == "confidence":
            confidence = logits.log_softmax(dim=-1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        else:
            confidence = torch.rand(drawn.shape, generator=generator).to(logits.device).log()
        anneal = choice_temperature * (1 - step / steps)
        if anneal:
            confidence = confidence + anneal * gumbel_noise(confidence.shape, generator).to(logits.device)
        confidence = confidence.masked_fill(~masked, math.inf)
        stay = torch.zeros_like(masked)
        if remaining:
            stay.scatter_(1, confidence.topk(remaining, dim=1, largest=False).indices, True)
        tokens = torch.where(masked & ~stay, drawn, tokens)
        masked = stay
    return tokens


@torch.no_grad()
def unmask_continuation(model, prompt: Tensor, new_tokens: int, *, steps: int, order: str = "confidence",
                        temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """A masked diffusion LM's continuation of ``prompt`` (ids [batch, P]): ``new_tokens`` [MASK] ids appended and
    filled in ``steps`` steps on the linear schedule (``iterative_unmask``; ``order``: ``confidence`` is LLaDA's
    low-confidence remasking, ``random`` the ancestral order). The model's vocabulary ends with [MASK] (the
    masked_diffusion_lm objective's layout), which is never written. The prompt is cut from the left to leave room in
    the model's context (``max_seq_len``). Returns the new ids [batch, new_tokens]."""
    context = model.config.max_seq_len
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise InputError(f"max_new_tokens: expected an integer >= 1, got {new_tokens!r}")
    if context is not None and new_tokens > context:
        raise InputError(f"max_new_tokens: at most the model's context ({context}) for a masked diffusion LM, which "
                         f"writes every new token in one window; got {new_tokens}")
    mask_id = model.config.stem.vocab_size - 1
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    if context is not None:
        prompt = prompt[:, max(0, prompt.shape[1] - (context - new_tokens)):]
    tokens = torch.cat([prompt, torch.full((len(prompt), new_tokens), mask_id, dtype=torch.long, device=device)], 1)
    masked = torch.zeros_like(tokens, dtype=torch.bool)
    masked[:, prompt.shape[1]:] = True
    was_training = model.training
    model.eval()
    try:
        filled = iterative_unmask(lambda ids: model(ids)[..., :mask_id], tokens, masked, steps=steps,
                                  schedule="linear", order=order, temperature=temperature, generator=generator)
    finally:
        model.train(was_training)
    return filled[:, prompt.shape[1]:]
