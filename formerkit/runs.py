"""The run-directory API: a finished run (or a model directory a run saved) resolved, its model, recipe and tokenizer
loaded, its metrics on its held-out data, and text sampled from language models.

The tools that take a run (serve, export, compare, prune, quantize, distill, inspection, the HTML report) go through
this module, so where a run keeps its model is known in one place.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerkit.checkpoint import load, load_extra
from formerkit.data import build_data, load_tokenizer
from formerkit.errors import CheckpointError, InputError
from formerkit.models.early_exit import check_exit_model, check_threshold, early_exit
from formerkit.nn.tome import TokenMerging
from formerkit.train.config import TrainConfig
from formerkit.train.objectives import make_objective
from formerkit.train.trainer import evaluate_split

__all__ = ["evaluate_run", "generate_run", "generate_text", "load_run_model", "load_run_tokenizer", "model_dir",
           "sample_run"]


def model_dir(target: str | Path) -> Path:
    """The model directory of ``target``: a run directory's ``model/``, or ``target`` itself when it is a saved
    model."""
    target = Path(target)
    if (target / "model" / "config.json").exists():
        return target / "model"
    if (target / "config.json").exists():
        return target
    raise CheckpointError(f"{target}: neither a run directory (with model/) nor a saved model (with config.json)")


def load_run_model(target: str | Path):
    """(model, recipe TrainConfig, extra) of a run directory or of a model directory a run saved."""
    directory = model_dir(target)
    extra = load_extra(directory)
    if "recipe" not in extra:
        raise CheckpointError(f"{directory}: this model was not saved by a training run, so its data is unknown")
    return load(directory).eval(), TrainConfig.from_dict(extra["recipe"]), extra


class _AdaptiveClassifier(nn.Module):
    """A classifier called with token merging or early exit, looking to the objective like a plain model that
    returns logits; it counts the layers early exit used."""

    def __init__(self, model: nn.Module, merge_tokens, exit_threshold: float | None):
        super().__init__()
        if merge_tokens is not None:
            TokenMerging(model.config, merge_tokens)  # checks the model and the count before any data is read
        else:
            check_exit_model(model.config)
            check_threshold(exit_threshold)
        self.__dict__["model"] = model  # not a submodule: the objective calls this module for logits alone
        self.merge_tokens, self.exit_threshold = merge_tokens, exit_threshold
        self.layers_used = self.samples = 0

    def forward(self, inputs: Tensor) -> Tensor:
        if self.exit_threshold is None:
            return self.model(inputs, merge_tokens=self.merge_tokens)
        logits, layers_used = early_exit(self.model, inputs, self.exit_threshold)
        self.layers_used += int(layers_used.sum())
        self.samples += len(layers_used)
        return logits


def evaluate_run(target: str | Path, splits: list[str] | None = None, *, merge_tokens: int | list[int] | None = None,
                 exit_threshold: float | None = None) -> dict[str, Any]:
    """The recipe's metrics of a saved run on its held-out splits (all of them by default).

    Classification runs can be evaluated with token merging (``merge_tokens``, see ``formerkit.nn.tome``) or with
    early exit (``exit_threshold``, see ``formerkit.models.early_exit``; adds ``<split>_mean_layers``), not both.
    """
    model, recipe, extra = load_run_model(target)
    if recipe.objective.kind == "mae":
        raise CheckpointError(f"{target}: a masked-autoencoder pretraining run saves only its encoder, which has no "
                              "task metrics; evaluate the fine-tuning run instead")
    adaptive = None
    if merge_tokens is not None or exit_threshold is not None:
        if merge_tokens is not None and exit_threshold is not None:
            raise InputError("merge_tokens and exit_threshold: choose one (early exit runs unmerged layers)")
        if recipe.objective.kind != "classification":
            raise InputError(f"{target}: token merging and early exit serve classification runs, this run trained "
                             f"{recipe.objective.kind!r}")
        adaptive = _AdaptiveClassifier(model, merge_tokens, exit_threshold)
    bundle = build_data(recipe.data)
    objective = make_objective(recipe.objective, bundle)
    chosen = splits or [name for name in ("valid", "test") if getattr(bundle, name) is not None]
    metrics: dict[str, Any] = {}
    for split in chosen:
        if adaptive is None:
            metrics.update(evaluate_split(objective, model, bundle, split, recipe, torch.no_grad))
            continue
        adaptive.layers_used = adaptive.samples = 0
        metrics.update(evaluate_split(objective, adaptive, bundle, split, recipe, torch.no_grad))
        if exit_threshold is not None:
            metrics[f"{split}_mean_layers"] = adaptive.layers_used / max(adaptive.samples, 1)
    return metrics


def load_run_tokenizer(target: str | Path):
    """The tokenizer a run saved beside its model (run or model directory)."""
    path = model_dir(target) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the run saved no tokenizer, so text cannot be encoded")
    return load_tokenizer(path)


def generate_text(model, tokenizer, ids: list[int], *, max_new_tokens: int, temperature: float,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_tokens: list[int] | None = None, compile: bool = False) -> Iterator[str]:
    """Streams the text of each new token after the prompt ``ids`` (one piece per token; a byte tokenizer's
    characters are decoded incrementally, so a piece may be empty until its character is complete).

    Beyond the model's context (``max_seq_len``), generation goes on from the last half-context of text, encoded
    afresh, as often as needed.
    """
    ids = list(ids)
    context = model.config.max_seq_len
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.kind == "byte" else None
    shown = tokenizer.decode(ids) if decoder is None else ""
    remaining, segment = max_new_tokens, 0
    while remaining > 0:
        window = ids[-context:] if segment == 0 else ids[-(context // 2):]
        # The last new token is never fed back, so a window of n tokens can grow to context + 1.
        count = min(remaining, context + 1 - len(window))
        remaining -= count
        for index, token in enumerate(model.stream(
                torch.tensor([window]), count, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=None if seed is None else seed + segment, stop_tokens=stop_tokens, compile=compile)):
            next_id = int(token[0])
            ids.append(next_id)
            stopped = stop_tokens is not None and next_id == stop_tokens[0]
            if decoder is not None:
                # The last token flushes the decoder: a trailing incomplete character shows as a replacement mark.
                last = stopped or (remaining == 0 and index + 1 == count)
                yield decoder.decode(bytes([next_id]), final=last)
            else:
                text = tokenizer.decode(ids)
                yield text[len(shown):]
                shown = text
            if stopped:
                return
        segment += 1


def generate_run(target: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop: str | None = None, compile: bool = False) -> Iterator[str]:
    """Streams text generated by a language-model run (or a model directory a run saved), using the tokenizer saved
    with it and the key/value cache (see ``generate_text``). ``stop`` is a text of one token that ends the
    generation; ``compile`` compiles the decode step (see ``formerkit.generation.generate``)."""
    model, recipe, extra = load_run_model(target)
    if model.config.head.kind != "lm" or model.config.arch != "decoder":
        raise CheckpointError(f"{target}: generation needs a decoder language model, this run trained "
                              f"{recipe.objective.kind!r}")
    tokenizer = load_run_tokenizer(target)
    ids = tokenizer.encode(prompt) or [tokenizer.encode("\n")[0]]
    stop_tokens = None
    if stop:
        stop_tokens = tokenizer.encode(stop)
        if len(stop_tokens) != 1:
            raise InputError(f"--stop: {stop!r} is {len(stop_tokens)} tokens for this tokenizer; it must be one")
    yield from generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, compile=compile)


sample_run = generate_run  # the name issue 3's command used
