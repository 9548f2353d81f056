"""Training memory and speed of the bench LM (``formerkit bench lm``'s model): formerkit's training path against the
path before issue 22 ("plain": norms' outputs kept for the backward pass and the MLP activation's derivative a
tensor of its own in the backward pass), the path before the MLP's hidden activation went by blocks ("previous":
the hidden activation whole in both passes, fc_in's gradient a tensor of its own), and the leanest peer.

    PYTHONPATH=. python benchmarks/train_memory.py --memory 3 --speed 20

Memory: ``formerkit bench lm``'s measure (a fresh process per figure; peak resident memory gained over building the
model and two training steps, after a tiny warm-up), alternating the contenders ``--memory`` times. Speed: one
process, formerkit's path and ``--against``'s alternating step by step (in shuffled order each round) on the same
model (the trainer's step: cross-entropy, backward, the gradient norm clipped to 1, fused AdamW), medians of
``--speed`` steps each; ``--threads 1`` times CPU time (far less disturbed by other work on the machine than wall
time), more threads wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time

import torch

from formerkit.bench.common import in_fresh_process, train_step
from formerkit.bench.lm import LMSpec, _batch, _build

PREVIOUS = """
import formerkit.nn.feedforward as feedforward_module
feedforward_module._by_columns = lambda *args: False
feedforward_module._block_count = lambda hidden, width: 1
"""

PLAIN = PREVIOUS + """
import contextlib
import formerkit.models.transformer as transformer_module, formerkit.nn.block as block_module
block_module.recomputed_norm_output = transformer_module.recomputed_norm_output = (
    lambda *args: contextlib.nullcontext())
feedforward_module._derivative_in_place = lambda name, g, h: feedforward_module._DERIVATIVES[name](g, h)
"""

PATHS = {"plain": PLAIN, "previous": PREVIOUS, "formerkit": ""}


def switch_path(name: str) -> None:
    """Switches this process to one of ``PATHS`` (formerkit's own: back to the saved functions)."""
    import formerkit.models.transformer as transformer_module
    import formerkit.nn.block as block_module
    import formerkit.nn.feedforward as feedforward_module

    saved = getattr(switch_path, "saved", None)
    if saved is None:
        saved = switch_path.saved = (block_module.recomputed_norm_output, feedforward_module._derivative_in_place,
                                     feedforward_module._by_columns, feedforward_module._block_count)
    (block_module.recomputed_norm_output, feedforward_module._derivative_in_place, feedforward_module._by_columns,
     feedforward_module._block_count) = saved
    transformer_module.recomputed_norm_output = saved[0]
    exec(PATHS[name], {})


def memory(library: str, path: str = "formerkit") -> float:
    code = PATHS[path] + (
        "import json; from formerkit.bench.lm import memory_child; "
        f"print(json.dumps(memory_child({library!r}, {json.dumps(LMSpec().__dict__)}, 'fp32', 2)))")
    return float(in_fresh_process(code, library))


def speed(steps: int, against: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    torch.manual_seed(0)
    spec = LMSpec()
    contender = _build("formerkit", spec, decode_compile=False)
    model, optimizer, batch = contender.model, contender.optimizer(contender.model), _batch(spec)
    times = {against: [], "formerkit": []}
    order = random.Random(0)

    def step(name: str) -> float:
        switch_path(name)
        start = clock()
        train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", contender.grad_clip)
        return clock() - start

    for name in list(times) * 2:
        step(name)  # warm-up
    for _ in range(steps):
        names = list(times)
        order.shuffle(names)
        for name in names:
            times[name].append(step(name))
    switch_path("formerkit")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=3, help="rounds of the fresh-process memory measure (0: skip)")
    parser.add_argument("--speed", type=int, default=20, help="alternating steps per path (0: skip)")
    parser.add_argument("--peer", default="nanogpt", help="the peer measured beside (bench lm's name)")
    parser.add_argument("--against", default="previous", choices=["previous", "plain"],
                        help="the path formerkit's step is timed against")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the speed runs, one run each (1: CPU time, more: wall time)")
    args = parser.parse_args()
    with contextlib.suppress(OSError):
        print("load average:", open("/proc/loadavg").read().split()[:3])
    if args.memory:
        figures = {"plain": [], "previous": [], "formerkit": [], args.peer: []}
        for _ in range(args.memory):
            for path in ("plain", "previous", "formerkit"):
                figures[path].append(memory("formerkit", path))
            figures[args.peer].append(memory(args.peer))
            print({name: values[-1] for name, values in figures.items()}, flush=True)
        medians = {name: statistics.median(values) for name, values in figures.items()}
        print(f"peak MB (median of {args.memory}): " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items())
              + "; over " + args.peer + ": " + ", ".join(
                  f"{k} {medians[k] / medians[args.peer]:.3f}" for k in ("plain", "previous", "formerkit")))
    tokens = LMSpec().batch * LMSpec().context
    for threads in args.threads if args.speed else ():
        result = speed(args.speed, args.against, threads)
        clock, load = ("CPU time" if threads == 1 else "wall time"), "?"
        with contextlib.suppress(OSError):
            load = open("/proc/loadavg").read().split()[0]
        print(f"training step, {threads} thread(s), {clock} (median of {args.speed}, load {load}): "
              f"{args.against} {result[args.against] * 1e3:.0f} ms, formerkit {result['formerkit'] * 1e3:.0f} ms "
              f"({tokens / result['formerkit']:,.0f} tok/s); formerkit / {args.against} time = "
              f"{result['formerkit'] / result[args.against]:.3f}", flush=True)


if __name__ == "__main__":
    main()
