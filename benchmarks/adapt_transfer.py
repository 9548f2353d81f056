"""Vision transfer with adapters: a CCT trained on digits 0-4, adapted to digits 5-9 by five methods.

The data is formerkit's own digits split (``data.source: digits``: scikit-learn's 8x8 digits, a fixed stratified 75/25
train/test split, normalized with the training split's statistics), filtered by class. The model is the
``cct-digits`` recipe's layout (CCT-2/3x2, width 128, no pooling in the tokenizer) with a 5-way head:

1. pretraining: ``formerkit.fit`` on the training images of digits 0-4 (``--pretrain-steps``);
2. transfer to digits 5-9: the head's projection replaced by a new 5-way one (digit 5 -> class 0, ... 9 -> 4; the
   attention pooling kept), then ``formerkit.fit`` on the training images of 5-9 with the same steps, batch and seed
   for every method, each at its own learning rate (``LEARNING_RATES``; adapters want a higher one than the whole
   model):

   - full: every parameter;
   - lora: LoRA (Hu et al. 2021) on q, k, v, out, fc_in and fc_out of both blocks, the largest power-of-two rank
     that keeps the trainable parameters (the head included) at most ``--budget`` of the model's;
   - adapter: AdaptFormer's parallel bottleneck adapters (Chen et al. 2022), the largest power-of-two bottleneck
     within the same budget;
   - partial: norms and biases only (``method="partial", which="norms_biases"``: BitFit-style);
   - head: the head only (pooling and projection).

   The new head trains in every method. Each method runs in a fresh process per seed, so its peak memory is its own.

Reported per method: trainable parameters (count and share of the adapted model's), test accuracy on digits 5-9
(mean over ``--seeds``, each seed's in brackets), training wall time (``fit`` alone) and peak memory: the growth of
the process's peak resident memory over ``fit`` (after a one-step warm-up on a copy, so lazily loaded code counts for
no method), and the process's whole peak. Prints a Markdown table; ``--json`` writes the records.

Choosing settings without the test split: ``--cv K`` chooses each method's settings among ``CV_GRID`` by K-fold
cross-validation on the 5-9 *training* images (``kfold_splits``: stratified; each candidate trained K times on all
folds but one with the measured runs' steps, batch and seed 0; the lowest mean held-out loss wins), ``--cv-json``
keeping every candidate's record and ``--chosen`` reading such records back (so the choice and the measured runs
can be separate invocations, ``--base-dir`` keeping the source model between them). The older ``--select`` (one
held-out fifth: too few images to rank rates) and ``--rate lora=0.02`` remain.

    python benchmarks/adapt_transfer.py [--pretrain-steps 200] [--steps 300] [--batch 64] [--seeds 0 1] [--threads 1]
        [--base-dir DIR] [--cv K [--cv-methods METHOD ...] [--cv-json PATH] [--cv-only]] [--chosen PATH]
        [--select METHOD ...] [--rate METHOD=LR ...]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
METHODS = ("full", "lora", "adapter", "partial", "head")
LORA_TARGETS = ("q", "k", "v", "out", "fc_in", "fc_out")
# Chosen before any run, not tuned on the test split: AdamW's usual 1e-3 for the whole model (half the rate the
# recipe trains from scratch with), 5e-3 for the small added modules and the norms/biases, 1e-2 for a linear probe.
LEARNING_RATES = {"full": 1e-3, "lora": 5e-3, "adapter": 5e-3, "partial": 5e-3, "head": 1e-2}
PRETRAIN_LR = 2e-3  # the cct-digits recipe's
# --select: the rates tried for each adapted method, on a held-out part of the training images (``select_rates``).
RATE_CANDIDATES = {"lora": (5e-3, 1e-2, 2e-2, 4e-2), "adapter": (5e-3, 2e-2, 5e-2), "partial": (5e-3, 2e-2),
                   "head": (1e-2, 3e-2), "full": (5e-4, 1e-3, 2e-3)}


def class_subset(inputs: Tensor, labels: Tensor, classes) -> tuple[Tensor, Tensor]:
    """The examples whose label is one of ``classes`` (in their order in the split), labels renumbered 0..len-1 in
    the order ``classes`` lists them."""
    classes = list(classes)
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    renumber = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    renumber[torch.tensor(classes)] = torch.arange(len(classes))
    return inputs[keep], renumber[labels[keep]]


def digits(classes) -> dict[str, tuple[Tensor, Tensor]]:
    """{"train": (inputs, labels), "test": ...} of formerkit's digits split restricted to ``classes``."""
    from formerkit.data import build_data
    from formerkit.train import load_recipe

    bundle = build_data(load_recipe("cct-digits").data)
    return {name: class_subset(split.tensors["inputs"], split.tensors["labels"], classes)
            for name, split in (("train", bundle.train), ("test", bundle.test))}


def cct_config(num_classes: int):
    """The cct-digits recipe's model with ``num_classes`` outputs."""
    from formerkit.data import build_data
    from formerkit.train import load_recipe

    recipe = load_recipe("cct-digits")
    fields = {**build_data(recipe.data).model_fields, "num_classes": num_classes}
    return recipe.model.resolve(fields)


def accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(inputs[i:i + 256]).argmax(-1) for i in range(0, len(inputs), 256)])
    return (predictions == labels).float().mean().item()


def adapt(model: nn.Module, method: str, *, rank: int, bottleneck: int, seed: int, alpha: float | None = None,
          rslora: bool = False, scale: float = 0.1) -> nn.Module:
    """A new 5-way head projection (seeded), then ``method``'s trainable parameters; the head always trains. LoRA's
    ``alpha`` defaults to 2 x rank; ``scale`` is the adapters'."""
    import formerkit

    torch.manual_seed(seed)
    old = model.head.projection
    model.head.projection = nn.Linear(old.in_features, len(TARGET_CLASSES))
    if method == "lora":
        formerkit.add_adapters(model, method="lora", targets=LORA_TARGETS, rank=rank,
                               alpha=2 * rank if alpha is None else alpha, rslora=rslora)
    elif method == "adapter":
        formerkit.add_adapters(model, method="adapter", bottleneck=bottleneck, scale=scale)
    elif method == "partial":
        formerkit.add_adapters(model, method="partial", which="norms_biases")
    elif method == "head":
        formerkit.add_adapters(model, method="partial", which="head")
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    for parameter in model.head.parameters():
        parameter.requires_grad_(True)
    return model


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def largest_within(budget: float, base: nn.Module, method: str, **fixed) -> int:
    """The largest power of two (LoRA rank or adapter bottleneck) whose adapted model trains at most ``budget`` of
    its parameters."""
    chosen, size = 0, 1
    while size <= 128:
        key = "rank" if method == "lora" else "bottleneck"
        trainable, total = trainable_share(adapt(copy.deepcopy(base), method, **{**fixed, key: size}))
        if trainable > budget * total:
            break
        chosen, size = size, size * 2
    if not chosen:
        raise SystemExit(f"no {method} size keeps the trainable parameters within {budget:.0%}")
    return chosen


def held_out_split(inputs: Tensor, labels: Tensor, share: float = 0.2, seed: int = 0):
    """((inputs, labels) to train on, (inputs, labels) held out): every class's images in a seeded random order, the
    first ``share`` of each held out. For choosing learning rates without looking at the test split."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        where = where[torch.randperm(len(where), generator=generator)]
        held[where[:round(share * len(where))]] = True
    return (inputs[~held], labels[~held]), (inputs[held], labels[held])


def select_rates(base: nn.Module, target: dict, methods, *, rank: int, bottleneck: int, steps: int, batch: int,
                 seed: int) -> dict[str, float]:
    """For each of ``methods``, the rate of ``RATE_CANDIDATES`` with the best accuracy on a held-out fifth of the
    training images of 5-9 (ties: the lower held-out loss), each trained on the other four fifths."""
    import formerkit

    (train_x, train_y), (held_x, held_y) = held_out_split(*target["train"])
    chosen = {}
    for method in methods:
        results = []
        for lr in RATE_CANDIDATES[method]:
            model = adapt(copy.deepcopy(base), method, rank=rank, bottleneck=bottleneck, seed=seed)
            formerkit.fit(model, (train_x, train_y), steps=steps, batch_size=batch, lr=lr, seed=seed,
                          warmup_steps=0.1)
            model.eval()
            with torch.inference_mode():
                logits = model(held_x)
            loss = torch.nn.functional.cross_entropy(logits, held_y).item()
            results.append(((logits.argmax(-1) == held_y).float().mean().item(), -loss, lr))
            print(f"  select {method} lr {lr:g}: held-out accuracy {results[-1][0]:.4f}, loss {loss:.4f} "
                  f"({len(held_y)} images)", file=sys.stderr, flush=True)
        chosen[method] = max(results)[2]
    return chosen


# --cv: the settings tried for each method by k-fold cross-validation on the 5-9 *training* images, fixed before
# any cross-validated run (three each, for the machine's time): learning rates around each method's prior rate
# (LEARNING_RATES); for LoRA alpha stays 2 x rank (with Adam, a larger alpha acts much like a larger rate on the
# product, which the rate grid spans); for the adapters also the output scale (AdaptFormer's 0.1, and 1: the
# zero-initialized up-projection scaled by 0.1 learned slowly at 5e-3). LoRA's rank and the adapters' bottleneck
# stay the largest within the budget (``largest_within``). Partial and head tuning keep LEARNING_RATES unless given.
CV_GRID = {
    "full": [{"lr": lr} for lr in (5e-4, 1e-3, 2e-3)],
    "lora": [{"lr": lr} for lr in (5e-3, 1e-2, 2e-2)],
    "adapter": [{"lr": 2e-2, "scale": 0.1}, {"lr": 5e-3, "scale": 1.0}, {"lr": 2e-2, "scale": 1.0}],
    "partial": [{"lr": lr} for lr in (5e-3, 2e-2, 5e-2)],
    "head": [{"lr": lr} for lr in (1e-2, 3e-2, 1e-1)],
}


def kfold_splits(labels: Tensor, folds: int, seed: int = 0) -> list[Tensor]:
    """``folds`` disjoint boolean masks covering every example once, stratified: each class's examples in a seeded
    random order, dealt to the folds in turn (so each fold holds ~1/folds of every class)."""
    if folds < 2:
        raise ValueError(f"folds: expected at least 2, got {folds}")
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        where = where[torch.randperm(len(where), generator=generator)]
        fold_of[where] = torch.arange(len(where)) % folds
    return [fold_of == k for k in range(folds)]


def cross_validate(base: nn.Module, train: tuple[Tensor, Tensor], method: str, candidates: list[dict], *, folds: int,
                   rank: int, bottleneck: int, steps: int, batch: int, seed: int = 0, log=None) -> list[dict]:
    """Each candidate of ``method`` trained ``folds`` times (on all folds but one, seed ``seed``, ``steps`` steps) and
    scored on the fold left out: one record per candidate with the mean held-out loss and the pooled held-out
    accuracy (every training image held out once). Only the training images are read."""
    import formerkit

    inputs, labels = train
    masks = kfold_splits(labels, folds, seed)
    records = []
    for candidate in candidates:
        losses, correct = [], 0
        options = {key: value for key, value in candidate.items() if key != "lr"}
        for held in masks:
            model = adapt(copy.deepcopy(base), method, rank=rank, bottleneck=bottleneck, seed=seed, **options)
            formerkit.fit(model, (inputs[~held], labels[~held]), steps=steps, batch_size=batch, lr=candidate["lr"],
                          seed=seed, warmup_steps=0.1)
            model.eval()
            with torch.inference_mode():
                logits = model(inputs[held])
            losses.append(torch.nn.functional.cross_entropy(logits, labels[held]).item())
            correct += int((logits.argmax(-1) == labels[held]).sum())
        record = {"method": method, **candidate, "cv_loss": statistics.mean(losses), "fold_losses": losses,
                  "cv_accuracy": correct / len(labels), "folds": folds, "steps": steps}
        records.append(record)
        if log:
            log(record)
    return records


def best_of(records: list[dict]) -> dict:
    """The candidate with the lowest mean held-out loss (the choice rule, fixed before any run)."""
    best = min(records, key=lambda r: r["cv_loss"])
    return {key: value for key, value in best.items() if key in ("lr", "alpha", "rslora", "scale")}


def measure_one(settings: dict) -> None:
    """One method and seed, in a fresh process (``in_fresh_process`` runs this): prints its record as JSON."""
    import formerkit
    from formerkit.bench.common import peak_rss_mb, reset_peak_rss, status_mb

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    data = digits(TARGET_CLASSES)
    model = adapt(formerkit.load(settings["base"]), settings["method"], rank=settings["rank"],
                  bottleneck=settings["bottleneck"], seed=settings["seed"], **settings.get("options", {}))
    trainable, total = trainable_share(model)
    options = dict(steps=settings["steps"], batch_size=settings["batch"], lr=settings["lr"],
                   seed=settings["seed"], warmup_steps=0.1)
    # One step on a copy first: what fit and the methods load on first use is then not charged to the measurement.
    formerkit.fit(copy.deepcopy(model), data["train"], **{**options, "steps": 1})
    gc.collect()
    reset_peak_rss()
    before = status_mb("VmRSS") or 0.0
    start = time.perf_counter()
    formerkit.fit(model, data["train"], **options)
    seconds = time.perf_counter() - start
    growth = peak_rss_mb() - before
    print(json.dumps({"method": settings["method"], "seed": settings["seed"], "trainable": trainable,
                      "total": total, "accuracy": accuracy(model, *data["test"]), "seconds": seconds,
                      "peak_growth_mb": growth, "peak_rss_mb": peak_rss_mb()}))


def print_cv(records: list[dict]) -> None:
    """The cross-validation's records as a Markdown table, the chosen candidate of each method in bold."""
    if not records:
        return
    print(f"Cross-validation on the 5-9 training images ({records[0]['folds']} folds, {records[0]['steps']} steps, "
          "seed 0; chosen: the lowest mean held-out loss):\n")
    print("| method | settings | mean held-out loss | held-out accuracy (pooled) |")
    print("|---|---|---|---|")
    for method in METHODS:
        mine = [r for r in records if r["method"] == method]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["cv_loss"])
        for r in mine:
            settings = ", ".join(f"{key} {r[key]:g}" for key in ("lr", "alpha", "scale") if key in r)
            mark = "**" if r is best else ""
            print(f"| {method} | {mark}{settings}{mark} | {r['cv_loss']:.4f} | {100 * r['cv_accuracy']:.2f}% |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=200, help="fit steps on digits 0-4")
    parser.add_argument("--steps", type=int, default=300, help="fit steps on digits 5-9, every method")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="transfer seeds (head init, batches)")
    parser.add_argument("--budget", type=float, default=0.05, help="trainable share for LoRA's rank and the "
                                                                   "adapters' bottleneck")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--select", nargs="*", choices=METHODS, metavar="METHOD",
                        help="choose these methods' learning rates among RATE_CANDIDATES on a held-out fifth of the "
                             "5-9 training images (seed 0) before the measured runs")
    parser.add_argument("--rate", action="append", default=[], metavar="METHOD=LR",
                        help="a method's learning rate instead of LEARNING_RATES' (e.g. one an earlier --select chose)")
    parser.add_argument("--cv", type=int, metavar="K", help="choose each method's settings among CV_GRID by K-fold "
                        "cross-validation on the 5-9 training images (lowest mean held-out loss) before the measured "
                        "runs")
    parser.add_argument("--cv-methods", nargs="+", choices=METHODS, metavar="METHOD",
                        help="the methods --cv chooses for (default: --methods)")
    parser.add_argument("--cv-candidates", type=int, nargs="+", metavar="I",
                        help="only these candidates of CV_GRID[method] (indices; to split the cross-validation over "
                             "processes)")
    parser.add_argument("--cv-json", metavar="PATH", help="append each cross-validated candidate's record here")
    parser.add_argument("--cv-only", action="store_true", help="stop after the cross-validation")
    parser.add_argument("--chosen", nargs="+", metavar="PATH", help="take each method's settings from the records "
                        "of an earlier --cv (its --cv-json files; the lowest mean held-out loss per method)")
    parser.add_argument("--base-dir", metavar="PATH", help="the source model: loaded from here if saved, else trained "
                        "and saved here (so several invocations adapt the same model)")
    parser.add_argument("--json", metavar="PATH", help="also write the records (one JSON object per line)")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        return measure_one(json.loads(args.measure_one))
    if args.threads:
        torch.set_num_threads(args.threads)

    import formerkit
    from formerkit.bench.common import in_fresh_process, machine_description, record_logger

    source = digits(SOURCE_CLASSES)
    target = digits(TARGET_CLASSES)
    saved = Path(args.base_dir) if args.base_dir else None
    if saved is not None and (saved / "config.json").exists():
        base, pretrain_seconds = formerkit.load(saved), float("nan")
    else:
        torch.manual_seed(0)
        base = formerkit.build_model(cct_config(len(SOURCE_CLASSES)))
        start = time.perf_counter()
        formerkit.fit(base, source["train"], steps=args.pretrain_steps, batch_size=args.batch, lr=PRETRAIN_LR,
                      weight_decay=0.05, warmup_steps=0.1, seed=0)
        pretrain_seconds = time.perf_counter() - start
        if saved is not None:
            formerkit.save(base, saved)
    source_accuracy = accuracy(base, *source["test"])
    rank = largest_within(args.budget, base, "lora", bottleneck=0, seed=0)
    bottleneck = largest_within(args.budget, base, "adapter", rank=0, seed=0)
    rates = dict(LEARNING_RATES)
    for item in args.rate:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            parser.error(f"--rate: expected METHOD=LR with METHOD one of {', '.join(METHODS)}, got {item!r}")
        rates[method] = float(value)
    selected = {}
    if args.select:
        selected = select_rates(base, target, args.select, rank=rank, bottleneck=bottleneck, steps=args.steps,
                                batch=args.batch, seed=0)
        rates.update(selected)
    options = {method: {} for method in METHODS}
    cv_records = []
    if args.chosen:
        from formerkit.data.files import jsonl_records

        cv_records = [record for path in args.chosen for _, record in jsonl_records(Path(path))]
    if args.cv:
        log = record_logger("cv", args.cv_json)
        for method in args.cv_methods or args.methods:
            grid = CV_GRID[method]
            grid = [grid[i] for i in args.cv_candidates] if args.cv_candidates is not None else grid
            cv_records += cross_validate(base, target["train"], method, grid, folds=args.cv, rank=rank,
                                         bottleneck=bottleneck, steps=args.steps, batch=args.batch, log=log)
    for method in {r["method"] for r in cv_records}:
        mine = [r for r in cv_records if r["method"] == method]
        if {r["steps"] for r in mine} != {args.steps}:
            parser.error(f"--chosen: the {method} records were cross-validated at {sorted({r['steps'] for r in mine})}"
                         f" steps, the measured runs take --steps {args.steps}")
        choice = best_of(mine)
        rates[method] = choice.pop("lr")
        options[method] = choice
    if args.cv_only:
        print_cv(cv_records)
        return

    records = []
    with tempfile.TemporaryDirectory() as directory:
        formerkit.save(base, Path(directory) / "base")
        for seed in args.seeds:
            for method in args.methods:
                settings = {"method": method, "seed": seed, "base": str(Path(directory) / "base"), "rank": rank,
                            "bottleneck": bottleneck, "steps": args.steps, "batch": args.batch, "lr": rates[method],
                            "options": options[method], "threads": args.threads}
                code = (f"import sys; sys.argv = [{__file__!r}, '--measure-one', {json.dumps(settings)!r}]; "
                        f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')")
                records.append(in_fresh_process(code, f"{method} (seed {seed})"))
                print(f"  {method} seed {seed}: accuracy {records[-1]['accuracy']:.4f}, "
                      f"{records[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)

    print(f"Machine: {machine_description()}")
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"Source model: cct-digits layout (CCT-2/3x2, width 128), {trainable_share(base)[1]:,} parameters, "
          f"trained {args.pretrain_steps} steps x {args.batch} on digits 0-4 ({len(source['train'][1])} images, "
          f"{'loaded from --base-dir' if math.isnan(pretrain_seconds) else f'{pretrain_seconds:.0f} s'}): "
          f"{100 * source_accuracy:.2f}% on their {len(source['test'][1])} test images.")
    print(f"Transfer to digits 5-9: {len(target['train'][1])} training, {len(target['test'][1])} test images; "
          f"{args.steps} steps x {args.batch}, warm-up 10%, cosine to 0.1 x lr, AdamW without weight decay, "
          f"seeds {args.seeds}; new 5-way head projection (trained by every method). LoRA rank {rank} "
          f"(alpha {2 * rank}) on {', '.join(LORA_TARGETS)}; adapters: bottleneck {bottleneck}, scale 0.1, ReLU.\n")
    if selected:
        print("Learning rates chosen on a held-out fifth of the 5-9 training images (trained on the rest, seed 0, "
              f"same steps): {', '.join(f'{m} {lr:g} of {list(RATE_CANDIDATES[m])}' for m, lr in selected.items())}; "
              "the measured runs then train on all the training images.\n")
    if cv_records:
        print_cv(cv_records)
    print("| method | lr | trainable params | trainable % | test accuracy 5-9 (mean; each seed) | train time s "
          "| peak training memory MB (growth) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for method in args.methods:
        mine = [r for r in records if r["method"] == method]
        mean = statistics.mean(r["accuracy"] for r in mine)
        summary[method] = mean
        each = ", ".join(f"{100 * r['accuracy']:.2f}" for r in mine)
        extra = "".join(f", {key} {value:g}" for key, value in options[method].items())
        print(f"| {method} | {rates[method]:g}{extra} | {mine[0]['trainable']:,} | "
              f"{100 * mine[0]['trainable'] / mine[0]['total']:.2f}% | {100 * mean:.2f}% ({each}) | "
              f"{statistics.median(r['seconds'] for r in mine):.1f} | "
              f"{statistics.median(r['peak_growth_mb'] for r in mine):.1f} | "
              f"{statistics.median(r['peak_rss_mb'] for r in mine):.0f} |")
    if "full" in summary:
        for method in ("lora", "adapter"):
            if method in summary:
                gap = 100 * (summary["full"] - summary[method])
                print(f"\nfull fine-tuning - {method}: {gap:+.2f} points (target: at most 1 point, at <= "
                      f"{args.budget:.0%} trainable) -> {'met' if gap <= 1 else 'not met'}")
    print("\nTimes and memory: medians over the seeds; time is fit's wall time (no evaluation inside).")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(record) + "\n" for record in records))
        print(f"records: {args.json}")


if __name__ == "__main__":
    main()
