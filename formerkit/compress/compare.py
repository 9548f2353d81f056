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
from dataclasses import asdict, dataclass, field
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

__all__ = ["Variant", "compare", "latency_warnings", "non_dominated", "pareto_front", "write_comparison"]


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
    pareto: bool = False  # on the front of all three: quality, latency (largest batch) and size
    # batch size -> [min, first quartile, median, third quartile, max] milliseconds of the timed passes
    latency_spread_ms: dict[int, list[float]] = field(default_factory=dict)


def _weights_megabytes(directory: Path) -> float:
    """The size on disk (MB) of the weights file config.json names."""
    return (directory / read_document(directory).get("weights", {}).get("file", WEIGHTS_FILE)).stat().st_size / 1e6


def _label(target: Path) -> str:
    """A variant's default name: the run directory's name (``model/`` inside a run names the run)."""
    target = target.resolve()
    return target.parent.name if target.name == "model" else target.name


def non_dominated(costs: list[tuple[float, ...]]) -> list[bool]:
    """For each point (costs, lower is better on every axis), whether no other point is at least as low on every axis
    and lower on one. Equal points do not dominate each other: both stay on the front."""
    return [not any(all(o <= m for o, m in zip(other, mine)) and other != mine for other in costs) for mine in costs]


def _quality_cost(variant: Variant, higher_is_better: bool) -> float:
    return -variant.value if higher_is_better else variant.value


def pareto_front(variants: list[Variant], higher_is_better: bool, axes: tuple[str, ...] = ("latency", "size")
                 ) -> list[bool]:
    """For each variant, whether no other one is at least as good in quality and every cost of ``axes`` ("latency":
    at the largest batch, "size": on disk) and better in one of them."""
    batch = max(variants[0].latency_ms)
    of = {"latency": lambda v: v.latency_ms[batch], "size": lambda v: v.megabytes}
    return non_dominated([(_quality_cost(v, higher_is_better), *(of[axis](v) for axis in axes)) for v in variants])


def _spread(times: list[float]) -> list[float]:
    """[min, first quartile, median, third quartile, max]."""
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return [min(times), quartiles[0], quartiles[1], quartiles[2], max(times)]


def latency_warnings(variants: list[Variant]) -> list[str]:
    """One line per batch size where two variants' median latencies differ by less than the wider of their
    interquartile ranges: there the order of the two is the timing noise's, not the models'."""
    warnings = []
    for size in variants[0].latency_spread_ms:
        close = []
        for index, first in enumerate(variants):
            for second in variants[index + 1:]:
                a, b = first.latency_spread_ms[size], second.latency_spread_ms[size]
                difference, spread = abs(a[2] - b[2]), max(a[3] - a[1], b[3] - b[1])
                if spread > difference:
                    close.append(f"{first.name}/{second.name} ({difference:.2g} ms apart, spread {spread:.2g} ms)")
        if close:
            shown = ", ".join(close[:4]) + (f" and {len(close) - 4} more pairs" if len(close) > 4 else "")
            warnings.append(f"batch {size}: the latencies' spread (interquartile range) is wider than the difference "
                            f"between {shown}: the timing cannot tell those apart; time longer (--seconds) or on a "
                            "quieter machine")
    return warnings


def compare(targets: list[str | Path], *, names: list[str] | None = None, split: str | None = None,
            batch_sizes: tuple[int, ...] = (1, 64), repeats: int | None = None, seconds: float = 10.0,
            warmup: int = 3) -> dict[str, Any]:
    """Measures every target (a run directory or a model directory a run saved) in one run.

    All targets must be variants of one task: the same data and the same objective kind (a quantized, pruned or
    distilled model keeps its run's recipe). Quality is the objective's primary metric on ``split`` (the recipe's
    test split by default, else valid), computed with the first target's data and objective for all. Latency is the
    median wall time of one forward pass (and the objective's metric, negligible beside it) on the split's first
    ``b`` examples for each ``b`` in ``batch_sizes``, with the variants timed in turn ``repeats`` times after
    ``warmup`` passes each, under ``torch.inference_mode`` on the CPU with torch's current thread count. Without
    ``repeats``, as many rounds as fit in about ``seconds`` (shared evenly by the batch sizes; at least 5 rounds),
    judged from the warm-up passes. Each variant keeps the spread of its times (``latency_spread_ms``) and
    ``result["warnings"]`` names the variants whose latencies the spread cannot tell apart.
    """
    if not targets:
        raise InputError("compare: give at least one run or model directory")
    if names is not None and len(names) != len(targets):
        raise InputError(f"compare: {len(names)} names for {len(targets)} targets; give one name per target or none")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"compare: batch sizes must be positive integers, got {list(batch_sizes)}")
    if (repeats is not None and repeats < 1) or warmup < 0 or seconds <= 0:
        raise InputError(f"compare: repeats must be >= 1, warmup >= 0 and seconds > 0, got {repeats}, {warmup} and "
                         f"{seconds}")
    warmup = max(warmup, 1) if repeats is None else warmup  # the time budget is judged from a warm-up pass
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
    rounds = {}
    with torch.inference_mode():
        for size, batch in batches.items():
            times: list[list[float]] = [[] for _ in models]
            total = warmup + (repeats or 0)
            round_ = 0
            while round_ < total:
                for model, record in zip(models, times):
                    begin = time.perf_counter()
                    objective.evaluate(model, [batch])
                    record.append((time.perf_counter() - begin) * 1000)
                round_ += 1
                if repeats is None and round_ == warmup:  # the budget's rounds, from the last warm-up round's time
                    last_round = sum(record[-1] for record in times) / 1000
                    total = warmup + max(5, min(10_000, int(seconds / len(batches) / max(last_round, 1e-6))))
            rounds[size] = total - warmup
            for variant, record in zip(variants, times):
                variant.latency_ms[size] = statistics.median(record[warmup:])
                variant.latency_spread_ms[size] = _spread(record[warmup:])
    for variant, on_front in zip(variants, pareto_front(variants, objective.higher_is_better)):
        variant.pareto = on_front
    return {"metric": metric, "higher_is_better": objective.higher_is_better, "split": split,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": rounds,
            "batch_sizes": list(batch_sizes), "variants": variants, "warnings": latency_warnings(variants)}


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
        row += [_latency_text(variant, b) for b in sizes]
        row += [f"{base.latency_ms[b] / variant.latency_ms[b]:.2f}x" for b in sizes]
        row += ["yes" if variant.pareto else ""]
        lines.append("| " + " | ".join(row) + " |")
    direction = "higher" if result["higher_is_better"] else "lower"
    lines.append("")
    repeats = result["repeats"]
    counts = ", ".join(f"{repeats[b]} (batch {b})" for b in sizes) if isinstance(repeats, dict) else repeats
    lines.append(f"{metric} ({direction} is better) on the whole split; latency is the median [interquartile range] "
                 f"of {counts} forward passes with the variants timed in turn, "
                 f"{result['threads']} threads, torch {result['torch']}; size is the weights file on disk; change and "
                 f"speed-up are against {base.name}. Pareto: no other variant is as good or better in quality, "
                 "latency and size at once.")
    lines += [f"WARNING: {warning}" for warning in result.get("warnings", [])]
    return "\n".join(lines) + "\n"


def _latency_text(variant: Variant, size: int) -> str:
    spread = variant.latency_spread_ms.get(size)
    median = f"{variant.latency_ms[size]:.2f}"
    return median if spread is None else f"{median} [{spread[1]:.2f}–{spread[3]:.2f}]"


_MARKERS = "osD^vPX*"


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    """Quality against latency (at the largest batch) and against size, the Pareto variants filled in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants: list[Variant] = result["variants"]
    metric, batch = result["metric"], max(result["batch_sizes"])
    scale = 100 if metric.endswith("accuracy") else 1
    colours = plt.get_cmap("tab10")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for axis, (name, label, x_of) in zip(axes, (("latency", f"latency at batch {batch} (ms)",
                                                  lambda v: v.latency_ms[batch]),
                                                 ("size", "size on disk (MB)", lambda v: v.megabytes))):
        # The front of this panel's two axes: a variant on the three-axis front can be beaten here on both.
        on_front = pareto_front(variants, result["higher_is_better"], axes=(name,))
        front = sorted((v for v, on in zip(variants, on_front) if on), key=lambda v: (x_of(v), -v.value))
        if len(front) > 1:  # the best quality at each cost: a staircase through the front
            axis.plot([x_of(v) for v in front], [scale * v.value for v in front], color="0.5", alpha=0.6,
                      drawstyle="steps-post", zorder=1, label="Pareto front (this panel)")
        for index, (variant, on) in enumerate(zip(variants, on_front)):
            colour = colours(index % 10)
            if name == "latency" and variant.latency_spread_ms.get(batch):  # interquartile range of the times
                low, high = variant.latency_spread_ms[batch][1], variant.latency_spread_ms[batch][3]
                axis.plot([low, high], [scale * variant.value] * 2, color=colour, alpha=0.5, linewidth=3, zorder=2)
            # Each variant its own colour and shape, smaller for later ones: equal points stay visible, nested.
            axis.scatter(x_of(variant), scale * variant.value, s=max(30, 110 - 16 * index), linewidths=1.5,
                         marker=_MARKERS[index % len(_MARKERS)], edgecolors=colour,
                         facecolors=colour if on else "white", zorder=3 + index)
        axis.set_xlabel(label)
        axis.set_ylabel(metric + (" (%)" if scale == 100 else ""))
        axis.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=_MARKERS[i % len(_MARKERS)], markersize=8,
                      color=colours(i % 10)) for i in range(len(variants))]
    labels = [variant.name for variant in variants]
    if any(line.get_label().startswith("Pareto") for axis in axes for line in axis.get_lines()):
        handles.append(Line2D([], [], color="0.5", drawstyle="steps-post"))
        labels.append("Pareto front")
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    figure.suptitle("variants: filled = on the panel's Pareto front (no other is both better and cheaper); "
                    "bars = latency interquartile range", fontsize=10)
    figure.tight_layout(rect=(0, 0.12 if len(labels) <= 6 else 0.2, 1, 1))
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
