"""What a compiler gives formerkit's fp32 training step on the bench LM (issue 22, "fp32 training throughput: measure
what fused CPU work can give ... inductor's CPU codegen with max-autotune ... and keep what pays").

Contenders, each its own copy of the same weights, taking turns step by step in one process (medians):

- ``eager``: formerkit's default training path (``formerkit bench lm``'s step: cross-entropy, backward, the gradient
  norm clipped to 1, fused AdamW);
- ``compile``: the same model under ``torch.compile`` (inductor's default mode: its fused element-wise C++ kernels,
  the products left to the matrix library);
- ``max-autotune``: ``torch.compile(mode="max-autotune")``: inductor also times its own C++ GEMM templates (with the
  activation in their epilogue) against the library's and keeps the faster per product shape;
- the fastest peer of ``formerkit bench lm`` (nanoGPT-style, eager), for the ratio the target is stated in.

The first call of a compiled contender (its compile time) is reported apart; the steps timed are after two warm-up
steps each. formerkit's own recomputing paths (norm outputs rebuilt, the MLP activation recomputed) step aside under
a compiler (``torch.compiler.is_compiling()``): the compiler's own choices apply there.

    PYTHONPATH=. python benchmarks/compiled_training.py --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time

import torch

from formerkit.bench.common import train_step
from formerkit.bench.lm import LMSpec, _batch, _build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contender (default 12)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--modes", nargs="+", default=["compile", "max-autotune"],
                        help="compiled contenders (default: compile max-autotune)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec, batch = LMSpec(), _batch(LMSpec())
    torch.manual_seed(0)
    base = _build("formerkit", spec, decode_compile=False)
    peer = _build("nanogpt", spec, decode_compile=False)
    contenders = {"eager": (base.model, base.optimizer(base.model), base.grad_clip),
                  "nanogpt": (peer.model, peer.optimizer(peer.model), peer.grad_clip)}
    compile_seconds = {}
    for mode in args.modes:
        model = copy.deepcopy(base.model)
        compiled = torch.compile(model, mode=None if mode == "compile" else mode)
        optimizer = base.optimizer(model)
        start = time.perf_counter()
        train_step(compiled, optimizer, batch[:, :-1], batch[:, 1:], "fp32", base.grad_clip)
        compile_seconds[mode] = time.perf_counter() - start
        print(f"{mode}: first step (compiling) {compile_seconds[mode]:.1f} s", flush=True)
        contenders[mode] = (compiled, optimizer, base.grad_clip)
    for model, optimizer, clip in contenders.values():
        for _ in range(2):
            train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", clip)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.steps):
        order = list(contenders)
        random.shuffle(order)
        for name in order:
            model, optimizer, clip = contenders[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", clip)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = spec.batch * spec.context
    peer_rate = tokens / statistics.median(times["nanogpt"])
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, medians of {args.steps} steps")
    print("| contender | step ms (wall) | CPU ms | tok/s | vs nanogpt | vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    eager_rate = tokens / statistics.median(times["eager"])
    for name in contenders:
        rate = tokens / statistics.median(times[name])
        print(f"| {name} | {1e3 * statistics.median(times[name]):.0f} | {1e3 * statistics.median(cpu[name]):.0f} | "
              f"{rate:,.0f} | {rate / peer_rate:.3f} | {rate / eager_rate:.3f} |")


if __name__ == "__main__":
    main()
