"""The run-directory API: a finished run (or a model directory a run saved) resolved, its model, recipe and tokenizer
loaded, its metrics on its held-out data, text sampled from language models, and raw inputs (images, prompts, recent
values of a series) preprocessed as the run's training preprocessed its data (``image_input``, ``prompt_ids``,
``series_input``; ``formerkit.predict`` maps raw inputs to predictions with them).

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
from formerkit.data.files import image_to_tensor, read_image
from formerkit.data.images import normalize_images
from formerkit.errors import CheckpointError, InputError
from formerkit.models.early_exit import check_exit_model, check_threshold, early_exit
from formerkit.nn.tome import TokenMerging
from formerkit.train.config import TrainConfig
from formerkit.train.objectives import make_objective
from formerkit.train.trainer import evaluate_split

__all__ = ["check_language_model", "denormalize_forecast", "evaluate_run", "generate_masked_text", "generate_run",
           "generate_text", "generation_defaults", "image_input", "image_pixels", "load_draft", "load_run_model",
           "load_run_tokenizer", "model_dir", "prompt_ids", "run_objective", "sample_run", "series_input", "stop_ids"]


def model_dir(target: str | Path) -> Path:
    """The model directory of ``target``: a run directory's ``model/``, or ``target`` itself when it is a saved
    model."""
    target = Path(target)
    if (target / "model" / "config.json").exists():
        return target / "model"
    if (target / "config.json").exists():
        return target
    raise CheckpointError(f"{target}: neither a run directory (with model/) nor a saved model (with config.json)")


def load_run_model(target: str | Path, *, imported: bool = False):
    """(model, recipe TrainConfig, extra) of a run directory or of a model directory a run saved.

    With ``imported``, a model converted from another format (``formerkit convert --from-hf``) loads too, with
    ``None`` for its recipe: the tools that need only the model and its tokenizer (generate, serve, predict,
    inspect) take it; the task is ``run_objective``'s.
    """
    directory = model_dir(target)
    extra = load_extra(directory)
    if "recipe" not in extra:
        if imported and "imported" in extra:
            return load(directory).eval(), None, extra
        what = ("was converted from another format, so it has no training data to evaluate on" if "imported" in extra
                else "was not saved by a training run, so its data is unknown")
        raise CheckpointError(f"{directory}: this model {what}")
    return _with_adapters(load(directory), directory, extra).eval(), TrainConfig.from_dict(extra["recipe"]), extra


def _with_adapters(model, directory: Path, extra: dict[str, Any]):
    """A run whose adapters could not be merged saved the base and, beside it, the adapters (extra "adapters"):
    they go back on here (formerkit.train.trainer.save_run_model)."""
    if extra.get("adapters"):
        from formerkit.adapt import load_adapters

        load_adapters(model, directory / extra["adapters"])
    return model


def run_objective(recipe, extra: dict[str, Any]) -> str | None:
    """The task of a loaded run: its recipe's objective, or for an imported model the one recorded at conversion
    ("causal_lm" for a decoder language model, None for the others)."""
    return recipe.objective.kind if recipe is not None else extra.get("objective")


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

    def forward(self, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.exit_threshold is None:
            return self.model(inputs, merge_tokens=self.merge_tokens, attention_mask=attention_mask)
        if attention_mask is not None:
            raise InputError("exit_threshold: early exit takes inputs without padding (images), not padded texts")
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
    """The tokenizer a run saved beside its model (run or model directory), or the one a converted checkpoint
    brought (its tokenizer.json and tokenizer_config.json, as an ``hf`` tokenizer)."""
    path = model_dir(target) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the run saved no tokenizer (or the converted checkpoint had none), "
                              "so text cannot be encoded")
    return load_tokenizer(path)


# formerkit generate's own defaults, for models whose extra records no generation config.
DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE = 200, 0.8


def generation_defaults(extra: dict[str, Any], tokenizer=None) -> dict[str, Any]:
    """The sampling settings a model generates with when the caller gives none: an imported checkpoint's
    generation_config.json read as transformers reads it (greedy unless ``do_sample``; its temperature, top_k, top_p,
    max_new_tokens), else formerkit's (temperature 0.8, 200 new tokens); and ``stop_tokens``, the end-of-sequence ids
    of the generation config or, without one, of the tokenizer (an imported tokenizer's eos_token)."""
    generation = extra.get("generation")
    defaults: dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": DEFAULT_TEMPERATURE,
                                "top_k": None, "top_p": None, "stop_tokens": None}
    if isinstance(generation, dict):
        sample = bool(generation.get("do_sample", False))
        defaults["temperature"] = float(generation.get("temperature", 1.0) or 0.0) if sample else 0.0
        top_k, top_p = generation.get("top_k", 50), generation.get("top_p", 1.0)
        defaults["top_k"] = int(top_k) if sample and top_k else None
        defaults["top_p"] = float(top_p) if sample and top_p is not None and top_p < 1.0 else None
        if isinstance(generation.get("max_new_tokens"), int):
            defaults["max_new_tokens"] = generation["max_new_tokens"]
        eos = generation.get("eos_token_id")
        if eos is not None:
            defaults["stop_tokens"] = [int(token) for token in (eos if isinstance(eos, list) else [eos])]
    if defaults["stop_tokens"] is None and tokenizer is not None and hasattr(tokenizer, "special_id"):
        eos = tokenizer.special_id("eos_token")
        defaults["stop_tokens"] = None if eos is None else [eos]
    return defaults


def generate_text(model, tokenizer, ids: list[int], *, max_new_tokens: int, temperature: float,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_tokens: list[int] | None = None, compile: bool = False, draft=None) -> Iterator[str]:
    """Streams the text of each new token after the prompt ``ids`` (one piece per token; a byte tokenizer's
    characters are decoded incrementally, so a piece may be empty until its character is complete). ``draft``:
    speculative decoding (see ``formerkit.generation.generate`` and ``load_draft``).

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
                seed=None if seed is None else seed + segment, stop_tokens=stop_tokens, compile=compile,
                draft=draft)):
            next_id = int(token[0])
            ids.append(next_id)
            stopped = stop_tokens is not None and next_id in stop_tokens
            # The last token flushes what is held back: a trailing incomplete character shows as a replacement mark.
            last = stopped or (remaining == 0 and index + 1 == count)
            if decoder is not None:
                yield decoder.decode(bytes([next_id]), final=last)
            else:
                text = tokenizer.decode(ids)
                if text.endswith("\ufffd") and not last:
                    # A byte-level BPE token may end inside a character: hold its piece back until the character
                    # is complete, so the pieces add up to the decoded text (what transformers' pipeline shows).
                    yield ""
                    continue
                yield text[len(shown):]
                shown = text
            if stopped:
                return
        segment += 1


def generate_run(target: str | Path, prompt: str, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: str | None = None, compile: bool = False, draft: str | Path | None = None,
                 draft_tokens: int | None = None, steps: int | None = None) -> Iterator[str]:
    """Streams text generated by a language-model run (or a model directory a run saved, or a checkpoint converted
    with ``formerkit convert --from-hf``), using the tokenizer saved with it and the key/value cache (see
    ``generate_text``). Settings left at None take the model's defaults (``generation_defaults``: an imported
    checkpoint's generation config, else 200 new tokens at temperature 0.8); generation ends at the end-of-sequence
    tokens a converted checkpoint names, and at ``stop``, a text of one token. ``compile`` compiles the decode step
    (see ``formerkit.generation.generate``). ``draft``: speculative decoding with "ngram" (prompt lookup) or a
    smaller language-model run with the same tokenizer, guessing ``draft_tokens`` tokens per pass (see
    ``load_draft``).

    A masked diffusion LM run (objective masked_diffusion_lm) writes its continuation in ``steps`` unmasking steps
    instead (default: one per 4 new tokens; see ``generate_masked_text``), yielded as one piece."""
    model, recipe, extra = load_run_model(target, imported=True)
    if run_objective(recipe, extra) == "masked_diffusion_lm":
        if top_k is not None or top_p is not None or stop or compile or draft is not None:
            given = next(name for name, value in (("top_k", top_k), ("top_p", top_p), ("stop", stop),
                                                  ("compile", compile), ("draft", draft)) if value)
            raise InputError(f"{given}: not available for a masked diffusion LM (it writes every new token at once); "
                             "it takes max_new_tokens, temperature, steps and seed")
        yield generate_masked_text(model, recipe, load_run_tokenizer(target), prompt, seed=seed, steps=steps,
                                   max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                                   temperature=1.0 if temperature is None else temperature)
        return
    if steps is not None:
        raise InputError("steps: only masked diffusion LMs generate in steps; this run trained "
                         f"{run_objective(recipe, extra)!r}")
    check_language_model(model, run_objective(recipe, extra), target)
    tokenizer = load_run_tokenizer(target)
    draft = None if draft is None else load_draft(target, draft, num_tokens=draft_tokens)
    defaults = generation_defaults(extra, tokenizer)
    if top_k is None and top_p is None:  # a caller's top_k or top_p replaces both defaults
        top_k, top_p = defaults["top_k"], defaults["top_p"]
    stops = list(stop_ids(tokenizer, stop) or []) + list(defaults["stop_tokens"] or [])
    yield from generate_text(model, tokenizer, prompt_ids(tokenizer, prompt),
                             max_new_tokens=defaults["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
                             temperature=defaults["temperature"] if temperature is None else temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stops or None, compile=compile,
                             draft=draft)


def load_draft(target: str | Path, draft: str | Path, *, num_tokens: int | None = None):
    """The speculative-decoding proposer for the language-model run ``target`` (see
    ``formerkit.generation.speculative``): "ngram" (prompt lookup, ``NGramDraft``), or the directory of a smaller
    language-model run (or saved model) whose tokenizer is the target's (``ModelDraft``). ``num_tokens``: tokens
    guessed per pass of the target (default: the proposer's). Build it once: it keeps no state between generations
    and serves every request."""
    from formerkit.generation.speculative import ModelDraft, NGramDraft

    options = {} if num_tokens is None else {"num_tokens": num_tokens}
    if str(draft) == "ngram":
        return NGramDraft(**options)
    model, recipe, extra = load_run_model(draft, imported=True)
    check_language_model(model, run_objective(recipe, extra), draft)
    # Same token ids must mean the same text: the tokenizers must be the same, not just the vocabulary sizes.
    mine, theirs = model_dir(target) / "tokenizer.json", model_dir(draft) / "tokenizer.json"
    if not (mine.exists() and theirs.exists()) or mine.read_bytes() != theirs.read_bytes():
        raise InputError(f"draft: {draft} does not share {target}'s tokenizer ({theirs} differs from {mine}); a "
                         "draft model must use the same tokenizer")
    return ModelDraft(model.eval(), **options)


sample_run = generate_run  # the name issue 3's command used


def generate_masked_text(model, recipe, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                         steps: int | None = None, seed: int = 0) -> str:
    """A masked diffusion LM's continuation of ``prompt``: ``max_new_tokens`` tokens filled in ``steps`` steps
    (default max_new_tokens // 4, at least 1) in the order the run's objective.unmask_order names (see
    ``formerkit.generation.masked.unmask_continuation``), decoded."""
    from formerkit.generation.masked import unmask_continuation

    steps = max(1, max_new_tokens // 4) if steps is None else steps
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    new = unmask_continuation(model, ids, max_new_tokens, steps=steps, order=recipe.objective.unmask_order,
                              temperature=temperature, generator=generator)
    return tokenizer.decode(new[0].tolist())


def check_language_model(model, objective: str | None, target) -> None:
    """Refuses (CheckpointError) a run whose model is not a decoder language model (``objective``: the run's
    task, see ``run_objective``)."""
    if model.config.head.kind != "lm" or model.config.arch != "decoder":
        trained = f"this run trained {objective!r}" if objective else "this model is not one"
        raise CheckpointError(f"{target}: generation needs a decoder language model, {trained}")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids a prompt is generated from: its encoding, or a newline's for an empty prompt."""
    return tokenizer.encode(prompt) or [tokenizer.encode("\n")[0]]


def stop_ids(tokenizer, stop: str | None, *, name: str = "--stop") -> list[int] | None:
    """The one token of a stop text (None without one); InputError naming ``name`` when it is not one token."""
    if not stop:
        return None
    ids = tokenizer.encode(stop)
    if len(ids) != 1:
        raise InputError(f"{name}: {stop!r} is {len(ids)} tokens for this tokenizer; it must be one")
    return ids


# ----- raw inputs preprocessed as in training (``preprocessing`` is the record a run saved in its model's extra)


def image_pixels(picture, preprocessing: dict) -> Tensor:
    """A PIL image as the model's image folders were read for training: grayscale or RGB as the model takes it,
    resized to the training size (Pillow, bilinear), 0-255 taken as [0, 1]: a float tensor [C, H, W]."""
    channels = preprocessing["in_channels"]
    picture, _ = read_image(picture, tuple(preprocessing["image_size"]), gray=channels == 1)
    return image_to_tensor(picture.convert("RGB") if channels == 3 else picture, channels).float() * (1 / 255)


def image_input(image, preprocessing: dict, *, name: str = "image") -> Tensor:
    """The model's input [C, H, W] for one image: a PIL image (see ``image_pixels``), or an array (tensor, NumPy
    array or nested list) [C, H, W] or [H, W] in the data source's raw units, which is scaled, resized (bilinear)
    and normalized as in training. InputError, naming ``name``, for an image the model cannot take."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        values = image_pixels(image, preprocessing)
    else:
        try:
            values = torch.as_tensor(image, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InputError(f"{name}: expected an image or a nested list of numbers [C][H][W] or [H][W] ({error})") \
                from None
        if values.dim() == 2:
            values = values.unsqueeze(0)
        if values.dim() != 3:
            raise InputError(f"{name}: expected [C][H][W] or [H][W], got {values.dim()} dimensions")
        values = values * preprocessing["scale"]
    channels = preprocessing["in_channels"]
    if values.shape[0] != channels:
        raise InputError(f"{name}: the model takes {channels} channel(s), got {values.shape[0]}")
    if min(values.shape[1:]) < 2 or max(values.shape[1:]) > 4096:
        raise InputError(f"{name}: {list(values.shape[1:])} pixels; expected sides between 2 and 4096")
    if not torch.isfinite(values).all():
        raise InputError(f"{name}: values must be finite numbers")
    size = tuple(preprocessing["image_size"])
    if tuple(values.shape[1:]) != size:
        values = torch.nn.functional.interpolate(values[None], size=size, mode="bilinear", align_corners=False)[0]
    return normalize_images(values[None], preprocessing["mean"], preprocessing["std"])[0]


def series_input(values, preprocessing: dict, *, name: str = "values") -> Tensor:
    """The model's input [window, columns] for a forecast: the last ``window`` rows of ``values`` (a tensor, NumPy
    array or nested list [steps, columns], or [steps] for one column, in the series' own units), normalized with the
    training part's mean and standard deviation. InputError, naming ``name``, for values the model cannot take."""
    columns, window = preprocessing["columns"], preprocessing["window"]
    try:
        series = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{name}: expected numbers [steps][columns] ({error})") from None
    if series.dim() == 1 and len(columns) == 1:
        series = series.unsqueeze(1)
    if series.dim() != 2 or series.shape[1] != len(columns):
        raise InputError(f"{name}: expected [steps][{len(columns)}] values (columns {', '.join(columns)}), got shape "
                         f"{list(series.shape)}")
    if len(series) < window:
        raise InputError(f"{name}: the model forecasts from the last {window} steps, got {len(series)}")
    if not torch.isfinite(series).all():
        raise InputError(f"{name}: values must be finite numbers")
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float64)
    std = torch.tensor(preprocessing["std"], dtype=torch.float64)
    return ((series[-window:] - mean) / std).float()


def denormalize_forecast(output: Tensor, preprocessing: dict) -> Tensor:
    """A forecaster's output [batch, horizon * columns] as forecasts [batch, horizon, columns] in the series' units."""
    columns = len(preprocessing["columns"])
    forecast = output.double().reshape(len(output), preprocessing["horizon"], columns)
    std = torch.tensor(preprocessing["std"], dtype=torch.float64)
    return forecast * std + torch.tensor(preprocessing["mean"], dtype=torch.float64)
