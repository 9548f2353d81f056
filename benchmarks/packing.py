"""Training throughput with sequence packing (``data.pack``) against one padded document per row.

The corpus is a JSON-lines file written to a temporary folder: every function and method of the standard library's
source (``formerkit.data.text.stdlib_files``), one record each, so lengths run from a few bytes to many kilobytes.
It is read through formerkit's own ``jsonl`` source with ``data.pack: true``; the padded layout cuts the same documents
into the same pieces (``one_document_per_row``) and gives each its own right-padded row. A small byte-level decoder
then trains ``--steps`` optimizer steps of ``--batch`` rows on each layout (the layouts taking turns step by step),
``--repeats`` times:

- packed: the rows of ``data.pack``, through the causal-LM objective (DocumentMask, per-document positions);
- padded: one document per row of the same length, with ``attention_mask`` (what training without packing does);
- padded, trimmed: the same rows cut to the longest document of each batch (dynamic padding).

Reported: the median real (non-padding) tokens per second of each layout, and its ratio to the padded one.

    python benchmarks/packing.py [--steps 20] [--batch 8] [--seq-len 256] [--repeats 3] [--max-bytes 2000000]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def write_functions_jsonl(path: Path, max_bytes: int) -> list[int]:
    """Every function of the stdlib's source, one JSON record each, until ``max_bytes``; returns their lengths."""
    from formerkit.data.text import stdlib_files

    lengths, total = [], 0
    with path.open("w") as handle:
        for file in stdlib_files():
            try:
                source = file.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_source_segment(source, node)
                    if text and text.strip():
                        handle.write(json.dumps({"text": text}) + "\n")
                        lengths.append(len(text.encode()))
                        total += lengths[-1]
            if total >= max_bytes:
                break
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per layout and repeat")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus size in bytes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import formerkit
    from formerkit.data import build_data
    from formerkit.data.packing import PackedSplit, one_document_per_row
    from formerkit.train.config import DataConfig, ObjectiveConfig, OptimConfig
    from formerkit.train.objectives import make_objective
    from formerkit.train.trainer import build_optimizer

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "functions.jsonl"
        lengths = write_functions_jsonl(path, args.max_bytes)
        bundle = build_data(DataConfig(source="jsonl", path=str(path), seq_len=args.seq_len, pack=True,
                                       valid_fraction=0.0))
    packed_rows = bundle.train.rows
    # The same documents, read back from the packed rows in document order, one (piece) per padded row.
    order = sorted(packed_rows.pieces.tolist(), key=lambda piece: (piece[0], piece[1]))
    documents: dict[int, list[torch.Tensor]] = {}
    for document, _, row, column, length in order:
        documents.setdefault(document, []).append(packed_rows.tokens[row, column:column + length])
    padded_rows = one_document_per_row([torch.cat(parts) for parts in documents.values()], args.seq_len + 1)
    quantiles = statistics.quantiles(lengths, n=10)
    print(f"corpus: {len(lengths):,} functions, {sum(lengths):,} bytes; length deciles (bytes) "
          f"{[round(q) for q in quantiles]}; longest {max(lengths):,}")
    print(f"rows of {args.seq_len + 1}: packed {len(packed_rows.tokens):,} ({packed_rows.fill:.1%} filled), "
          f"padded {len(padded_rows.tokens):,} ({padded_rows.fill:.1%} filled); "
          f"{packed_rows.split_documents:,} documents longer than a row cut into pieces")

    config = formerkit.ModelConfig(arch="decoder", width=128, num_layers=4, max_seq_len=args.seq_len,
                                   attention={"num_heads": 4}, position={"kind": "rope"},
                                   stem={"kind": "tokens", "vocab_size": 256}, head={"kind": "lm"})
    objective = make_objective(ObjectiveConfig(kind="causal_lm"), bundle)

    def padded_loss(model, batch, trim: bool):
        tokens, keep = batch["tokens"], batch["document_ids"] >= 0
        if trim:  # dynamic padding: only as many columns as the batch's longest document needs
            width = int(keep.sum(dim=1).max())
            tokens, keep = tokens[:, :width], keep[:, :width]
        logits = model(tokens[:, :-1], attention_mask=keep[:, :-1])
        targets = tokens[:, 1:].masked_fill(~keep[:, 1:], -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    layouts = {
        "packed": (PackedSplit(packed_rows), lambda model, batch: objective.loss(model, batch, None)),
        "padded": (PackedSplit(padded_rows), lambda model, batch: padded_loss(model, batch, False)),
        "padded, trimmed": (PackedSplit(padded_rows), lambda model, batch: padded_loss(model, batch, True)),
    }

    def one_run(seed: int) -> dict[str, float]:
        """Real tokens per second of each layout over ``--steps`` steps. The layouts take turns step by step (in a
        rotating order), so a change in the machine's load slows them alike."""
        states = {}
        for name in layouts:
            torch.manual_seed(0)
            model = formerkit.build_model(config).train()
            states[name] = (model, build_optimizer(model, OptimConfig(lr=1e-3)))
        real = dict.fromkeys(layouts, 0)
        elapsed = dict.fromkeys(layouts, 0.0)
        names = list(layouts)
        for step in range(args.steps + 2):  # the first 2 steps warm up (allocations, first-call costs), untimed
            for name in names[step % len(names):] + names[:step % len(names)]:
                split, loss_of = layouts[name]
                model, optimizer = states[name]
                batch = split.take(split.sample_indices(args.batch, seed=seed, step=step))
                start = time.perf_counter()
                loss_of(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step >= 2:
                    elapsed[name] += time.perf_counter() - start
                    real[name] += int((batch["document_ids"][:, :-1] >= 0).sum())
        return {name: real[name] / elapsed[name] for name in layouts}

    rates: dict[str, list[float]] = {name: [] for name in layouts}
    for repeat in range(args.repeats):
        for name, rate in one_run(repeat).items():
            rates[name].append(rate)
    baseline = statistics.median(rates["padded"])
    print(f"{args.steps} steps of {args.batch} rows, decoder width 128 x 4 layers, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}:")
    for name, values in rates.items():
        median = statistics.median(values)
        each = ", ".join(f"{value:,.0f}" for value in values)
        print(f"  {name:<16} {median:>10,.0f} real tokens/s   x{median / baseline:.2f}   (each run: {each})")


if __name__ == "__main__":
    main()
