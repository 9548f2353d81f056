"""Where the milliseconds of one ``formerkit bench dit`` training step go, formerkit against the reference DiT, in CPU
time: a measure that machine load disturbs far less than wall time.

Two reports, both with one torch thread, the contenders built and stepped by ``formerkit.bench.dit`` (same work,
same batch):

- ``--profile``: the CPU time (``time.thread_time``) of every ATen operator of a training step, averaged over
  ``--steps`` steps after a warm-up, added up per operator, for each contender and as a difference. A
  ``TorchDispatchMode`` times each operator as it runs, backward and optimizer included (one thread: the work of an
  operator runs in the calling thread, so its thread time is its cost, not the time it waited for the core).
- ``--ab``: the step's process CPU time and wall time, contenders taking turns for ``--rounds`` rounds (medians):
  formerkit as it is, formerkit with adaLN-Zero's modulation and gated residual unfused (``x * (1 + scale) + shift``
  and ``x + gate * out`` as separate products and sums, what formerkit did before they became one ``addcmul``
  each), and the references.

Example (the figures of bench/RESULTS.md, "Diffusion Transformer"):
``PYTHONPATH=. python benchmarks/dit_step_profile.py --profile`` and ``... --ab --rounds 16``; the recipe's own size:
``--spec "image=8,channels=1,width=64,heads=4,batch=128"``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import formerkit.models.stack as stack
import formerkit.nn.block as block
from formerkit.bench.dit import DiTSpec, _batch, _build, train_step


class _OperatorTimes(TorchDispatchMode):
    """CPU time per ATen operator (thread time around each call)."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.seconds[func.overloadpacket.__name__] += time.thread_time() - start
        return out


def _unfused_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _unfused_merge_gated(self, x, gate, out, drop_path=None):
    return self.merge(x, gate.unsqueeze(1) * out, drop_path)


@contextlib.contextmanager
def _unfused():
    """formerkit's adaLN-Zero with the modulation and the gated residual computed unfused."""
    saved = block.modulate, stack.modulate, block.Residual.merge_gated
    block.modulate = stack.modulate = _unfused_modulate
    block.Residual.merge_gated = _unfused_merge_gated
    try:
        yield
    finally:
        block.modulate, stack.modulate, block.Residual.merge_gated = saved


def _contenders(spec: DiTSpec, names: list[str]) -> dict:
    built = {}
    for name in names:
        library = "formerkit" if name.startswith("formerkit") else name
        built[name] = _build(library, spec)
    return built


def _step(name: str, model, optimizer, batch) -> None:
    with _unfused() if name == "formerkit-unfused" else contextlib.nullcontext():
        train_step(model, optimizer, batch)


def profile(spec: DiTSpec, steps: int) -> None:
    names = ["formerkit", "dit-reference-sdpa"]
    built, batch = _contenders(spec, names), _batch(spec)
    per_step = {}
    for name, (model, optimizer) in built.items():
        model.train()
        for _ in range(2):
            _step(name, model, optimizer, batch)
        mode = _OperatorTimes()
        with mode:
            for _ in range(steps):
                _step(name, model, optimizer, batch)
        per_step[name] = {op: 1e3 * seconds / steps for op, seconds in mode.seconds.items()}
    (a, b) = (per_step[name] for name in names)
    print(f"CPU ms per step (1 thread): {names[0]} {sum(a.values()):.1f}, {names[1]} {sum(b.values()):.1f}")
    print(f"| operator | {names[0]} | {names[1]} | difference |\n|---|---|---|---|")
    def gap(op: str) -> float:
        return abs(a.get(op, 0.0) - b.get(op, 0.0))

    for op in sorted(set(a) | set(b), key=gap, reverse=True)[:30]:
        x, y = a.get(op, 0.0), b.get(op, 0.0)
        print(f"| {op} | {x:.2f} | {y:.2f} | {x - y:+.2f} |")


def ab(spec: DiTSpec, rounds: int) -> None:
    names = ["formerkit", "formerkit-unfused", "dit-reference", "dit-reference-sdpa"]
    built, batch = _contenders(spec, names), _batch(spec)
    for name, (model, optimizer) in built.items():
        model.train()
        for _ in range(2):
            _step(name, model, optimizer, batch)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, (model, optimizer) in built.items():
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            _step(name, model, optimizer, batch)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    best = min(statistics.median(cpu[name]) for name in names[2:])
    print("| contender | CPU ms per step (median) | wall ms (median) | reference's best CPU / this |")
    print("|---|---|---|---|")
    for name in names:
        median = statistics.median(cpu[name])
        print(f"| {name} | {1e3 * median:.1f} | {1e3 * statistics.median(wall[name]):.1f} | {best / median:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="CPU time per operator")
    parser.add_argument("--ab", action="store_true", help="step CPU time: fused, unfused, references")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    parser.add_argument("--rounds", type=int, default=12, help="A/B rounds (default 12)")
    parser.add_argument("--spec", default="", help="DiTSpec fields, e.g. 'width=64,heads=4' (default: the bench's)")
    args = parser.parse_args()
    fields = dict(item.split("=") for item in args.spec.split(",") if item)
    spec = DiTSpec(**{key: int(value) for key, value in fields.items()})
    torch.set_num_threads(1)
    if args.profile or not args.ab:
        profile(spec, args.steps)
    if args.ab:
        ab(spec, args.rounds)


if __name__ == "__main__":
    main()
