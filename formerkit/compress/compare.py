"""The Pareto comparison of a model's variants: quality against CPU latency and size, all measured in one run.

``compare(targets)`` loads each run or model directory (a trained run, its quantized, pruned or distilled variants),
evaluates every one on the same held-out split with the same data and objective, times each on the same batches with
the variants taken in turn (so a slower moment of a shared machine falls on all of them alike), and reads each
weights file's size. ``write_comparison`` turns the result into a Markdown table, a PNG plot and a JSON file.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoint import WEIGHTS_FILE, read_document
from formerkit.data import build_data
from formerkit.errors import InputError
from formerkit.runs import load_run_model, model_dir
from formerkit.summary import count_parameters
from formerkit.train.objectives import make_objective
from formerkit.train.trainer import evaluate_split

__all__ = ["Variant", "compare", "pareto_front", "write_comparison"]


@dataclass
class Variant:
    """One compared model: its quality, latency and size."""

    name: str
    path: str
    metric: str  # e.g. "test_accuracy" or "test_loss"
    value: float
    parameters: int
    megabytes: float  # the weights file on disk
    latency_ms: dict[int, float]  # batch size -> median milliseconds per forward pass
    quantization: str | None = None
    pareto: bool = False


def _weights_megabytes(directory: Path) -> float:
    """The size on disk (MB) of the weights file config.json names."""
    return (directory / read_document(directory).get("weights", {}).get("file", WEIGHTS_FILE)).stat().st_size / 1e6


def _label(target: Path) -> str:
    """A variant's default name: the run directory's name (``model/`` inside a run names the run)."""
    target = target.resolve()
    return target.parent.name if target.name == "model" else target.name


def pareto_front(variants: list[Variant], higher_is_better: bool) -> list[bool]:
    """For each variant, whether no other one is at least as good in quality, latency (largest batch) and size, and
    better in one of them."""
    batch = max(variants[0].latency_ms)

    def costs(v: Variant) -> tuple[float, float, float]:
        return (-v.value if higher_is_better else v.value, v.latency_ms[batch], v.megabytes)

    front = []
    for variant in variants:
        mine = costs(variant)
        dominated = any(all(o <= m for o, m in zip(costs(other), mine)) and costs(other) != mine
                        for other in variants if other is not variant)
        front.append(not dominated)
    return front


def compare(targets: list[str | Path], *, names: list[str] | None = None, split: str | None = None,
            batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Measures every target (a run directory or a model directory a run saved) in one run.

    All targets must be variants of one task: the same data and the same objective kind (a quantized, pruned or
    distilled model keeps its run's recipe). Quality is the objective's primary metric on ``split`` (the recipe's
    test split by default, else valid), computed with the first target's data and objective for all. Latency is the
    median wall time of one forward pass (and the objective's metric, negligible beside it) on the split's first
    ``b`` examples for each ``b`` in ``batch_sizes``, with the variants timed in turn ``repeats`` times after
    ``warmup`` passes each, under ``torch.inference_mode`` on the CPU with torch's current thread count.
    """
    if not targets:
        raise InputError("compare: give at least one run or model directory")
    if names is not None and len(names) != len(targets):
        raise InputError(f"compare: {len(names)} names for {len(targets)} targets; give one name per target or none")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"compare: batch sizes must be positive integers, got {list(batch_sizes)}")
    if repeats < 1 or warmup < 0:
        raise InputError(f"compare: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    directories = [model_dir(target) for target in targets]  # a clear error for a directory that is neither
    loaded = [load_run_model(directory) for directory in directories]
    first_recipe = loaded[0][1]
    for directory, (_, recipe, _) in zip(directories[1:], loaded[1:]):
        if recipe.data != first_recipe.data or recipe.objective.kind != first_recipe.objective.kind:
            raise InputError(f"compare: {directory} is not a variant of {directories[0]}'s task (its recipe's data or "
                             "objective differs); compare variants of one trained model")
    if first_recipe.objective.kind == "mae":
        raise InputError(f"compare: {directories[0]} is masked-autoencoder pretraining, which has no task metric; "
                         "compare the fine-tuned runs")
    bundle = build_data(first_recipe.data)
    objective = make_objective(first_recipe.objective, bundle)
    split = split or ("test" if bundle.test is not None else "valid")
    if getattr(bundle, split, None) is None:
        raise InputError(f"compare: the data has no {split!r} split; choose one of "
                         f"{[s for s in ('valid', 'test') if getattr(bundle, s) is not None]}")
    data = bundle.split(split)
    batches = {size: next(iter(data.eval_batches(size, 1))) for size in batch_sizes}
    metric = f"{split}_{objective.primary_metric}"

    variants = []
    for index, (directory, (model, recipe, _)) in enumerate(zip(directories, loaded)):
        metrics = evaluate_split(objective, model, bundle, split, recipe, torch.no_grad)
        if metric not in metrics:
            raise InputError(f"compare: {directory} gives no {metric!r} (got {sorted(metrics)})")
        quantization = getattr(model, "quantization", None)  # the record checkpoint.load restored, if any
        variants.append(Variant(
            name=names[index] if names else _label(Path(targets[index])), path=str(directory), metric=metric,
            value=float(metrics[metric]), parameters=count_parameters(model.config),
            megabytes=_weights_megabytes(directory), latency_ms={},
            quantization=None if quantization is None else quantization["mode"]))
    models = [model for model, _, _ in loaded]
    with torch.inference_mode():
        for size, batch in batches.items():
            times: list[list[float]] = [[] for _ in models]
            for round_ in range(warmup + repeats):
                for model, record in zip(models, times):
                    begin = time.perf_counter()
                    objective.evaluate(model, [batch])
                    if round_ >= warmup:
                        record.append((time.perf_counter() - begin) * 1000)
            for variant, record in zip(variants, times):
                variant.latency_ms[size] = statistics.median(record)
    for variant, on_front in zip(variants, pareto_front(variants, objective.higher_is_better)):
        variant.pareto = on_front
    return {"metric": metric, "higher_is_better": objective.higher_is_better, "split": split,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
            "batch_sizes": list(batch_sizes), "variants": variants}


def _format_value(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric.endswith("accuracy") else f"{value:.4f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table; ratios are against the first variant."""
    variants: list[Variant] = result["variants"]
    metric, base = result["metric"], variants[0]
    sizes = result["batch_sizes"]
    header = ["variant", metric, "change", "parameters", "size MB"]
    header += [f"ms (batch {b})" for b in sizes] + [f"speed-up (batch {b})" for b in sizes] + ["Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                                 range(len(header))) + "|"]
    for variant in variants:
        change = variant.value - base.value
        change_text = f"{100 * change:+.2f} pt" if metric.endswith("accuracy") else f"{change:+.4f}"
        quantized = variant.quantization and variant.quantization not in variant.name
        name = variant.name + (f" ({variant.quantization})" if quantized else "")
        row = [name, _format_value(metric, variant.value), change_text, f"{variant.parameters:,}",
               f"{variant.megabytes:.2f}"]
        row += [f"{variant.latency_ms[b]:.2f}" for b in sizes]
        row += [f"{base.latency_ms[b] / variant.latency_ms[b]:.2f}x" for b in sizes]
        row += ["yes" if variant.pareto else ""]
        lines.append("| " + " | ".join(row) + " |")
    direction = "higher" if result["higher_is_better"] else "lower"
    lines.append("")
    lines.append(f"{metric} ({direction} is better) on the whole split; latency is the median of "
                 f"{result['repeats']} forward passes per batch size with the variants timed in turn, "
                 f"{result['threads']} threads, torch {result['torch']}; size is the weights file on disk; change and "
                 f"speed-up are against {base.name}. Pareto: no other variant is as good or better in quality, "
                 "latency and size at once.")
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    """Quality against latency (at the largest batch) and against size, the Pareto variants filled in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants: list[Variant] = result["variants"]
    metric, batch = result["metric"], max(result["batch_sizes"])
    scale = 100 if metric.endswith("accuracy") else 1
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (label, x_of) in zip(axes, ((f"latency at batch {batch} (ms)", lambda v: v.latency_ms[batch]),
                                          ("size on disk (MB)", lambda v: v.megabytes))):
        front = sorted((v for v in variants if v.pareto), key=x_of)
        if len(front) > 1:
            axis.plot([x_of(v) for v in front], [scale * v.value for v in front], color="tab:blue", alpha=0.4)
        for variant in variants:
            axis.scatter(x_of(variant), scale * variant.value, s=50, color="tab:blue",
                         facecolors="tab:blue" if variant.pareto else "none", zorder=3)
            axis.annotate(variant.name, (x_of(variant), scale * variant.value), textcoords="offset points",
                          xytext=(5, 5), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel(metric + (" (%)" if scale == 100 else ""))
        axis.grid(alpha=0.3)
    figure.suptitle("variants: filled = on the Pareto front")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_comparison(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Writes ``compare.md``, ``compare.png`` and ``compare.json`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "plot": out / "compare.png", "json": out / "compare.json"}
    paths["markdown"].write_text(markdown_table(result))
    plot_comparison(result, paths["plot"])
    records = {**result, "variants": [asdict(v) for v in result["variants"]]}
    paths["json"].write_text(json.dumps(records, indent=2) + "\n")
    return paths
