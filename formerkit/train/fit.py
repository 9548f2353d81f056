"""``formerkit.fit``: train a model you hold on data you hold, with the trainer a recipe runs.

    result = formerkit.fit(model, tokens, eval_data=held_out, steps=200, batch_size=16, lr=3e-4, out_dir="runs/mine")
    result.model, result.metrics          # the model, trained in place; the last evaluation ({"valid_loss": ...})

The data is read once into memory (a tensor, a ``Dataset`` or a ``DataLoader``: the loader's dataset in order, through
its ``collate_fn``) and batches are then drawn exactly as a recipe's are, as a function of (seed, step): the same data
and seed give the same weights whichever form it came in, and a run stopped at any step (``stop_after``, SIGINT,
SIGTERM) continues exactly when ``fit`` is called again with the same ``out_dir``. A signal stops the loop after its
step and checkpoint, then reaches the caller (SIGINT as KeyboardInterrupt, SIGTERM as SystemExit). Everything else is
the recipe trainer's own loop (``formerkit.train.trainer.run_loop``): checkpoints, metrics.jsonl, the progress bar,
EMA, the warm-up and cosine schedule, evaluation every ``eval_every`` steps. Only parameters with ``requires_grad``
are optimized, so a model given adapters (``formerkit.add_adapters``) trains its adapters only.

What ``train_data`` holds depends on the objective, inferred from the model's head unless ``objective`` names it:

- ``causal_lm`` (an ``lm`` head, decoder): token ids [N, T] (int), each row T tokens: T - 1 predictions, T - 1 at most
  the model's ``max_seq_len``; ``masked_lm`` (a ``masked_lm`` head): the same rows, the model's last vocabulary id
  being [MASK] (as a recipe's masked-LM model has it);
- ``classification``: ``(inputs, labels)`` pairs, labels int in [0, num_classes);
- ``regression`` (a ``regression`` head): ``(inputs, targets)`` pairs, targets float with ``output_dim`` values each.

Without ``out_dir`` the run lives in a temporary directory removed at the end (nothing to resume from).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from formerkit.data.base import ArraySplit, DataBundle
from formerkit.errors import ConfigError, InputError
from formerkit.train import distributed
from formerkit.train.config import EvalConfig, ObjectiveConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from formerkit.train.objectives import make_objective
from formerkit.train.state import latest_checkpoint
from formerkit.train.trainer import RunError, run_loop

__all__ = ["FitResult", "fit"]

# The objective a model's head implies, and the names fit accepts (regression is the Forecast objective's loss).
_BY_HEAD = {"lm": "causal_lm", "classification": "classification", "masked_lm": "masked_lm",
            "regression": "regression"}
_OBJECTIVE_KINDS = {"causal_lm": "causal_lm", "masked_lm": "masked_lm", "classification": "classification",
                    "regression": "forecast", "forecast": "forecast"}
_SETTINGS_FILE = "fit.json"


@dataclass
class FitResult:
    """What ``fit`` returns: the model (the one passed in, trained in place), the last evaluation's metrics
    (``{"valid_loss": ..., "valid_accuracy": ...}``; {} without ``eval_data``), the run directory (None without
    ``out_dir``) and the run's summary (status, steps, wall time)."""

    model: nn.Module = field(repr=False)
    metrics: dict[str, float]
    run_dir: Path | None
    summary: dict[str, Any]


def fit(model: nn.Module, train_data, *, eval_data=None, objective: str | None = None, steps: int, batch_size: int,
        lr: float, out_dir: str | Path | None = None, weight_decay: float = 0.0, warmup_steps: int | float = 0,
        min_lr_ratio: float = 0.1, grad_clip: float | None = 1.0, grad_accum: int = 1,
        betas: tuple[float, float] = (0.9, 0.999), ema_decay: float | None = None, eval_every: int | None = None,
        eval_batch_size: int = 256, eval_batches: int | None = None, seed: int = 0, precision: str = "fp32",
        log_every: int = 10, checkpoint_every: int = 500, keep_checkpoints: int = 2, stop_after: int | None = None,
        activation_checkpointing: bool = False, progress: bool = False, console=None) -> FitResult:
    """Trains ``model`` in place on ``train_data`` (see the module docstring) and returns a ``FitResult``.

    Optimizer and schedule: AdamW at ``lr`` (``weight_decay`` on weight matrices only, ``betas``), linear warm-up over
    ``warmup_steps`` (steps, or a fraction of ``steps``), cosine decay to ``min_lr_ratio * lr``, the gradient norm
    clipped to ``grad_clip``, ``batch_size`` examples a step in ``grad_accum`` micro-batches; ``ema_decay`` keeps (and
    evaluates, and saves) an exponential moving average of the weights. ``eval_data`` (same form as ``train_data``) is
    evaluated every ``eval_every`` steps (default: only at the end), at most ``eval_batches`` batches of
    ``eval_batch_size``. ``out_dir`` holds checkpoints (every ``checkpoint_every`` steps and at the end),
    metrics.jsonl (a train record every ``log_every`` steps, an eval record per evaluation), summary.json and the
    trained model (``out_dir/model``, loadable with ``formerkit.load``); an ``out_dir`` holding a checkpoint of the
    same settings is resumed from it. ``stop_after`` stops (with a checkpoint) after that many steps of ``steps``, as
    SIGINT would: calling ``fit`` again continues. ``activation_checkpointing`` reruns each block in the backward
    pass instead of keeping its activations (``model.set_activation_checkpointing``; the same gradients).
    ``console`` (a rich Console) shows notes and, with ``progress``, a progress bar.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise InputError(f"fit: model must be a formerkit model (formerkit.create_model, formerkit.load, "
                         f"formerkit.from_hf), got {type(model).__name__}")
    config = model.config
    kind = _objective_kind(config, objective)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise InputError("fit: no parameter of the model has requires_grad; nothing would be trained")
    settings = TrainConfig(
        name="fit", objective=ObjectiveConfig(kind=_OBJECTIVE_KINDS[kind]),
        optim=OptimConfig(lr=lr, weight_decay=weight_decay, betas=tuple(betas), grad_clip=grad_clip,
                          ema_decay=ema_decay),
        schedule=ScheduleConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
                                min_lr_ratio=min_lr_ratio),
        eval=EvalConfig(every=eval_every or steps, batch_size=eval_batch_size, batches=eval_batches),
        run=RunConfig(seed=seed, precision=precision, log_every=log_every, checkpoint_every=checkpoint_every,
                      keep_checkpoints=keep_checkpoints, progress=progress,
                      activation_checkpointing=activation_checkpointing))
    if stop_after is not None and not 1 <= stop_after <= steps:
        raise ConfigError("stop_after", stop_after, f"a step in [1, steps={steps}] or None")
    # Every input is checked before any training (and before anything is written).
    train = _split(train_data, kind, config, "train_data")
    valid = _split(eval_data, kind, config, "eval_data") if eval_data is not None else None
    vocab = config.stem.vocab_size
    bundle = DataBundle(train=train, valid=valid, test=None,
                        model_fields={"vocab_size": vocab - 1 if kind == "masked_lm" else vocab},
                        unit="tokens" if kind in ("causal_lm", "masked_lm") else "examples")
    objective_ = make_objective(settings.objective, bundle)
    objective_.check_model(config)

    temporary = out_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="formerkit-fit-")) if temporary else Path(out_dir)
    try:
        resume = _resume(run_dir, settings)
        if resume == "completed":
            summary = json.loads((run_dir / "summary.json").read_text())
            # The run is finished: the weights it saved, into the model given.
            from formerkit.checkpoint import load

            model.load_state_dict(load(run_dir / "model").state_dict())
            return FitResult(model, _last_eval(run_dir), run_dir, summary)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / _SETTINGS_FILE).write_text(json.dumps(_record(settings), indent=2) + "\n")
        torch.manual_seed(seed)
        if activation_checkpointing:
            model.set_activation_checkpointing(True)
        dist = distributed.setup("ddp")
        extra = {"objective": settings.objective.kind, "fit": _record(settings)}
        result = run_loop(settings, run_dir, model, objective_, bundle, dist, resume=bool(resume), console=console,
                          title=f"fit {run_dir.name}", extra=extra, stop_after=stop_after, plots=not temporary)
        if result.model is not model:  # ema_decay: the average is what was evaluated and saved
            with torch.no_grad():
                model.load_state_dict(result.model.state_dict())
        if result.summary.get("signal"):
            _pass_on(result.summary["signal"], result.summary["steps"], None if temporary else run_dir)
        return FitResult(model, _last_eval(run_dir), None if temporary else run_dir, result.summary)
    finally:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)


def _pass_on(name: str, step: int, run_dir: Path | None) -> None:
    """A signal that stopped the loop goes on to the caller once the checkpoint is written: SIGINT as
    KeyboardInterrupt, SIGTERM as SystemExit(128 + 15), as an uncaught signal would end the program -- a script
    that calls ``fit`` in a loop stops rather than starting its next run."""
    where = f"; fit with out_dir={str(run_dir)!r} resumes it" if run_dir is not None else ""
    message = f"fit: stopped by {name} after step {step}{where}"
    if name == "SIGINT":
        raise KeyboardInterrupt(message)
    print(message, file=sys.stderr)
    raise SystemExit(128 + signal.Signals[name].value)


def _record(settings: TrainConfig) -> dict[str, Any]:
    """The settings a run was started with, compared on resume (the model and data are the caller's)."""
    data = settings.to_dict()
    return {name: data[name] for name in ("objective", "optim", "schedule", "eval", "run")}


def _resume(run_dir: Path, settings: TrainConfig) -> bool | str:
    """False for a new run, True to resume from run_dir's checkpoint, "completed" for a finished run."""
    if not (run_dir / "checkpoints").is_dir() or latest_checkpoint(run_dir / "checkpoints") is None:
        if (run_dir / "recipe.yaml").exists():
            raise RunError(f"fit: {run_dir} holds a recipe's run (recipe.yaml); choose another out_dir")
        return False
    saved_file = run_dir / _SETTINGS_FILE
    if not saved_file.exists():
        raise RunError(f"fit: {run_dir} holds checkpoints of a run fit did not start (no {_SETTINGS_FILE}); choose "
                       "another out_dir")
    saved, wanted = json.loads(saved_file.read_text()), _record(settings)
    # progress only changes what is shown
    saved["run"].pop("progress", None)
    wanted = json.loads(json.dumps(wanted))
    wanted["run"].pop("progress", None)
    if saved != wanted:
        changed = sorted(f"{section}.{key}" for section in wanted for key in wanted[section]
                         if wanted[section][key] != saved.get(section, {}).get(key))
        raise RunError(f"fit: {run_dir} holds a run started with other settings ({', '.join(changed)}); pass the "
                       "same settings to resume it, or another out_dir")
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        return "completed"
    return True


def _last_eval(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        return {}
    return {k: v for k, v in evals[-1].items() if k not in ("step", "kind", "elapsed")}


def _objective_kind(config, objective: str | None) -> str:
    head = config.head.kind
    if objective is None:
        if head not in _BY_HEAD:
            raise ConfigError("objective", None, f"one of {sorted(_OBJECTIVE_KINDS)}",
                              hint=f"the model's head {head!r} implies no objective")
        kind = _BY_HEAD[head]
        if kind == "causal_lm" and config.arch != "decoder":
            raise ConfigError("objective", None, "a decoder model for fit's language-model objective",
                              hint=f"the model is arch={config.arch!r}; encoder-decoder training is a recipe's "
                                   "(objective.kind seq2seq)")
        return kind
    if objective not in _OBJECTIVE_KINDS:
        raise ConfigError("objective", objective, f"one of {sorted(_OBJECTIVE_KINDS)}")
    return "regression" if objective == "forecast" else objective


# ----- reading the caller's data -----


def _materialize(data, what: str) -> Tensor | tuple[Tensor, Tensor]:
    """A tensor, or an (inputs, targets) pair of tensors, holding every example of ``data``."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if not isinstance(dataset, IterableDataset):
            # The dataset in order (the loader's shuffling is replaced by the trainer's seeded draws).
            data = DataLoader(dataset, batch_size=data.batch_size or 1, shuffle=False, collate_fn=data.collate_fn)
        return _concatenate(list(data), what, batched=True)
    if isinstance(data, IterableDataset) or (isinstance(data, Dataset) and not hasattr(data, "__len__")):
        return _concatenate(list(data), what, batched=False)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                     and not isinstance(data, (str, bytes, dict))):
        return _concatenate([data[i] for i in range(len(data))], what, batched=False)
    raise InputError(f"fit: {what} must be a tensor, an (inputs, labels) pair of tensors, a torch Dataset or a "
                     f"DataLoader; got {type(data).__name__}")


def _concatenate(items: Sequence, what: str, *, batched: bool) -> Tensor | tuple[Tensor, Tensor]:
    if not items:
        raise InputError(f"fit: {what} holds no examples")
    join = torch.cat if batched else torch.stack
    first = items[0]
    try:
        if isinstance(first, Tensor):
            return join([torch.as_tensor(item) for item in items])
        if isinstance(first, (tuple, list)) and len(first) == 2:
            return (join([torch.as_tensor(item[0]) for item in items]),
                    join([torch.as_tensor(item[1]) for item in items]))
    except (RuntimeError, TypeError) as error:
        raise InputError(f"fit: {what}'s examples cannot be put together ({error})") from error
    raise InputError(f"fit: each example of {what} must be a tensor of token ids or an (inputs, labels) pair; got "
                     f"{type(first).__name__}")


def _split(data, kind: str, config, what: str) -> ArraySplit:
    data = _materialize(data, what)
    if kind in ("causal_lm", "masked_lm"):
        if isinstance(data, tuple):
            raise InputError(f"fit: {what} for {kind} is token ids [N, T], not (inputs, labels) pairs")
        _check_ids(data, config, what, extra_position=True)
        return ArraySplit({"tokens": data.long()})
    if not isinstance(data, tuple):
        raise InputError(f"fit: {what} for {kind} must be (inputs, labels) pairs; got a single tensor of shape "
                         f"{list(data.shape)}")
    inputs, targets = data
    if len(inputs) != len(targets):
        raise InputError(f"fit: {what} has {len(inputs)} inputs but {len(targets)} labels")
    _check_inputs(inputs, config, what)
    if kind == "classification":
        if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"fit: {what}'s labels must be integer class ids of shape [N]; got {targets.dtype} "
                             f"of shape {list(targets.shape)}")
        classes = config.head.num_classes
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise InputError(f"fit: {what}'s labels must be in [0, {classes}) (the model's head.num_classes); got "
                             f"values from {int(targets.min())} to {int(targets.max())}")
        return ArraySplit({"inputs": inputs, "labels": targets.long()})
    if not targets.dtype.is_floating_point:
        raise InputError(f"fit: {what}'s regression targets must be floating point; got {targets.dtype}")
    outputs = config.head.output_dim or 1
    if targets[0].numel() != outputs:
        raise InputError(f"fit: {what}'s targets must hold {outputs} values each (the model's head.output_dim); got "
                         f"shape {list(targets.shape)}")
    return ArraySplit({"inputs": inputs, "targets": targets.float()})


def _check_inputs(inputs: Tensor, config, what: str) -> None:
    stem = config.stem.kind
    if stem == "tokens":
        _check_ids(inputs, config, what, extra_position=False)
    elif not inputs.dtype.is_floating_point:
        raise InputError(f"fit: {what}'s inputs for a {stem!r} stem must be floating point; got {inputs.dtype}")


def _check_ids(tokens: Tensor, config, what: str, *, extra_position: bool) -> None:
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"fit: {what} must hold integer token ids; got {tokens.dtype}")
    if tokens.dim() != 2:
        raise InputError(f"fit: {what} must be token ids of shape [N, T]; got shape {list(tokens.shape)}")
    if len(tokens) == 0:
        raise InputError(f"fit: {what} holds no examples")
    length = tokens.shape[1] - extra_position
    if length < 1:
        raise InputError(f"fit: {what}'s rows need at least 2 tokens (inputs and the next token); got "
                         f"{tokens.shape[1]}")
    if config.max_seq_len is not None and length > config.max_seq_len:
        raise InputError(f"fit: {what}'s rows are {tokens.shape[1]} tokens: {length} model positions, more than the "
                         f"model's max_seq_len ({config.max_seq_len})")
    vocab = config.stem.vocab_size
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise InputError(f"fit: {what} holds token ids from {low} to {high}, outside the model's vocabulary "
                         f"[0, {vocab})")
