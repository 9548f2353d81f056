"""A/B of formerkit's training step against the same modules at another git revision, in one process: the LoRA bench
step (``formerkit bench lora``'s model, adapters and loop), the bench LM's or the DiT bench's training step, with
chosen modules as they are in the working tree (B) or at ``--base`` (A), taking turns in a shuffled order each round.

Variant A runs the old modules' code: their source at ``--base`` is executed into module objects of their own, the
model's parts whose classes come from those modules are given the old classes, and while an A step runs, every
formerkit module's names bound to the new objects (``from formerkit.nn.positions import apply_rotary``) point at
the old ones. Only modules whose public objects keep their names can be compared this way.

    python benchmarks/revision_ab.py --modules formerkit/nn/feedforward.py [--base main] [--bench lora|lm|dit]
        [--threads 1] [--rounds 20] [--clock cpu|wall]

CPU time (``time.process_time``) at 1 thread is the least disturbed by other processes on a loaded machine; wall time
at the machine's threads is what the benches report."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
import types

import torch

from formerkit.bench.common import train_step


def old_module(path: str, base: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{base}:{path}"], capture_output=True, text=True, check=True).stdout
    name = path[:-3].replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = f"{base}:{path}"
    sys.modules[f"_old_{name}"] = module
    from formerkit.adapt.methods import METHODS

    registered = dict(METHODS)  # the old module registers its adaptation methods again: not into the live registry
    METHODS.clear()
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    finally:
        METHODS.clear()
        METHODS.update(registered)
    return module


def swaps(paths: list[str], base: str) -> tuple[list[tuple[dict, str, object, object]], dict]:
    """(namespace, name, new, old) for every binding to swap, and new class -> old class."""
    olds = {path[:-3].replace("/", "."): old_module(path, base) for path in paths}
    bindings, classes = [], {}
    for name, old in olds.items():
        new = sys.modules[name]
        replaced = {id(value): old.__dict__[key] for key, value in vars(new).items()
                    if key in old.__dict__ and old.__dict__[key] is not value and not key.startswith("__")
                    and not isinstance(value, types.ModuleType)}
        for key, value in vars(new).items():
            if isinstance(value, type) and id(value) in replaced:
                classes[value] = old.__dict__[key]
        for module in list(sys.modules.values()):
            if not getattr(module, "__name__", "").startswith("formerkit") or module is old:
                continue
            for key, value in list(vars(module).items()):
                if id(value) in replaced and not key.startswith("__"):
                    bindings.append((vars(module), key, value, replaced[id(value)]))
    return bindings, classes


@contextlib.contextmanager
def running_old(bindings):
    for namespace, key, _, old in bindings:
        namespace[key] = old
    try:
        yield
    finally:
        for namespace, key, new, _ in bindings:
            namespace[key] = new


def build(bench: str):
    """(model, optimizer, inputs, targets, gradient clipping) of the bench's training step; for ``dit``, (model,
    optimizer, batch, its step function, None)."""
    torch.manual_seed(0)
    if bench == "dit":
        from formerkit.bench.dit import DiTSpec, _batch, _build
        from formerkit.bench.dit import train_step as dit_step

        model, optimizer = _build("formerkit", DiTSpec())
        return model.train(), optimizer, _batch(DiTSpec()), dit_step, None
    if bench == "lora":
        from formerkit.bench.lora import LoRASpec, _batch, _build, _optimizer

        spec = LoRASpec()
        model = _build("formerkit", spec).train()
        tokens = _batch(spec)
        return model, _optimizer(model), tokens[:, :-1], tokens[:, 1:], None
    from formerkit.bench.lm import LMSpec, _batch, _build

    spec = LMSpec()
    contender = _build("formerkit", spec, decode_compile=False)
    model = contender.model.train()
    tokens = _batch(spec)
    return model, contender.optimizer(model), tokens[:, :-1], tokens[:, 1:], contender.grad_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", required=True)
    parser.add_argument("--base", default="main")
    parser.add_argument("--bench", choices=("lora", "lm", "dit"), default="lora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bindings, classes = swaps(args.modules, args.base)
    steps = {}
    for variant in ("A", "B"):
        model, optimizer, inputs, targets, clip = build(args.bench)
        if variant == "A":
            for part in model.modules():
                if type(part) in classes:
                    part.__class__ = classes[type(part)]
        context = (lambda: running_old(bindings)) if variant == "A" else contextlib.nullcontext

        def step(model=model, optimizer=optimizer, inputs=inputs, targets=targets, clip=clip, context=context):
            with context():
                if args.bench == "dit":  # inputs: the batch, targets: the DiT bench's step
                    targets(model, optimizer, inputs)
                else:
                    train_step(model, optimizer, inputs, targets, "fp32", clip)

        steps[variant] = step
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for step in steps.values():
        step(), step()
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"bench {args.bench}, {args.threads} thread(s), {args.clock} ms per step, median of {args.rounds}: "
          f"A ({args.base}) {a * 1000:.1f}, B (working tree) {b * 1000:.1f}; A/B {a / b:.4f}; "
          f"min {min(times['A']) * 1000:.1f} / {min(times['B']) * 1000:.1f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
