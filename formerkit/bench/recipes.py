"""``formerkit bench recipes``: how soon each shipped recipe reaches its quality target, against a peer trained on
the same data to the same target, side by side in one run.

- ``cct-digits`` (test accuracy >= 98.5% within 30 s of training) against vit-pytorch's ``CCT`` of the same layout
  (two 3x3 convolutions, no pooling, 2 layers of width 128, sequence pooling, stochastic depth 0.1), trained on the
  same split, batches and augmentation with the recipe's optimizer settings written as a user of vit-pytorch would:
  ``torch.optim.AdamW`` over every parameter, linear warm-up then cosine, label smoothing.
- ``char-lm`` (<= 1.30 nats/byte on the whole validation split within 5 minutes of training) against the nanoGPT
  model of ``formerkit.bench.nanogpt`` at the recipe's width, depth and heads, trained nanoGPT's way: random windows
  of the same training bytes, AdamW (weight decay on matrices only, betas 0.9/0.99), linear warm-up over 2% of the
  run then cosine to a tenth, gradient clipping at 1.0, no dropout, fp32 (nanoGPT's ``train.py`` autocasts on CUDA
  only); its shakespeare-char learning rate (1e-3 at width 384) scaled by 384/width, as μP scales Adam's rate for
  hidden matrices; the same tokens per step and steps as the recipe.

Every contender is evaluated every ``eval_every`` steps on the same split with the same measure (accuracy on the
450 test images; summed next-byte cross-entropy over the validation split's non-overlapping 256-byte windows divided
by the bytes predicted). **Evaluation time is excluded** from the clock and reported separately: the time to target
is the training seconds (steps, data, optimizer, checkpoints; not the model's construction or data loading) at the
first evaluation that meets the target. formerkit runs are ``formerkit.train`` of the shipped recipe with only the
evaluation cadence (and ``run.threads``) changed; their clock comes from the run's metrics.jsonl (``curve_from_log``).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.data import build_data
from formerkit.data.base import step_generator
from formerkit.errors import InputError
from formerkit.train.config import TrainConfig, load_recipe
from formerkit.train.trainer import lr_factor, resolve_precision

__all__ = ["LIBRARIES", "TARGETS", "Target", "curve_from_log", "format_recipes", "nanogpt_char_model",
           "nats_per_byte", "recipes_benchmark", "time_to_target", "vit_pytorch_cct"]

LIBRARIES = ("formerkit", "vit-pytorch", "nanogpt")


@dataclass(frozen=True)
class Target:
    """A recipe's quality target: ``metric`` (as the trainer logs it) reaching ``value`` within ``budget_s`` seconds
    of training; the peer library trained beside it; how often (steps) every contender is evaluated."""

    recipe: str
    metric: str
    value: float
    higher_is_better: bool
    budget_s: float
    peer: str
    eval_every: int

    def met(self, value: float) -> bool:
        return value >= self.value if self.higher_is_better else value <= self.value


TARGETS = {
    "cct-digits": Target("cct-digits", "test_accuracy", 0.985, True, 30.0, "vit-pytorch", eval_every=25),
    "char-lm": Target("char-lm", "valid_loss", 1.30, False, 300.0, "nanogpt", eval_every=100),
}


def time_to_target(curve: list[dict], target: Target) -> float | None:
    """The training seconds at the first evaluation that meets the target (None: never met)."""
    for point in curve:
        if target.met(point["value"]):
            return point["train_s"]
    return None


def curve_from_log(records: list[dict], metric: str) -> list[dict]:
    """A formerkit run's quality against training seconds, from its metrics.jsonl records: one point per evaluation,
    ``{"step", "train_s", "eval_s", "value"}``.

    A train record (step ``s``) is written before the evaluation at ``s`` and the eval record after it, both with the
    run's ``elapsed`` seconds: their difference is the evaluation's time, and the training seconds at ``s`` are the
    train record's ``elapsed`` less every earlier evaluation's time. So evaluations must fall on logged steps
    (``run.log_every`` divides ``eval.every``)."""
    train_elapsed: dict[int, float] = {}
    curve, evaluating = [], 0.0
    for item in records:
        if item["kind"] == "train":
            train_elapsed[item["step"]] = item["elapsed"]
        elif item["kind"] == "eval" and metric in item:
            if item["step"] not in train_elapsed:
                raise InputError(f"bench recipes: the evaluation at step {item['step']} has no train record at that "
                                 "step; run.log_every must divide eval.every")
            before = train_elapsed[item["step"]]
            took = item["elapsed"] - before
            curve.append({"step": item["step"], "train_s": before - evaluating, "eval_s": took,
                          "value": item[metric]})
            evaluating += took
    return curve


def _formerkit(config: TrainConfig, target: Target, threads: int | None, say) -> tuple[list[dict], dict]:
    overrides = {"eval.every": target.eval_every, "eval.batches": None, "run.progress": False,
                 "run.log_every": math.gcd(config.run.log_every, target.eval_every)}
    if threads:
        overrides["run.threads"] = threads
    if target.metric.startswith("test_"):
        overrides["eval.split"] = "test"
    from formerkit.train.trainer import train

    with tempfile.TemporaryDirectory(prefix="formerkit-bench-recipes-") as out:
        say(f"{target.recipe}: training formerkit (the shipped recipe)...")
        result = train(config, Path(out) / "run", overrides=overrides)
        if result.summary["status"] == "interrupted":  # the trainer turned SIGINT/SIGTERM into a clean stop
            raise KeyboardInterrupt(f"bench recipes: the {target.recipe} run was interrupted")
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        setting = config.with_overrides(overrides).run.precision
        dtype = resolve_precision(setting, torch.device("cpu"))
        used = "fp32" if dtype is None else "bf16 autocast"
        info = {"params": result.summary["parameters"], "steps": result.summary["steps"],
                "precision": used if setting != "auto" else f"auto: {used}"}
    return curve_from_log(records, target.metric), info


def vit_pytorch_cct(model_config) -> nn.Module:
    """vit-pytorch's ``CCT`` in the recipe model's layout (``model_config``: the cct-digits ModelConfig). Its
    tokenizer always max-pools: a 1x1 pool of stride 1 is the identity the recipe's ``stem.pool_kernel: 0`` asks
    for."""
    from formerkit.bench.vision import vit_pytorch_module

    stem = model_config.stem
    height, width = stem.image_size
    if height != width:
        raise InputError(f"bench recipes: vit-pytorch's CCT takes square images, got {height}x{width}")
    cct = vit_pytorch_module("cct")
    return cct.CCT(img_size=height, n_input_channels=stem.in_channels, embedding_dim=model_config.width,
                   n_conv_layers=stem.conv_layers, kernel_size=stem.conv_kernel, stride=1,
                   padding=stem.conv_kernel // 2, pooling_kernel_size=1, pooling_stride=1, pooling_padding=0,
                   num_layers=model_config.num_layers, num_heads=model_config.attention.num_heads,
                   mlp_ratio=model_config.feedforward.ratio, num_classes=model_config.head.num_classes,
                   positional_embedding="learnable", dropout_rate=0.0,
                   attention_dropout=model_config.attention.dropout, stochastic_depth_rate=model_config.drop_path)


def nanogpt_char_model(model_config) -> nn.Module:
    """The nanoGPT model at the recipe model's vocabulary, context, width, depth and heads."""
    from formerkit.bench.nanogpt import NanoGPT

    return NanoGPT(vocab_size=model_config.stem.vocab_size, context=model_config.max_seq_len,
                   width=model_config.width, layers=model_config.num_layers, heads=model_config.attention.num_heads)


@torch.no_grad()
def nats_per_byte(model: nn.Module, split, batch_size: int = 64) -> float:
    """Next-byte cross-entropy summed over the split's non-overlapping windows, per byte predicted (the byte
    tokenizer's tokens are bytes): the measure formerkit's causal-LM evaluation reports as ``valid_loss``."""
    total, count = 0.0, 0
    for batch in split.eval_batches(batch_size):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        logits = getattr(logits, "logits", logits)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += tokens[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def _accuracy(model: nn.Module, split, batch_size: int = 256) -> float:
    correct, count = 0, 0
    for batch in split.eval_batches(batch_size):
        correct += int((model(batch["inputs"]).argmax(-1) == batch["labels"]).sum())
        count += len(batch["labels"])
    return correct / max(count, 1)


def _peer_loop(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float], steps: int,
               take_step: Callable[[int], torch.Tensor], evaluate: Callable[[], float], eval_every: int,
               grad_clip: float | None) -> list[dict]:
    """A plain training loop whose clock stops during evaluations; the same curve points as ``curve_from_log``."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, training = [], 0.0
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        loss = take_step(step)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        training += time.perf_counter() - start
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"bench recipes: the peer's loss became {loss.item()} at step {step + 1}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            start = time.perf_counter()
            model.eval()
            value = evaluate()
            model.train()
            curve.append({"step": step + 1, "train_s": training, "eval_s": time.perf_counter() - start,
                          "value": value})
    return curve


def _vit_pytorch(config: TrainConfig, target: Target, say) -> tuple[list[dict], dict]:
    bundle = build_data(config.data)
    model_config = config.model.resolve(bundle.model_fields)
    torch.manual_seed(config.run.seed)
    model = vit_pytorch_cct(model_config)
    optim, schedule, seed = config.optim, config.schedule, config.run.seed
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    smoothing = config.objective.label_smoothing

    def take_step(step: int) -> torch.Tensor:
        batch = bundle.train.take(bundle.train.sample_indices(schedule.batch_size, seed, step))
        if bundle.augment is not None:
            batch = bundle.augment(batch, step_generator(seed, 4, step))
        return F.cross_entropy(model(batch["inputs"]), batch["labels"], label_smoothing=smoothing)

    say(f"{target.recipe}: training vit-pytorch's CCT...")
    split = bundle.test if target.metric.startswith("test_") else bundle.valid
    curve = _peer_loop(model, optimizer, lambda s: lr_factor(s, schedule.warmup, schedule.steps,
                                                             schedule.min_lr_ratio),
                       schedule.steps, take_step, lambda: _accuracy(model, split), target.eval_every,
                       optim.grad_clip)
    return curve, {"params": sum(p.numel() for p in model.parameters()), "steps": schedule.steps,
                   "precision": "fp32"}


# nanoGPT's config/train_shakespeare_char.py: learning rate 1e-3 for its width-384 model, beta2 0.99, 100 warm-up
# iterations of 5,000 (2%), min_lr a tenth of the rate, weight decay 0.1, gradient clipping 1.0.
NANOGPT_LR, NANOGPT_WIDTH, NANOGPT_WARMUP_FRACTION = 1e-3, 384, 0.02


def _nanogpt(config: TrainConfig, target: Target, say) -> tuple[list[dict], dict]:
    bundle = build_data(config.data)
    model_config = config.model.resolve(bundle.model_fields)
    torch.manual_seed(config.run.seed)
    model = nanogpt_char_model(model_config)
    lr = NANOGPT_LR * NANOGPT_WIDTH / model_config.width
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99), fused=True)
    schedule = config.schedule
    steps, batch_size = schedule.steps, schedule.batch_size
    warmup = max(1, round(NANOGPT_WARMUP_FRACTION * steps))
    tokens, window = bundle.train.tokens, bundle.train.seq_len + 1
    generator = torch.Generator().manual_seed(config.run.seed)

    def take_step(step: int) -> torch.Tensor:
        starts = torch.randint(len(tokens) - window + 1, (batch_size,), generator=generator)
        batch = tokens[starts.unsqueeze(1) + torch.arange(window)]
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    say(f"{target.recipe}: training nanoGPT (lr {lr:.2g}, warm-up {warmup} steps)...")
    curve = _peer_loop(model, optimizer, lambda s: lr_factor(s, warmup, steps, 0.1), steps, take_step,
                       lambda: nats_per_byte(model, bundle.valid), target.eval_every, 1.0)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return curve, {"params": params, "steps": steps, "precision": "fp32"}


def recipes_benchmark(recipes=tuple(TARGETS), *, libraries=LIBRARIES, threads: int | None = None,
                      overrides: dict[str, dict] | None = None,
                      progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Trains every recipe and its peer (those in ``libraries``) one after the other; returns one record per
    (recipe, library) with its curve, and notes. ``overrides`` (per recipe: ``{key: value}``, as ``--set``) change
    the recipe for formerkit and the peer alike (the schedule, the data, the eval cadence via ``eval.every``)."""
    unknown = [name for name in recipes if name not in TARGETS]
    if unknown or not recipes:
        raise InputError(f"bench recipes: unknown recipes {unknown}; expected some of {list(TARGETS)}")
    bad = [name for name in libraries if name not in LIBRARIES]
    if bad:
        raise InputError(f"bench recipes: unknown libraries {bad}; expected some of {list(LIBRARIES)}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"bench recipes: threads must be an integer >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    say = progress or (lambda text: None)
    records, notes = [], []
    for name in recipes:
        target = TARGETS[name]
        extra = dict((overrides or {}).get(name, {}))
        if "eval.every" in extra:
            target = Target(**{**target.__dict__, "eval_every": int(extra.pop("eval.every"))})
        config = load_recipe(name).with_overrides(extra) if extra else load_recipe(name)
        for library in ("formerkit", target.peer):
            if library not in libraries:
                continue
            if library == "vit-pytorch":
                import importlib.util

                if importlib.util.find_spec("vit_pytorch") is None:
                    notes.append("skipped vit-pytorch: not installed (pip install --no-deps vit-pytorch)")
                    continue
            if library == "formerkit":
                curve, info = _formerkit(config, target, threads, say)
            else:
                curve, info = {"vit-pytorch": _vit_pytorch, "nanogpt": _nanogpt}[library](config, target, say)
            reached = time_to_target(curve, target)
            say(f"{name}: {library} " + ("did not reach the target" if reached is None else
                                         f"reached the target after {reached:.1f} s of training") +
                f"; final {_value(target.metric, curve[-1]['value'])} after {curve[-1]['train_s']:.1f} s")
            records.append({"recipe": name, "library": library, "metric": target.metric, "target": target.value,
                            "budget_s": target.budget_s, "time_to_target_s": reached,
                            "within_budget": reached is not None and reached <= target.budget_s,
                            "final": curve[-1]["value"], "train_s": curve[-1]["train_s"],
                            "eval_s": sum(point["eval_s"] for point in curve), **info, "curve": curve})
    return records, notes


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric.endswith("accuracy") else f"{value:.4f}"


def format_recipes(records: list[dict]) -> str:
    """The side-by-side table, then each contender's curve (quality at training seconds)."""
    lines = ["| recipe | library | params | precision | target | time to target (training s) | within budget | "
             "final | steps | training s | eval s (excluded) |", "|" + "---|" * 11]
    for item in records:
        reached = "not reached" if item["time_to_target_s"] is None else f"{item['time_to_target_s']:.1f}"
        sign = ">=" if item["metric"].endswith("accuracy") else "<="
        lines.append(f"| {item['recipe']} | {item['library']} | {item['params'] / 1e6:.2f}M | {item['precision']} | "
                     f"{item['metric']} {sign} {_value(item['metric'], item['target'])} | {reached} | "
                     f"{'yes' if item['within_budget'] else 'no'} (<= {item['budget_s']:.0f} s) | "
                     f"{_value(item['metric'], item['final'])} | {item['steps']} | {item['train_s']:.1f} | "
                     f"{item['eval_s']:.1f} |")
    lines += ["", "Curves (step: training seconds -> quality):"]
    for item in records:
        points = ", ".join(f"{p['step']}: {p['train_s']:.0f}s {_value(item['metric'], p['value'])}"
                           for p in item["curve"])
        lines.append(f"- {item['recipe']} / {item['library']}: {points}")
    return "\n".join(lines)
