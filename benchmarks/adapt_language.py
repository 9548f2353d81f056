"""Language adaptation: the char-lm model adapted to English documentation text, full fine-tuning against LoRA.

The base is a run of the ``char-lm`` recipe (byte-level decoder, RoPE, 4 layers, width 192, context 256), trained on
the standard library's source (``data.source: stdlib``). ``--base-run`` names one; if it holds no model, the recipe
is trained there first, shrunk to ``--base-steps`` steps, with ``data.max_bytes`` set so that the corpus (the
stdlib's .py files in path order, read until that many bytes) stops before ``pydoc_data/topics.py``. The script
checks, from the run's own recipe, that the corpus it read did not include that file, and refuses a run whose corpus
did.

The new text: the 79 topics of ``pydoc_data.topics`` (the language reference's prose that ``help("assert")``
shows: English documentation, grammar snippets and examples), each topic one document; every 5th topic (in name
order) is held out for validation (``formerkit.data.text.split_documents``). Both are cut into rows of 257 bytes
(256 read, 256 predicted).

Both methods train with ``formerkit.fit`` from the same base for the same steps, batch and seed, in a fresh process
each: full fine-tuning (every parameter) and LoRA (Hu et al. 2021) on q, k, v, out, fc_in and fc_out of every block.
Reported: trainable parameters, validation nats/byte on the held-out topics (the base's too, before adapting),
training time, and peak memory: the growth of the process's peak resident memory over ``fit`` (after a one-step
warm-up on a copy, so code loaded on first use counts for neither), and the process's whole peak.
``--checkpointing`` adds memory-only rows (``--memory-steps`` steps, no evaluation) with activation checkpointing of
whole blocks (``Transformer.set_activation_checkpointing``).

Choosing settings without the held-out topics: ``--select full lora`` trains each candidate of ``SELECT_GRID`` on the
training topics but every 5th of them (``selection_split``) and scores it on that 5th; the lowest nats/byte is each
method's choice for the measured runs (``--select-json`` keeps the records, ``--chosen`` reads them back).

    python benchmarks/adapt_language.py --base-run runs/char-lm-base [--steps 150] [--rank 8] [--checkpointing]
        [--select full lora [--select-json PATH] [--select-only]] [--chosen PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_TARGETS = ("q", "k", "v", "out", "fc_in", "fc_out")
HELD_OUT_TEXT = "pydoc_data/topics.py"
# The stdlib's .py files in path order run to 8.34 MB before pydoc_data/topics.py; 8 MB stops the corpus before it.
BASE_MAX_BYTES = 8_000_000
# Chosen before any run, not tuned on the held-out text: the whole model at a third of the recipe's pretraining rate
# (3e-3), the low-rank factors higher (LoRA's updates start at zero and are scaled by alpha / rank).
LEARNING_RATES = {"full": 1e-3, "lora": 5e-3}
# --select: the settings tried on a held-out part of the *training* topics (``selection_split``), fixed before any
# selection run: rates around each method's prior one; LoRA's rank (alpha = 2 x rank) 8 (5.7% trainable) or 32
# (19.5%; the memory target concerns memory, not the trainable share). Small, for the machine's time.
SELECT_GRID = {
    "full": [{"lr": lr} for lr in (5e-4, 1e-3, 2e-3)],
    "lora": [{"rank": rank, "lr": lr} for rank in (8, 32) for lr in (5e-3, 1e-2)],
}


def corpus_files(max_bytes: int | None) -> list[Path]:
    """The files a ``stdlib`` source with ``data.max_bytes`` reads (``formerkit.data.text.stdlib_bundle``'s rule:
    whole files in path order, stopping once the total reaches ``max_bytes``)."""
    from formerkit.data.text import stdlib_files

    chosen, total = [], 0
    for path in stdlib_files():
        chosen.append(path)
        total += path.stat().st_size
        if max_bytes is not None and total >= max_bytes:
            break
    return chosen


def check_kept_out(run: Path) -> None:
    """Refuses a base run whose corpus held the adaptation text."""
    from formerkit.train import load_recipe

    data = load_recipe(run / "recipe.yaml").data
    if data.source != "stdlib":
        raise SystemExit(f"{run}: trained on data.source {data.source!r}; this benchmark expects a char-lm "
                         "(stdlib) run")
    read = [path for path in corpus_files(data.max_bytes) if path.as_posix().endswith(HELD_OUT_TEXT)]
    if read:
        raise SystemExit(f"{run}: its corpus (data.max_bytes {data.max_bytes}) includes {read[0]}, the adaptation "
                         f"text; train the base with data.max_bytes <= {BASE_MAX_BYTES}")


def topic_documents() -> tuple[list[bytes], list[bytes]]:
    """(training, held-out) topics of pydoc_data.topics, UTF-8, in name order; every 5th held out."""
    from pydoc_data.topics import topics

    from formerkit.data.text import split_documents

    return split_documents([topics[name].encode("utf-8") for name in sorted(topics)], 0.2)


def selection_split(train_docs: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(topics to train on, topics to score on) for choosing settings: every 5th *training* topic held out (the
    same rule as the held-out topics', applied to the training ones; the held-out topics are never read)."""
    from formerkit.data.text import split_documents

    return split_documents(train_docs, 0.2)


def rows_of(documents: list[bytes], row: int) -> Tensor:
    """The documents one after another (a blank line between), cut into rows of ``row`` bytes that overlap by one
    (each byte after the first is predicted once); the last incomplete row dropped."""
    stream = torch.tensor(list(b"\n\n".join(documents)), dtype=torch.long)
    count = (len(stream) - 1) // (row - 1)
    return torch.stack([stream[i * (row - 1): i * (row - 1) + row] for i in range(count)])


def nats_per_byte(model: nn.Module, rows: Tensor, batch: int = 32) -> float:
    """Mean cross-entropy of every predicted byte (the model reads bytes: one token each)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(rows), batch):
            chunk = rows[begin:begin + batch]
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total / count


def base_run(path: Path, steps: int) -> Path:
    """The run at ``path``, trained first (the char-lm recipe, shrunk) if it has no saved model."""
    if not (path / "model" / "config.json").exists():
        from formerkit.train import train

        overrides = {"data.max_bytes": BASE_MAX_BYTES, "schedule.steps": steps,
                     "schedule.warmup_steps": max(1, steps // 15), "eval.every": steps,
                     "run.checkpoint_every": steps}
        print(f"training char-lm into {path} {overrides}", file=sys.stderr, flush=True)
        train("char-lm", path, overrides=overrides)
    return path


def select(run: Path, method: str, candidates: list[dict], *, steps: int, batch: int, seed: int, log=None) -> list:
    """Each candidate of ``method`` trained from the base on the training topics but a fifth and scored (nats/byte)
    on that fifth: one record per candidate."""
    import formerkit

    base = formerkit.load(run / "model")
    row = base.config.max_seq_len + 1
    fit_docs, score_docs = selection_split(topic_documents()[0])
    fit_rows, score_rows = rows_of(fit_docs, row), rows_of(score_docs, row)
    records = []
    for candidate in candidates:
        model = copy.deepcopy(base)
        if method == "lora":
            torch.manual_seed(seed)
            formerkit.add_adapters(model, method="lora", targets=LORA_TARGETS, rank=candidate["rank"],
                                   alpha=2 * candidate["rank"])
        start = time.perf_counter()
        formerkit.fit(model, fit_rows, steps=steps, batch_size=batch, lr=candidate["lr"], seed=seed,
                      warmup_steps=0.1)
        record = {"method": method, **candidate, "select_nats_per_byte": nats_per_byte(model, score_rows),
                  "steps": steps, "seconds": time.perf_counter() - start, "fit_topics": len(fit_docs),
                  "score_topics": len(score_docs), "score_bytes": score_rows[:, 1:].numel()}
        records.append(record)
        if log:
            log(record)
    return records


def measure_one(settings: dict) -> None:
    """One method in a fresh process (``in_fresh_process`` runs this): prints its record as JSON."""
    import formerkit
    from formerkit.bench.common import peak_rss_mb, reset_peak_rss, status_mb

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    row = settings["seq_len"] + 1
    train_docs, valid_docs = topic_documents()
    train_rows = rows_of(train_docs, row)
    model = formerkit.load(Path(settings["run"]) / "model")
    if settings["checkpointing"]:
        model.set_activation_checkpointing(True)
    method = settings["method"]
    if method == "lora":
        torch.manual_seed(settings["seed"])
        formerkit.add_adapters(model, method="lora", targets=LORA_TARGETS, rank=settings["rank"],
                               alpha=2 * settings["rank"])
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    options = dict(steps=settings["steps"], batch_size=settings["batch"], lr=settings["lr"],
                   seed=settings["seed"], warmup_steps=0.1)
    # One step on a copy first: what fit and LoRA load on first use is then not charged to the measurement.
    formerkit.fit(copy.deepcopy(model), train_rows, **{**options, "steps": 1})
    gc.collect()
    reset_peak_rss()
    before = status_mb("VmRSS") or 0.0
    start = time.perf_counter()
    formerkit.fit(model, train_rows, **options)
    seconds = time.perf_counter() - start
    growth = peak_rss_mb() - before
    valid = None if settings["memory_only"] else nats_per_byte(model, rows_of(valid_docs, row))
    print(json.dumps({"method": method, "checkpointing": settings["checkpointing"], "steps": settings["steps"],
                      "trainable": trainable, "total": total, "valid_nats_per_byte": valid, "seconds": seconds,
                      "peak_growth_mb": growth, "peak_rss_mb": peak_rss_mb()}))


def print_selection(records: list[dict]) -> None:
    """The --select records as a Markdown table, each method's choice in bold."""
    first = records[0]
    print(f"Choice on held-out training topics ({first['fit_topics']} topics trained on, {first['score_topics']} "
          f"scored, {first['score_bytes']:,} predicted bytes; {first['steps']} steps; lowest nats/byte chosen):\n")
    print("| method | settings | nats/byte on the held-out training topics | fit time s |")
    print("|---|---|---|---|")
    for method in SELECT_GRID:
        mine = [r for r in records if r["method"] == method]
        best = min(mine, key=lambda r: r["select_nats_per_byte"]) if mine else None
        for r in mine:
            settings = ", ".join(f"{key} {r[key]:g}" for key in ("rank", "lr") if key in r)
            mark = "**" if r is best else ""
            print(f"| {method} | {mark}{settings}{mark} | {r['select_nats_per_byte']:.4f} | {r['seconds']:.0f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-run", default="runs/char-lm-adapt-base", help="a char-lm run (trained if missing)")
    parser.add_argument("--base-steps", type=int, default=150, help="steps of the base run, if trained here")
    parser.add_argument("--steps", type=int, default=150, help="fit steps, both methods")
    parser.add_argument("--batch", type=int, default=8, help="rows of 256 bytes per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure memory with activation checkpointing (memory-only rows)")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="steps of the memory-only rows (at least 2: AdamW's moments are made at the end of the "
                             "first step, so only later steps hold them beside the activations)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--select", nargs="+", choices=tuple(SELECT_GRID), metavar="METHOD",
                        help="choose these methods' settings among SELECT_GRID on a held-out fifth of the training "
                             "topics (lowest nats/byte there), same --steps, before the measured runs")
    parser.add_argument("--select-json", metavar="PATH", help="append each --select candidate's record here")
    parser.add_argument("--select-only", action="store_true", help="stop after --select")
    parser.add_argument("--chosen", nargs="+", metavar="PATH", help="take each method's settings from an earlier "
                        "--select's records (its --select-json files; the lowest nats/byte per method)")
    parser.add_argument("--json", metavar="PATH", help="also write the records (one JSON object per line)")
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        return measure_one(json.loads(args.measure_one))
    if args.memory_steps < 2:
        parser.error("--memory-steps: at least 2 (AdamW's moments exist from the end of the first step)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import formerkit
    from formerkit.bench.common import in_fresh_process, machine_description, record_logger

    run = base_run(Path(args.base_run), args.base_steps)
    check_kept_out(run)
    base = formerkit.load(run / "model")
    seq_len = base.config.max_seq_len
    train_docs, valid_docs = topic_documents()
    valid_rows = rows_of(valid_docs, seq_len + 1)
    base_valid = nats_per_byte(base, valid_rows)
    summary = json.loads((run / "summary.json").read_text())

    chosen = {method: {"lr": lr} for method, lr in LEARNING_RATES.items()}
    chosen["lora"]["rank"] = args.rank
    select_records = []
    if args.chosen:
        from formerkit.data.files import jsonl_records

        select_records = [record for path in args.chosen for _, record in jsonl_records(Path(path))]
    if args.select:
        log = record_logger("select", args.select_json)
        for method in args.select:
            select_records += select(run, method, SELECT_GRID[method], steps=args.steps, batch=args.batch,
                                     seed=args.seed, log=log)
    for method in {r["method"] for r in select_records}:
        mine = [r for r in select_records if r["method"] == method]
        if {r["steps"] for r in mine} != {args.steps}:
            parser.error(f"--chosen: the {method} records were chosen at {sorted({r['steps'] for r in mine})} steps, "
                         f"the measured runs take --steps {args.steps}")
        best = min(mine, key=lambda r: r["select_nats_per_byte"])
        chosen[method] = {key: best[key] for key in ("lr", "rank") if key in best}
    if select_records:
        print_selection(select_records)
    if args.select_only:
        return
    rank = chosen["lora"]["rank"]

    plan = [("full", False, False), ("lora", False, False)]
    if args.checkpointing:
        plan += [("full", True, True), ("lora", True, True)]
    records = []
    for method, checkpointing, memory_only in plan:
        settings = {"method": method, "checkpointing": checkpointing, "memory_only": memory_only,
                    "steps": args.memory_steps if memory_only else args.steps, "run": str(run), "seq_len": seq_len,
                    "batch": args.batch, "rank": rank, "lr": chosen[method]["lr"], "seed": args.seed,
                    "threads": args.threads}
        code = (f"import sys; sys.argv = [{__file__!r}, '--measure-one', {json.dumps(settings)!r}]; "
                f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')")
        records.append(in_fresh_process(code, method + (" with checkpointing" if checkpointing else "")))
        print(f"  {method}{' + checkpointing' if checkpointing else ''}: {records[-1]}", file=sys.stderr, flush=True)

    print(f"Machine: {machine_description()}")
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    print(f"Base: {run} (char-lm layout, {sum(p.numel() for p in base.parameters()):,} parameters; "
          f"{summary.get('steps')} steps on the stdlib's .py files up to data.max_bytes, which stops before "
          f"{HELD_OUT_TEXT}).")
    print(f"New text: pydoc_data.topics, {len(train_docs)} topics ({sum(map(len, train_docs)):,} bytes) to train on, "
          f"{len(valid_docs)} held out ({len(valid_rows)} rows, {valid_rows[:, 1:].numel():,} predicted bytes). "
          f"fit: {args.steps} steps x {args.batch} rows of {seq_len} bytes, seed {args.seed}, warm-up 10%, cosine to "
          f"0.1 x lr, AdamW without weight decay; LoRA rank {rank}, alpha {2 * rank} on "
          f"{', '.join(LORA_TARGETS)}.\n")
    print("| method | lr | trainable params | valid nats/byte | train time s | peak training memory MB (growth) "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| base (before adapting) | — | — | {base_valid:.4f} | — | — | — |")
    for r in records:
        name = r["method"] + (f" + activation checkpointing ({r['steps']} steps, memory only)"
                              if r["checkpointing"] else "")
        valid = "—" if r["valid_nats_per_byte"] is None else f"{r['valid_nats_per_byte']:.4f}"
        seconds = "—" if r["checkpointing"] else f"{r['seconds']:.1f}"
        print(f"| {name} | {chosen[r['method']]['lr']:g} | {r['trainable']:,} "
              f"({100 * r['trainable'] / r['total']:.2f}%) | {valid} | {seconds} | {r['peak_growth_mb']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")
    full, lora = records[0], records[1]
    gap = lora["valid_nats_per_byte"] - full["valid_nats_per_byte"]
    ratio = lora["peak_growth_mb"] / full["peak_growth_mb"] if full["peak_growth_mb"] > 0 else math.nan
    print(f"\nLoRA - full fine-tuning: {gap:+.4f} nats/byte (target <= 0.05: {'met' if gap <= 0.05 else 'not met'}); "
          f"peak training memory {ratio:.0%} of full fine-tuning's (target <= 60%: "
          f"{'met' if ratio <= 0.6 else 'not met'}).")
    if args.checkpointing:
        cp_full, cp_lora = records[2], records[3]
        print(f"With activation checkpointing: LoRA {cp_lora['peak_growth_mb']:.1f} MB = "
              f"{cp_lora['peak_growth_mb'] / full['peak_growth_mb']:.0%} of plain full fine-tuning's, "
              f"{cp_lora['peak_growth_mb'] / cp_full['peak_growth_mb']:.0%} of full fine-tuning's with checkpointing.")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(record) + "\n" for record in [
            {"method": "base", "valid_nats_per_byte": base_valid}, *records]))
        print(f"records: {args.json}")


if __name__ == "__main__":
    main()
