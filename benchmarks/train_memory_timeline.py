"""Where the peak of a training step of the bench LM is: the resident memory at every ATen operation of the second
training step (``formerkit bench lm``'s model and step, the allocator set as the bench sets it), the operation at the
top, the operations around it, and the top of each phase.

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=. python benchmarks/train_memory_timeline.py [--library nanogpt]

Figures are MB over the resident memory before the model is built (what ``formerkit bench lm`` reports as peak
memory); each line: the operation, the autograd node running it (backward), the resident memory after it and the
process's peak during it (reset before each operation).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from formerkit.bench.common import reset_peak_rss, status_mb, train_step
from formerkit.bench.lm import LMSpec, _batch, _build
from formerkit.train.config import OptimConfig


class _Timeline(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, str, float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reset_peak_rss()
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        name = "" if node is None else node.name() if callable(node.name) else type(node).__name__
        self.rows.append((func.overloadpacket.__name__, name, status_mb("VmRSS") or 0.0, status_mb("VmHWM") or 0.0))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default="formerkit", help="bench lm's contender")
    parser.add_argument("--window", type=int, default=12, help="operations shown on each side of the top")
    parser.add_argument("--all", action="store_true", help="every operation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = LMSpec()
    clip = OptimConfig().grad_clip if args.library == "formerkit" else None
    tiny = LMSpec(layers=1, heads=2, width=32, context=16, vocab=spec.vocab, batch=2, prompt=1, new_tokens=1)
    warm, tokens = _build(args.library, tiny, False), _batch(tiny)  # what is loaded on first use: not the model's
    train_step(warm.model, warm.optimizer(warm.model), tokens[:, :-1], tokens[:, 1:], "fp32", clip)
    del warm
    base = status_mb("VmRSS") or 0.0
    torch.manual_seed(0)
    contender, batch = _build(args.library, spec, False), _batch(spec)
    model, optimizer = contender.model, contender.optimizer(contender.model)
    train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", clip)
    timeline = _Timeline()
    with timeline:
        train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", clip)
    rows = [(op, node, rss - base, peak - base) for op, node, rss, peak in timeline.rows]
    top = max(range(len(rows)), key=lambda i: rows[i][3])
    backward = next((i for i, row in enumerate(rows) if row[1]), len(rows))
    print(f"{len(rows)} operations; at the start {rows[0][2]:.1f} MB (weights, optimizer state, what the process "
          f"keeps); top {rows[top][3]:.1f} MB at operation {top} ({rows[top][0]}, "
          f"{'backward: ' + rows[top][1] if rows[top][1] else 'forward'})")
    for phase, (start, stop) in {"forward": (0, backward), "backward and step": (backward, len(rows))}.items():
        if start < stop:
            i = max(range(start, stop), key=lambda j: rows[j][3])
            print(f"  top of the {phase}: {rows[i][3]:.1f} MB at operation {i} ({rows[i][0]} {rows[i][1]})")
    shown = range(len(rows)) if args.all else range(max(top - args.window, 0), min(top + args.window + 1, len(rows)))
    for i in shown:
        op, node, rss, peak = rows[i]
        print(f"{i:5d} {op:45.45s} {node:45.45s} resident {rss:7.1f} peak {peak:7.1f}{'  <- top' if i == top else ''}")


if __name__ == "__main__":
    main()
