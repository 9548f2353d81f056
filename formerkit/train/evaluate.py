"""Using a finished run: metrics on its held-out data, and text sampled from language models."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from formerkit.errors import CheckpointError

__all__ = ["evaluate_run", "load_run_model", "sample_run"]


def _model_dir(target: str | Path) -> Path:
    target = Path(target)
    if (target / "model" / "config.json").exists():
        return target / "model"
    if (target / "config.json").exists():
        return target
    raise CheckpointError(f"{target}: neither a run directory (with model/) nor a saved model (with config.json)")


def load_run_model(target: str | Path):
    """(model, recipe TrainConfig, extra) of a run directory or of a model directory a run saved."""
    from formerkit.checkpoint import load, load_extra
    from formerkit.train.config import TrainConfig

    directory = _model_dir(target)
    extra = load_extra(directory)
    if "recipe" not in extra:
        raise CheckpointError(f"{directory}: this model was not saved by a training run, so its data is unknown")
    return load(directory).eval(), TrainConfig.from_dict(extra["recipe"]), extra


def evaluate_run(target: str | Path, splits: list[str] | None = None) -> dict[str, Any]:
    """The recipe's metrics of a saved run on its held-out splits (all of them by default)."""
    from formerkit.data import build_data
    from formerkit.train.objectives import make_objective
    from formerkit.train.trainer import _evaluate

    model, recipe, extra = load_run_model(target)
    if recipe.objective.kind == "mae":
        raise CheckpointError(f"{target}: a masked-autoencoder pretraining run saves only its encoder, which has no "
                              "task metrics; evaluate the fine-tuning run instead")
    bundle = build_data(recipe.data)
    objective = make_objective(recipe.objective, bundle)
    chosen = splits or [name for name in ("valid", "test") if getattr(bundle, name) is not None]
    metrics: dict[str, Any] = {}
    for split in chosen:
        metrics.update(_evaluate(objective, model, bundle, split, recipe, torch.no_grad))
    return metrics


def sample_run(target: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int | None = None, seed: int = 0) -> Iterator[str]:
    """Streams text sampled from a language-model run (a plain recompute-everything loop)."""
    from formerkit.data import load_tokenizer

    model, recipe, extra = load_run_model(target)
    if model.config.head.kind != "lm" or model.config.arch != "decoder":
        raise CheckpointError(f"{target}: sampling needs a decoder language model, this run trained "
                              f"{recipe.objective.kind!r}")
    tokenizer = load_tokenizer(_model_dir(target) / "tokenizer.json")
    ids = tokenizer.encode(prompt) or [tokenizer.encode("\n")[0]]
    generator = torch.Generator().manual_seed(seed)
    context = model.config.max_seq_len
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.kind == "byte" else None
    shown = tokenizer.decode(ids) if decoder is None else ""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids[-context:]]))[0, -1].float()
            if temperature <= 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    threshold = logits.topk(min(top_k, len(logits))).values[-1]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            ids.append(next_id)
            if decoder is not None:
                yield decoder.decode(bytes([next_id]))
            else:
                text = tokenizer.decode(ids)
                yield text[len(shown):]
                shown = text
