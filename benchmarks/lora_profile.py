"""One LoRA training step of formerkit and of transformers + peft in one process under torch.profiler (1 thread):
self time per op (the products and SDPA grouped) summed over the step, the minimum over alternating steps (on a
loaded machine preemption only adds), formerkit's and peft's side by side.

    python benchmarks/lora_profile.py [rounds]"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from formerkit.bench.common import train_step
from formerkit.bench.lora import LoRASpec, _batch, _build, _optimizer

NAMES = ("formerkit", "transformers+peft")


def group(key: str) -> str:
    if key in ("aten::mm", "aten::addmm_", "aten::addmm"):
        return "matrix products (mm, addmm_)"
    if "flash_attention" in key:
        return "SDPA flash fwd+bwd"
    return key


def main(rounds: int = 5) -> None:
    torch.set_num_threads(1)
    spec = LoRASpec()
    models = {name: _build(name, spec).train() for name in NAMES}
    optimizers = {name: _optimizer(model) for name, model in models.items()}
    tokens = _batch(spec)

    def step(name):
        train_step(models[name], optimizers[name], tokens[:, :-1], tokens[:, 1:], "fp32")

    for name in NAMES:
        step(name), step(name)
    table = {name: {} for name in NAMES}
    for _ in range(rounds):
        for name in NAMES:
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                step(name)
            totals = {}
            for event in profiler.key_averages():
                key = group(event.key)
                totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1000
            for key, value in totals.items():
                table[name].setdefault(key, []).append(value)
    rows = [(key, min(table[NAMES[0]].get(key, [0.0])), min(table[NAMES[1]].get(key, [0.0])))
            for key in set(table[NAMES[0]]) | set(table[NAMES[1]])]
    rows.sort(key=lambda row: -max(row[1], row[2]))
    print(f"{'op':40s} {'formerkit ms':>12s} {'peft ms':>9s} {'diff':>7s}")
    for key, ours, theirs in rows[:22]:
        print(f"{key[:40]:40s} {ours:12.1f} {theirs:9.1f} {theirs - ours:+7.1f}")
    ours, theirs = sum(row[1] for row in rows), sum(row[2] for row in rows)
    print(f"{'sum of per-op minima':40s} {ours:12.1f} {theirs:9.1f} {theirs - ours:+7.1f}")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
