"""Adaptive inference on scikit-learn's digits: token merging (ToMe) and confidence-based early exit.

Trains the ``vit-digits`` and ``cct-digits`` recipes (or loads the runs already in ``--runs``), and optionally a
``vit-digits`` run with deep supervision of its exits (``objective.exit_loss_weight``), then measures on the test split:

- token merging: accuracy and images/s of batched inference for several ``r`` (tokens merged per layer, or one count
  per layer), with the tokens left after the last layer;
- early exit: accuracy, mean layers used and images/s for several confidence thresholds.

Speeds are medians over ``--repeats`` passes over the test set, the settings interleaved so that a change in the
machine's load hits them alike; the speed-ups are given by wall-clock time and by this process's CPU time (steadier
when other work shares the machine). Prints Markdown tables.

    python benchmarks/adaptive_inference.py --runs runs/adaptive            # trains what is missing (~1.5 min each)
    python benchmarks/adaptive_inference.py --runs runs/adaptive --exit-loss-weight 1.0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from formerkit.data import build_data
from formerkit.models.early_exit import early_exit
from formerkit.runs import load_run_model
from formerkit.train import load_recipe, train


def run_dir(root: Path, name: str, recipe: str, overrides: dict | None = None) -> Path:
    """The run ``root/name``, trained from ``recipe`` first if it has no saved model."""
    path = root / name
    if not (path / "model" / "config.json").exists():
        print(f"training {recipe} into {path} {overrides or ''}", flush=True)
        train(load_recipe(recipe), path, overrides=overrides)
    return path


def test_split(path: Path):
    model, recipe, _ = load_run_model(path)
    test = build_data(recipe.data).test.tensors
    return model, test["inputs"], test["labels"]


def timed(fn, inputs: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, all threads) for one pass over ``inputs`` in batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for begin in range(0, len(inputs), batch_size):
        fn(inputs[begin:begin + batch_size])
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(settings: dict, inputs: torch.Tensor, batch_size: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(images per wall-clock second, images per CPU second) of each setting: medians over ``repeats`` interleaved
    passes, after one warm-up. CPU time is the steadier measure on a machine other work shares."""
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    with torch.inference_mode():
        for fn in settings.values():
            timed(fn, inputs, batch_size)
        for _ in range(repeats):
            for name, fn in settings.items():
                seconds[name].append(timed(fn, inputs, batch_size))
    return {name: (len(inputs) / statistics.median(v[0] for v in values),
                   len(inputs) / statistics.median(v[1] for v in values)) for name, values in seconds.items()}


def speed_cells(speed: tuple[float, float], base: tuple[float, float]) -> str:
    return f"{speed[0]:,.0f} | {speed[0] / base[0]:.2f}x | {speed[1] / base[1]:.2f}x"


def token_merging_table(title: str, path: Path, schedules: list, batch_size: int, repeats: int) -> str:
    model, inputs, labels = test_split(path)
    settings, rows = {}, []
    for r in schedules:
        settings[str(r)] = lambda x, r=r: model(x, merge_tokens=r)
    speed = measure(settings, inputs, batch_size, repeats)
    base = speed[str(schedules[0])]
    with torch.inference_mode():
        for r in schedules:
            out = model(inputs, merge_tokens=r, return_outputs=True)
            accuracy = (out.logits.argmax(-1) == labels).float().mean().item()
            tokens = out.last_hidden_state.shape[1]
            rows.append(f"| {r} | {tokens} | {100 * accuracy:.2f} | {speed_cells(speed[str(r)], base)} |")
    config = model.config
    header = (f"**{title}** ({config.num_layers} layers, width {config.width}, "
              f"{model.stem.num_tokens(inputs[:1])} tokens incl. {config.stem.num_prefix_tokens} prefix; "
              f"{len(inputs)} test images, batch {batch_size})\n\n"
              "| r (per layer) | tokens after last layer | accuracy % | images/s | speed (wall) | speed (CPU time) |\n"
              "|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def early_exit_table(title: str, path: Path, thresholds: list[float], batch_size: int, repeats: int) -> str:
    model, inputs, labels = test_split(path)
    settings = {"full model": lambda x: model(x)}
    for t in thresholds:
        settings[str(t)] = lambda x, t=t: early_exit(model, x, t)
    speed = measure(settings, inputs, batch_size, repeats)
    base = speed["full model"]
    with torch.inference_mode():
        full = (model(inputs).argmax(-1) == labels).float().mean().item()
        rows = [f"| full model | {100 * full:.2f} | {model.config.num_layers:.2f} | {speed_cells(base, base)} |"]
        for t in thresholds:
            logits, layers = early_exit(model, inputs, t)
            accuracy = (logits.argmax(-1) == labels).float().mean().item()
            rows.append(f"| {t} | {100 * accuracy:.2f} | {layers.float().mean().item():.2f} | "
                        f"{speed_cells(speed[str(t)], base)} |")
    header = (f"**{title}** ({model.config.num_layers} layers; {len(inputs)} test images, batch {batch_size})\n\n"
              "| exit threshold | accuracy % | mean layers | images/s | speed (wall) | speed (CPU time) |\n"
              "|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def parse_schedule(text: str):
    values = [int(part) for part in text.split(",")]
    return values[0] if len(values) == 1 else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/adaptive", help="where the runs are (trained if missing)")
    parser.add_argument("--vit-r", nargs="+", default=["0", "1", "2", "4,2,2,1,1,0", "8,4,2,0,0,0"],
                        help="token-merging settings for the ViT: r, or one r per layer separated by commas")
    parser.add_argument("--cct-r", nargs="+", default=["0", "4", "8", "16", "21"])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
    parser.add_argument("--exit-loss-weight", type=float, default=None,
                        help="also train and measure a vit-digits run with this deep-supervision weight")
    parser.add_argument("--skip-cct", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while measuring (default 1: with several threads, work elsewhere on the "
                             "machine stalls their barriers and the timings swing by several times)")
    args = parser.parse_args()
    root = Path(args.runs)
    torch.manual_seed(0)
    vit = run_dir(root, "vit-digits", "vit-digits")
    cct = None if args.skip_cct else run_dir(root, "cct-digits", "cct-digits")
    deep = None
    if args.exit_loss_weight is not None:
        deep = run_dir(root, f"vit-digits-exit{args.exit_loss_weight:g}", "vit-digits",
                       {"objective.exit_loss_weight": args.exit_loss_weight})
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("### Token merging\n")
    print(token_merging_table("vit-digits", vit, [parse_schedule(r) for r in args.vit_r], args.batch_size,
                              args.repeats) + "\n")
    if cct is not None:
        print(token_merging_table("cct-digits", cct, [parse_schedule(r) for r in args.cct_r], args.batch_size,
                                  args.repeats) + "\n")
    print("### Early exit\n")
    print(early_exit_table("vit-digits", vit, args.thresholds, args.batch_size, args.repeats) + "\n")
    if deep is not None:
        print(early_exit_table(f"vit-digits trained with objective.exit_loss_weight={args.exit_loss_weight:g}", deep,
                               args.thresholds, args.batch_size, args.repeats) + "\n")
    if cct is not None:
        print(early_exit_table("cct-digits", cct, args.thresholds, args.batch_size, args.repeats) + "\n")


if __name__ == "__main__":
    main()
