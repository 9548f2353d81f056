"""The training loop, readable top to bottom: ``train(recipe, out_dir)`` returns the run's summary.

One optimizer step = ``grad_accum`` micro-batches of the global batch (each process of a distributed run takes its
share of each micro-batch), gradient clipping, AdamW, the learning-rate schedule, the EMA update. Every
``eval.every`` steps the model is evaluated; every ``run.checkpoint_every`` steps a checkpoint is written. Batches
depend only on (seed, step), so a resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from formerkit.checkpoint import load, save
from formerkit.data import DataBundle, build_data, save_tokenizer
from formerkit.data.base import ProcessGenerator, RowDraws, step_generator, step_seed
from formerkit.errors import FormerkitError
from formerkit.models.transformer import build_model
from formerkit.train import distributed
from formerkit.train.config import TrainConfig, load_recipe
from formerkit.train.objectives import ExpertUsage, Objective, make_objective
from formerkit.train.optimization import build_optimizer, layer_ids, lr_factor, resolve_precision
from formerkit.train.progress import progress as make_progress
from formerkit.train.report import plot_run, print_summary
from formerkit.train.start import load_start, start_model
from formerkit.train.startup import StepTimer, example_prompt, run_title, token_warning, tokens_per_example
from formerkit.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["RunError", "TrainResult", "build_optimizer", "evaluate_split", "layer_ids", "lr_factor",
           "resolve_precision", "train", "train_stage"]


class RunError(FormerkitError):
    """A run cannot start (bad run directory, nothing to resume) or cannot go on (a non-finite loss)."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module = field(repr=False)


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints and exits cleanly)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Log:
    """metrics.jsonl: one JSON record per logged step and evaluation, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []
        if enabled and resume_step is not None and path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are run again.
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        elif enabled:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _check_same_recipe(run_dir: Path, config: TrainConfig) -> None:
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.exists():
        raise RunError(f"--resume: {run_dir} holds no run to resume (no recipe.yaml); leave out --resume to start "
                       "one there")
    saved, wanted = TrainConfig.from_file(recipe_file).to_dict(), config.to_dict()
    if saved != wanted:
        changed = sorted(k for k in wanted if wanted[k] != saved[k])
        raise RunError(f"--resume: the recipe differs from the one {run_dir} was started with (sections "
                       f"{', '.join(changed)}); resume with the same recipe and --set values")


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether anything was trained in ``run_dir``: a checkpoint or a saved model. A directory a failed start left
    (recipe.yaml, model.yaml, no checkpoint) holds no run."""
    checkpoints = run_dir / "checkpoints"
    return (checkpoints.is_dir() and any(checkpoints.iterdir())) or (run_dir / "model").exists()


def _prepare_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """A new run: refuses a directory that holds one already (a checkpoint), then records the recipe."""
    if _has_checkpoint(run_dir):
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "recipe.yaml")


def _training_usage(objective: Objective, dist) -> dict[str, float]:
    """The expert-usage metrics of the training passes since the last call (all processes' passes), and a fresh
    collector for the next ones; {} for a dense model."""
    usage = objective.training_usage
    if usage is None:
        return {}
    objective.training_usage = ExpertUsage()
    if not usage.batches:
        return {}
    if dist.active:
        # distributed: every process ran its share of each micro-batch; add up their assignments and average their
        # auxiliary losses (each process ran the same number of passes).
        usage.counts = dist.mean(usage.counts.double()) * dist.world_size
        usage.aux_loss = dist.mean(usage.aux_loss)
    return usage.metrics()


def evaluate_split(objective: Objective, model: nn.Module, bundle: DataBundle, split: str, config: TrainConfig,
                   autocast) -> dict[str, float]:
    """The objective's metrics of ``model`` on a split of ``bundle`` (``config.eval``'s batches), named
    ``<split>_<metric>``; ``autocast`` is the context the passes run in (e.g. ``torch.no_grad``)."""
    data = bundle.split(split)
    was_training = model.training
    model.eval()
    with autocast():
        metrics = objective.evaluate(model, data.eval_batches(config.eval.batch_size, config.eval.batches))
    model.train(was_training)
    return {f"{split}_{name}": value for name, value in metrics.items()}


def _load_previous_stage(model: nn.Module, previous: Path, keep_head: bool = False) -> list[str]:
    """Initializes ``model`` from the previous stage's saved model: every tensor with the same name and shape except
    the head (a new task's head starts fresh) unless ``keep_head``. Returns the names copied."""
    source = load(previous).state_dict()
    target = model.state_dict()
    copied = [name for name, tensor in source.items()
              if (keep_head or not name.startswith("head.")) and name in target
              and target[name].shape == tensor.shape]
    model.load_state_dict({name: source[name] for name in copied}, strict=False)
    return copied


def save_run_model(core: nn.Module, run_dir: Path, extra: dict[str, Any], say=None) -> None:
    """Saves a run's model to ``run_dir/model``. An adapted model (``formerkit.add_adapters``, a recipe's ``adapt:``)
    saves its adapters alone to ``run_dir/adapter`` and, in ``model/``, the weights with the adapters merged in (a
    plain model: generate, eval, predict, export and to_hf read it as any other); adapters that cannot be merged (a
    bottleneck adapter, prefixes) leave the base weights in ``model/``, whose extra names the adapter directory, and
    ``formerkit.runs.load_run_model`` puts them back on when loading."""
    adapted = _adapter_names(core)
    if not adapted:
        save(core, run_dir / "model", extra=extra)
        return
    import copy

    from formerkit.adapt import merge_adapters, save_adapters

    save_adapters(core, run_dir / "adapter")
    try:
        merged = merge_adapters(copy.deepcopy(core))
    except FormerkitError as error:
        if say is not None:
            say(f"note: the adapters stay separate ({error}); {run_dir / 'model'} holds the base and "
                f"{run_dir / 'adapter'} the adapters, put back on when the run is loaded", highlight=False)
        _save_base(core, run_dir / "model", {**extra, "adapters": "../adapter"})
        return
    save(merged, run_dir / "model", extra={**extra, "merged_adapters": adapted})


def _adapter_names(model: nn.Module) -> list[str]:
    try:
        from formerkit.adapt import adapter_names
    except ImportError:  # a build without formerkit.adapt's API: no model has adapters
        return []
    return list(adapter_names(model))


def _save_base(model: nn.Module, directory: Path, extra: dict[str, Any]) -> None:
    """The base of an adapted model (every adapter taken off a copy), as a plain saved model (int8 layers included).
    Adapters of a kind this does not know how to take off are refused by name: the run's adapters are in
    ``RUN/adapter`` all the same."""
    import copy

    from formerkit.adapt import AdapterModule
    from formerkit.adapt.lora import detach_host, hosts
    from formerkit.adapt.slots import BesideSlot, PrefixSlot, PromptSlot

    base = copy.deepcopy(model)
    for linear, _ in hosts(base).values():
        detach_host(linear)
    # The block-level methods' containers (bottleneck adapters, prefixes, prompts): an empty place is None.
    for path, module in list(base.named_modules()):
        if isinstance(module, (BesideSlot, PrefixSlot, PromptSlot)):
            owner, _, attribute = path.rpartition(".")
            setattr(base.get_submodule(owner) if owner else base, attribute, None)
    left = [path for path, module in base.named_modules() if isinstance(module, AdapterModule)]
    if left:
        raise RunError(f"the run's adapters are saved in {directory.parent / 'adapter'}, but {left[0]} can neither "
                       "be merged into the weights nor taken off to save the base; load the starting model and "
                       "formerkit.load_adapters onto it")
    for attribute in ("adapter_records", "adapter_trainable_before"):
        if hasattr(base, attribute):
            delattr(base, attribute)
    save(base, directory, extra=extra)


def train(recipe: TrainConfig | str | Path, out_dir: str | Path, *, resume: bool = False,
          overrides: dict[str, Any] | None = None, console=None, wrap_objective=None) -> TrainResult:
    """Trains a recipe (a TrainConfig, a shipped recipe name or a YAML path) into the run directory ``out_dir``.

    A recipe with a ``then`` stage trains its first stage into ``out_dir/stage1`` and the second, initialized from
    the first stage's weights, into ``out_dir``. ``wrap_objective`` (one-stage recipes) replaces the recipe's
    objective by ``wrap_objective(objective)``, e.g. ``formerkit.compress.distill.Distillation``.
    """
    if not isinstance(recipe, (TrainConfig, str, Path)):
        raise RunError(f"train: {type(recipe).__name__} is not a recipe (a TrainConfig, a shipped recipe name or a "
                       "YAML path); to train a model on your own tensors, Dataset or DataLoader, call "
                       "formerkit.fit(model, train_data, steps=..., batch_size=..., lr=...)")
    config = recipe if isinstance(recipe, TrainConfig) else load_recipe(recipe)
    if overrides:
        config = config.with_overrides(overrides)
    run_dir = Path(out_dir)
    if config.then is not None:
        if wrap_objective is not None:
            raise RunError(f"{config.name}: a two-stage recipe cannot take a wrapped objective; use a one-stage recipe")
        first = train_stage(config, run_dir / "stage1", resume=resume and (run_dir / "stage1").exists(),
                            console=console)
        if first.summary.get("status") == "interrupted":
            # Stopped (SIGINT/SIGTERM) during the first stage: the second must not start from half-trained weights.
            # --resume finishes the first stage, then runs the second.
            return first
        second = config.next_stage()
        return train_stage(second, run_dir, resume=resume and (run_dir / "recipe.yaml").exists(),
                           console=console, initialize_from=first.run_dir / "model", previous=first.summary)
    return train_stage(config, run_dir, resume=resume, console=console, wrap_objective=wrap_objective)


def train_stage(config: TrainConfig, run_dir: Path, *, resume: bool = False, console=None,
                initialize_from: Path | None = None, previous: dict[str, Any] | None = None,
                wrap_objective=None, initialize_head: bool = False) -> TrainResult:
    dist = distributed.setup(config.run.strategy)
    if dist.sharded and config.optim.ema_decay is not None:  # distributed: AveragedModel cannot copy FSDP shards
        dist.teardown()
        raise RunError("optim.ema_decay is not supported with run.strategy fsdp; set optim.ema_decay null or use "
                       "run.strategy ddp")
    def say(text: str, **style) -> None:  # rank 0's notes, one line each however long (logs stay greppable)
        if dist.is_main and console is not None:
            console.print(text, soft_wrap=True, **style)


    if resume and (run_dir / "recipe.yaml").exists() and not _has_checkpoint(run_dir):
        # A start that failed before its first checkpoint (bad data, a wrong --set): nothing to resume, and the
        # corrected recipe may differ from the one it recorded.
        say(f"{run_dir}: no checkpoint yet (nothing was trained); starting a new run", highlight=False)
        resume = False
    if resume:
        _check_same_recipe(run_dir, config)
    if (run_dir / "summary.json").exists() and resume:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") == "completed":
            return TrainResult(run_dir, summary, load(run_dir / "model"))
    if not resume and _has_checkpoint(run_dir):  # refused before the data is read
        _prepare_run_dir(run_dir, config)

    run = config.run
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    # The data and the model are checked before anything is written: a failed start leaves no run behind.
    # model.from with weights: the start is loaded first, so a text source reads with its tokenizer.
    start = None
    if config.model.from_ is not None and config.model.start_preset is None:
        start = load_start(config.model.from_)
    text_source = config.data.source in ("stdlib", "text", "jsonl", "instruct")
    bundle = build_data(config.data, start.tokenizer if start is not None and text_source else None)
    objective = make_objective(config.objective, bundle)
    if wrap_objective is not None:
        objective = wrap_objective(objective)
    fields = {**bundle.model_fields, **objective.model_fields()}
    if start is not None:
        started, model_config, fresh = start_model(start, config.model.overrides, fields,
                                                   vocab_size=fields.get("vocab_size"),
                                                   seq_len=fields.get("max_seq_len"), build=build_model)
    else:
        model_config = config.model.resolve(fields)
    objective.check_model(model_config)
    if dist.is_main and not resume:
        _prepare_run_dir(run_dir, config)
        # The recipe names a preset and overrides; this is the whole model they resolve to, with the data's fields.
        model_config.to_yaml(run_dir / "model.yaml")
    dist.barrier()
    schedule = config.schedule
    warmup = schedule.warmup
    if not isinstance(schedule.warmup_steps, float) and schedule.warmup_steps > schedule.steps:
        say(f"note: schedule.warmup_steps ({schedule.warmup_steps}) is longer than the run (schedule.steps="
            f"{schedule.steps}); warming up over {warmup} steps (a tenth of the run) instead", highlight=False)
    if schedule.batch_size % (schedule.grad_accum * dist.world_size):
        raise RunError(f"schedule.batch_size ({schedule.batch_size}) must split evenly into grad_accum "
                       f"({schedule.grad_accum}) x processes ({dist.world_size})")
    soft = model_config.attention.soft_causal_steps
    if soft is not None and soft > schedule.steps:
        raise RunError(f"model attention.soft_causal_steps ({soft}) exceeds schedule.steps ({schedule.steps}): the "
                       "causal mask would not be fully in place when training ends")
    model = build_model(model_config) if start is None else started
    if run.activation_checkpointing:
        model.set_activation_checkpointing(True)
    copied = (_load_previous_stage(model, initialize_from, initialize_head) if initialize_from is not None
              else [])
    if start is not None:
        say(f"model: from {start.path} ({start.kind})" + (f"; {', '.join(fresh)} start fresh" if fresh else ""),
            highlight=False)
    if config.adapt is not None:
        from formerkit.adapt import add_adapters

        add_adapters(model, **config.adapt)
    if bundle.description:
        # What was read, and how (packed rows say how full they are and how many documents were cut into pieces).
        say(f"data: {bundle.description}", highlight=False)
    if dist.is_main and not resume and initialize_from is not None and console is not None:
        console.print(f"initialized {len(copied)} tensors from {initialize_from}")
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{tokens_per_example(model_config, config.data):,} tokens per example", highlight=False)
    warning = token_warning(config, model_config) if dist.is_main and console is not None else None
    if warning:
        say(warning, style="yellow", highlight=False)
    extra = {"preprocessing": bundle.preprocessing, "objective": config.objective.kind, "recipe": config.to_dict()}
    return run_loop(config, run_dir, model, objective, bundle, dist, resume=resume, console=console,
                    title=run_title(config, run_dir), extra=extra, previous=previous)


def run_loop(config: TrainConfig, run_dir: Path, model: nn.Module, objective: Objective, bundle: DataBundle,
             dist, *, resume: bool, console=None, title: str, extra: dict[str, Any],
             previous: dict[str, Any] | None = None, stop_after: int | None = None,
             plots: bool = True) -> TrainResult:
    """The loop both entry points share (a recipe's ``train_stage`` and ``formerkit.fit``): trains ``model`` (in place)
    on ``bundle`` with ``objective`` under ``config``'s optim, schedule, eval and run sections into ``run_dir``, from
    its latest checkpoint when ``resume``; saves the model with ``extra`` and the summary. Only parameters with
    ``requires_grad`` are optimized (an adapted model trains its adapters only). ``dist`` comes from
    ``distributed.setup``; this tears it down. ``stop_after`` stops after that step as SIGINT would (a checkpoint,
    status "interrupted"): the run continues when resumed; a run stopped by a signal names it in the summary
    (``"signal": "SIGINT"``). ``plots`` draws the run's plots at the end (``fit`` into a temporary directory does not:
    nobody would see them)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError("no parameter of the model has requires_grad: nothing would be trained")
    run, schedule = config.run, config.schedule
    warmup = schedule.warmup

    def say(text: str, **style) -> None:
        if dist.is_main and console is not None:
            console.print(text, soft_wrap=True, **style)

    trained = objective.wrap_model(model).to(dist.device)
    dist.seed_rank(run.seed)  # distributed: each rank its own dropout stream, after the identical initialization
    # distributed: wrap before building the optimizer and restoring a checkpoint (FSDP swaps in sharded parameters).
    parallel = dist.wrap(trained)
    optimizer = build_optimizer(trained, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, schedule.steps, schedule.min_lr_ratio))
    ema = None
    if config.optim.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(trained, multi_avg_fn=get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True)

    start_step, best, stale, elapsed_before = 0, None, 0, 0.0
    checkpoints = run_dir / "checkpoints"
    if resume:
        found = latest_checkpoint(checkpoints)
        if found is None:
            raise RunError(f"--resume: no intact checkpoint in {checkpoints}")
        checkpoint, state = found
        load_checkpoint(checkpoint, state, model=trained, optimizer=optimizer, scheduler=scheduler, ema=ema)
        start_step, best, stale = state["step"], state.get("best"), state.get("stale", 0)
        elapsed_before = state.get("elapsed", 0.0)
        say(f"resuming {run_dir} at step {start_step} of {schedule.steps} from {checkpoint}", highlight=False)
    dtype = resolve_precision(run.precision, dist.device)
    autocast = (lambda: torch.autocast(dist.device.type, dtype=dtype)) if dtype is not None else nullcontext
    log = _Log(run_dir / "metrics.jsonl", dist.is_main, start_step if resume else None)

    eval_model = lambda: ema.module if ema is not None else trained  # noqa: E731
    eval_split = config.eval.split if getattr(bundle, config.eval.split) is not None else None
    watch = config.eval.metric
    higher = watch is not None and not watch.endswith("loss")
    step, status, units, window_start = start_step, "completed", 0, time.perf_counter()
    started = time.perf_counter()
    progress = make_progress(console, dist.is_main and run.progress, schedule.steps, start_step, title,
                             run.log_every)
    timer = StepTimer(start_step, schedule.steps, say)

    def checkpoint_now():
        # distributed: every rank calls it (FSDP gathers the sharded state collectively); rank 0 writes.
        save_checkpoint(checkpoints, step, model=trained, optimizer=optimizer, scheduler=scheduler, ema=ema,
                        keep=run.keep_checkpoints, write=dist.is_main,
                        extra={"best": best, "stale": stale,
                               "elapsed": elapsed_before + time.perf_counter() - started})
        dist.barrier()

    # Mixture-of-experts models: the training passes' expert usage, logged with each train record (moe_load_max,
    # moe_load_entropy, moe_aux_loss over the steps since the previous one). Collected as tensors, read at log time.
    objective.training_usage = ExpertUsage() if objective.has_experts(trained) else None

    trained.train()
    with _StopSignal() as stop, progress:
        while step < schedule.steps:
            model.set_training_step(step)  # schedules that follow training (attention.soft_causal_steps)
            # The global batch, augmented as a whole, so how it is split (accumulation, processes) changes nothing.
            global_batch = bundle.train.take(bundle.train.sample_indices(schedule.batch_size, run.seed, step))
            if bundle.augment is not None:
                global_batch = bundle.augment(global_batch, step_generator(run.seed, 4, step))
            rows = torch.arange(schedule.batch_size).view(schedule.grad_accum, -1)
            loss_sum = torch.zeros((), device=dist.device)
            for micro, micro_rows in enumerate(rows):
                mine = micro_rows[dist.rank::dist.world_size]
                batch = {k: v[mine].to(dist.device) for k, v in global_batch.items()}
                sync = micro == schedule.grad_accum - 1
                # Each process its own stream, and the shared one (rank 0's: a single process's results stay) that
                # objectives drawing per example use for the whole micro-batch, keeping this process's rows.
                share = None if dist.world_size == 1 else torch.arange(len(micro_rows))[dist.rank::dist.world_size]
                generator = ProcessGenerator(step_seed(run.seed, 5, step, micro, dist.rank),
                                             RowDraws(step_generator(run.seed, 5, step, micro, 0), share,
                                                      len(micro_rows)))
                with dist.no_sync(parallel, sync), autocast():
                    loss = objective.loss(parallel, batch, generator)
                (loss / schedule.grad_accum).backward()
                loss_sum += loss.detach()
                units += objective.units(batch)
            mean_loss = dist.mean(loss_sum / schedule.grad_accum).item()
            if not math.isfinite(mean_loss):
                found = latest_checkpoint(checkpoints)
                where = f"the last good checkpoint is {found[0]}" if found else "no checkpoint was written yet"
                raise RunError(f"the training loss became {mean_loss} at step {step + 1}; stopping ({where}). "
                               "Try a lower optim.lr, optim.grad_clip, or run.precision fp32")
            if config.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(trained)
            step += 1
            timer.tick(step)

            if step % run.log_every == 0 or step == schedule.steps:
                now = time.perf_counter()
                rate = units * dist.world_size / max(now - window_start, 1e-9)
                moe = _training_usage(objective, dist)
                log.write({"step": step, "kind": "train", "loss": mean_loss, "lr": max(scheduler.get_last_lr()),
                           f"{bundle.unit}_per_s": rate, **moe,
                           "elapsed": elapsed_before + now - started})
                units, window_start = 0, now
                progress.advance(step, mean_loss, rate, bundle.unit, moe.get("moe_load_max"))
            else:
                progress.advance(step, None, None, bundle.unit)

            should_stop = False
            if eval_split and (step % config.eval.every == 0 or step == schedule.steps):
                metrics = evaluate_split(objective, eval_model(), bundle, eval_split, config, autocast)
                log.write({"step": step, "kind": "eval", **metrics,
                           "elapsed": elapsed_before + time.perf_counter() - started})
                progress.note(step, metrics)
                if dist.is_main:  # generative objectives: samples of this point of training (RUN/samples)
                    objective.snapshot(eval_model(), run_dir, step)
                if watch is not None:
                    if watch not in metrics:
                        raise RunError(f"eval.metric {watch!r} is not reported; this objective reports "
                                       f"{', '.join(sorted(metrics))}")
                    value = metrics[watch]
                    if best is None or (value > best if higher else value < best):
                        best, stale = value, 0
                    else:
                        stale += 1
                        if config.eval.patience is not None and stale >= config.eval.patience:
                            status, should_stop = "stopped_early", True
            if step % run.checkpoint_every == 0 or step == schedule.steps or should_stop:
                checkpoint_now()
            if dist.any_flag(stop.received is not None) or (stop_after is not None and step >= stop_after):
                if step % run.checkpoint_every and step != schedule.steps and not should_stop:
                    checkpoint_now()
                status = "interrupted"
                break
            if should_stop:
                break

    wall = elapsed_before + time.perf_counter() - started
    final_model = eval_model()
    core = objective.unwrap_model(final_model)
    summary: dict[str, Any] = {"name": title, "recipe": config.name, "status": status,
                               "objective": config.objective.kind, "steps": step,
                               "parameters": sum(p.numel() for p in core.parameters()),
                               "wall_time_s": round(wall, 2)}
    train_rates = [r[f"{bundle.unit}_per_s"] for r in log.records if r["kind"] == "train"]
    if train_rates:
        summary[f"train_{bundle.unit}_per_s"] = round(sum(train_rates) / len(train_rates), 1)
    if status == "interrupted" and stop.received is not None:
        summary["signal"] = signal.Signals(stop.received).name
    if status != "interrupted":
        for split in ("valid", "test"):
            if getattr(bundle, split) is not None:
                summary.update(evaluate_split(objective, final_model, bundle, split, config, autocast))
    if previous is not None:
        summary["previous_stage"] = previous
    core = dist.full_model(core, trained)  # distributed: FSDP gathers the weights (every rank), rank 0 saves them
    if dist.is_main:
        extra = dict(extra)
        if getattr(objective, "record", None) is not None:  # how the model was trained beyond its recipe
            extra["distillation"] = objective.record
        save_run_model(core, run_dir, extra, say)
        if bundle.tokenizer is not None:
            save_tokenizer(bundle.tokenizer, run_dir / "model" / "tokenizer.json")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if plots:
            plot_run(run_dir)
        if console is not None:
            print_summary(console, run_dir, summary, prompt=example_prompt(bundle))
    dist.barrier()
    dist.teardown()
    return TrainResult(run_dir, summary, core)
