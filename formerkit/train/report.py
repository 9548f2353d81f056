"""What a run leaves for people to look at: loss and metric plots, and a one-screen summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["next_commands", "plot_run", "print_summary"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes plots/loss.png (training and evaluation loss) and plots/metrics.png (other evaluation metrics)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    run_dir = Path(run_dir)
    records = _records(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return []
    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    losses = {"train loss": [(r["step"], r["loss"]) for r in train]}
    for key in sorted({k for r in evals for k in r if k.endswith("_loss")}):
        losses[key.replace("_", " ")] = [(r["step"], r[key]) for r in evals if key in r]
    written = [_plot(plt, folder / "loss.png", losses, "loss")]
    others = sorted({k for r in evals for k in r if k not in ("step", "kind", "elapsed") and not k.endswith("_loss")})
    if others:
        series = {key.replace("_", " "): [(r["step"], r[key]) for r in evals if key in r] for key in others}
        written.append(_plot(plt, folder / "metrics.png", series, "metric"))
    return written


def _plot(plt, path: Path, series: dict[str, list[tuple[float, float]]], ylabel: str) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        # Training loss is logged often: a line; evaluations are sparse: markers.
        axis.plot(*zip(*points), label=label, **({"linewidth": 1} if label == "train loss" else {"marker": "o"}))
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def next_commands(run_dir: Path, objective: str, prompt: str | None = None) -> list[str]:
    """The commands worth running after a run; a language model's sample starts from ``prompt`` (the start of the
    run's own data) or, without one, from nothing."""
    import shlex

    run = shlex.quote(str(run_dir))
    commands = [f"formerkit eval {run}", f"formerkit summary {shlex.quote(str(run_dir / 'model'))}"]
    if objective == "causal_lm":
        commands.append(f"formerkit generate {run}" + (f" --prompt {shlex.quote(prompt)}" if prompt else ""))
    commands.append(f"formerkit report {run}")
    return commands


def print_summary(console, run_dir: Path, summary: dict[str, Any], prompt: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['name']}: {summary['status']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in summary.items():
        if key in ("name", "status", "previous_stage") or (key == "recipe" and value == summary["name"]):
            continue
        if isinstance(value, float):
            if "accuracy" in key or "exact_match" in key:
                value = f"{value:.2%}"
            elif key.endswith("_s"):  # seconds and rates
                value = f"{value:,.1f}"
            else:
                value = f"{value:,.4f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    console.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)
    console.print("next:", highlight=False)
    for command in next_commands(run_dir, summary["objective"], prompt):
        # One command a line, never wrapped (soft_wrap: a long line stays one line, to copy or to read in a log).
        console.print(f"  {command}", highlight=False, soft_wrap=True, markup=False)
