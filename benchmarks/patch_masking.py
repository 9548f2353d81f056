"""Patch masking (MDT / MaskDiT) against plain training of a diffusion Transformer: training time saved and quality
lost, judged by a classifier run (``formerkit bench samples``' judge).

Three runs of the same recipe (``dit-digits`` by default):

- ``plain``: the recipe as it is (no masking);
- ``masked``: ``objective.patch_mask_ratio`` (0.5) with ``objective.decoder_layers`` (2) side-decoder blocks, the
  same number of steps -- what masking saves in time and costs in quality;
- ``masked, same time`` (``--same-time``): the masked run given as many steps as it takes in the plain run's
  training time (the steps scaled by the two runs' measured training throughput).

Each trained run draws ``--samples`` images (the classes in turn) with the recipe's sampler, steps and guidance, and
the classifier judges them: the fraction recognized as their class and the Fréchet distance of its features to the
real test images (beside the real training images' distance, the floor, and the class-mean baseline's).

    formerkit train cct-digits --out /tmp/geneval-cls
    python benchmarks/patch_masking.py --classifier /tmp/geneval-cls --out /tmp/masking [--parallel] [--same-time]
    python benchmarks/patch_masking.py --classifier /tmp/geneval-cls --out - --speed-only 20   # step times only

``--parallel`` trains the plain and masked runs at the same time, one thread each (on a machine with two free cores
their times stay comparable and the whole takes half as long); without it they run one after the other with the
default threads. ``--set KEY=VALUE`` overrides the recipe for every run (e.g. ``--set schedule.steps=1500``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

FORMERKIT = [sys.executable, "-c", "from formerkit.cli import main; main()"]


def train_command(recipe: str, out: Path, overrides: list[str]) -> list[str]:
    return [*FORMERKIT, "train", recipe, "--out", str(out), *[item for key in overrides for item in ("--set", key)]]


def run_trainings(jobs: list[tuple[str, list[str]]], parallel: bool) -> None:
    """Runs each (name, command); in parallel with one thread each, or one after the other."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if parallel:
        env["OMP_NUM_THREADS"] = "1"
        processes = [(name, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)) for name, command in jobs]
        for name, process in processes:
            if process.wait() != 0:
                raise SystemExit(f"training {name} failed")
        return
    for name, command in jobs:
        print(f"training {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def summary(run: Path) -> dict:
    """The run's summary, with ``train_seconds`` (the elapsed time at its last training record) and
    ``mean_img_per_s`` (the images it trained on over that time; the summary's own throughput is the last log
    window's, which says little when another run shared the machine for part of the time)."""
    info = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [record for record in records if record.get("kind") == "train"][-1]
    batch = int(_recipe_value(run, "schedule", "batch_size"))
    return {**info, "train_seconds": last["elapsed"], "mean_img_per_s": last["step"] * batch / last["elapsed"]}


def _recipe_value(run: Path, section: str, key: str):
    from formerkit.config import load_yaml

    return load_yaml((run / "recipe.yaml").read_text())[section][key]


def trained(run: Path) -> bool:
    """Whether ``run`` already holds a completed run (``--reuse`` then skips training it)."""
    path = run / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "completed"


def draw(run: Path, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``count`` samples of the run (classes in turn) with the recipe's sampler settings; (images, labels, seconds
    to draw them)."""
    from formerkit.data import build_data
    from formerkit.runs import load_run_model
    from formerkit.train.objectives import make_objective

    model, recipe, _ = load_run_model(run)
    objective = make_objective(recipe.objective, build_data(recipe.data))
    labels = torch.arange(count) % objective.classes
    start = time.perf_counter()
    images = objective.sample(model, labels, generator=torch.Generator().manual_seed(seed))
    return images, labels, time.perf_counter() - start


def step_times(recipe: str, overrides: list[str], ratio: float, decoder_layers: int, rounds: int) -> dict[str, float]:
    """Median seconds of one training step (the objective's loss, backward, AdamW step) of the recipe's model, plain
    and patch-masked, the two taking turns in this one process (each ``rounds`` times, after a warm-up): the
    speed-up with the machine's load shared alike, which separate runs' wall times do not give."""
    import statistics

    from formerkit.cli import _parse_overrides
    from formerkit.data import build_data
    from formerkit.data.base import step_generator
    from formerkit.models.transformer import build_model
    from formerkit.train.config import load_recipe
    from formerkit.train.objectives import make_objective
    from formerkit.train.trainer import build_optimizer

    config = load_recipe(recipe).with_overrides(_parse_overrides(overrides))
    bundle = build_data(config.data)
    contenders = {}
    for name, masked in (("plain", 0.0), ("masked", ratio)):
        objective_config = config.objective.replace(patch_mask_ratio=masked, decoder_layers=decoder_layers)
        objective = make_objective(objective_config, bundle)
        torch.manual_seed(0)
        model = objective.wrap_model(build_model(config.model.resolve({**bundle.model_fields,
                                                                       **objective.model_fields()}))).train()
        contenders[name] = (objective, model, build_optimizer(model, config.optim))
    batch_size = config.schedule.batch_size

    def step(name: str, index: int) -> float:
        objective, model, optimizer = contenders[name]
        batch = bundle.train.take(bundle.train.sample_indices(batch_size, 0, index))
        start = time.perf_counter()
        objective.loss(model, batch, step_generator(0, 5, index)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for index in range(rounds + 2):
        for name in contenders:
            seconds = step(name, index)
            if index >= 2:  # two warm-up steps each
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", required=True, help="the judge: a cct-digits run")
    parser.add_argument("--out", required=True, help="where the runs go")
    parser.add_argument("--recipe", default="dit-digits")
    parser.add_argument("--ratio", type=float, default=0.5, help="objective.patch_mask_ratio of the masked runs")
    parser.add_argument("--decoder-layers", type=int, default=2, help="objective.decoder_layers of the masked runs")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", action="store_true", help="train plain and masked at once, a thread each")
    parser.add_argument("--same-time", action="store_true", help="also a masked run with the plain run's time")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (all runs)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--reuse", action="store_true", help="skip training runs already completed in --out")
    parser.add_argument("--speed-only", type=int, metavar="ROUNDS", default=0,
                        help="only time plain and masked training steps in one process, taking turns ROUNDS times")
    args = parser.parse_args(argv)
    if args.speed_only:
        times = step_times(args.recipe, args.set, args.ratio, args.decoder_layers, args.speed_only)
        print(f"Recipe {args.recipe}, overrides {args.set or 'none'}; masked: ratio {args.ratio}, decoder_layers "
              f"{args.decoder_layers}; median of {args.speed_only} interleaved steps, {torch.get_num_threads()} "
              f"threads\n\n| run | s/step | speed-up |\n|---|---|---|\n| plain | {times['plain']:.4f} | 1.00x |\n"
              f"| masked | {times['masked']:.4f} | {times['plain'] / times['masked']:.2f}x |")
        return 0

    from formerkit.bench.generation import SampleJudge, judge_samples

    judge = SampleJudge(args.classifier)  # refuses a wrong classifier before any training

    out = Path(args.out)
    masking = [f"objective.patch_mask_ratio={args.ratio}", f"objective.decoder_layers={args.decoder_layers}"]
    runs = {"plain": (out / "plain", list(args.set)), "masked": (out / "masked", [*args.set, *masking])}
    run_trainings([(name, train_command(args.recipe, path, overrides)) for name, (path, overrides) in runs.items()
                   if not (args.reuse and trained(path))], args.parallel)
    plain, masked = summary(runs["plain"][0]), summary(runs["masked"][0])
    if args.same_time:
        # The steps the masked run takes in the plain run's training time, at its measured mean speed.
        steps = round(masked["steps"] * plain["train_seconds"] / masked["train_seconds"])
        path = out / "masked-same-time"
        runs["masked, same time"] = (path, [*args.set, *masking, f"schedule.steps={steps}"])
        if not (args.reuse and trained(path)):
            # With --parallel, alone but with the one thread the others had.
            run_trainings([("masked, same time", train_command(args.recipe, path, runs["masked, same time"][1]))],
                          args.parallel)
    rows, figures = [], {}
    for name, (path, overrides) in runs.items():
        info = summary(path)
        images, labels, seconds = draw(path, args.samples, args.seed)
        report = judge_samples(images, labels, judge, seed=args.seed)
        figures[name] = {"overrides": overrides, "steps": info["steps"], "train_seconds": info["train_seconds"],
                         "mean_img_per_s": info["mean_img_per_s"], "sample_seconds": seconds, **report.as_dict()}
        rows.append(f"| {name} | {info['steps']} | {info['train_seconds']:.0f} | {info['mean_img_per_s']:.0f} | "
                    f"{report.recognized:.1%} | {report.fd_samples:.3g} | {seconds:.1f} |")
    reference = next(iter(figures.values()))
    lines = [f"Recipe {args.recipe}; masked runs: objective.patch_mask_ratio={args.ratio}, "
             f"objective.decoder_layers={args.decoder_layers}; overrides {args.set or 'none'}; "
             f"{'trained in parallel, one thread each' if args.parallel else 'trained one after the other'}; "
             f"{args.samples} samples each (seed {args.seed}), judged by {args.classifier}.", "",
             "| run | steps | training s | mean train img/s | recognized | FD to test | sampling s |",
             "|---|---|---|---|---|---|---|", *rows,
             f"| real training images (floor) | | | | | {reference['fd_train']:.3g} | |",
             f"| class mean + N(0, {reference['baseline_noise']:g}²) noise | | | | "
             f"{reference['baseline_recognized']:.1%} | {reference['fd_baseline']:.3g} | |"]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
