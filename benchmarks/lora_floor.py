"""Where `formerkit bench lora`'s step time goes against its limit: CPU time per training step (1 torch thread by
default) of formerkit, transformers + peft, and a *floor* -- the step's matrix products and flash-attention calls
alone (same shapes, same count: the forward products, the input-gradient products a frozen base needs, SDPA forward
and backward), no element-wise work. The steps take turns; min and median over the rounds. CPU time rather than wall
clock: on a loaded machine, wall clock charges preemption to whatever was running.

    python benchmarks/lora_floor.py [threads] [rounds] [--compile] [--clock cpu|wall]

peft / floor is the most any eager contender running these kernels could reach against peft. ``--compile`` adds both
models under ``torch.compile`` (inductor fuses their element-wise work into C++ loops: what fusion gives on this CPU;
the compile happens in the warm-up). ``--clock wall`` times wall clock instead (for more than one thread)."""
import argparse
import os
import statistics
import time

import torch

from formerkit.bench.common import train_step
from formerkit.bench.lora import LoRASpec, _batch, _build, _optimizer


def floor_step(spec: LoRASpec, weights: dict, generator: torch.Generator) -> None:
    """The products and SDPA calls of one LoRA step of ``spec`` (LoRA's rank-8 products left out)."""
    batch, length, width, heads, kv_heads = spec.batch, spec.context, spec.width, spec.heads, spec.kv_heads
    head_dim, tokens = width // heads, spec.batch * spec.context
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    x, saved = torch.randn(tokens, width, generator=generator), []
    for layer in weights["layers"]:
        q, k, v = (x @ layer[name].t() for name in ("q", "k", "v"))
        q = q.view(batch, length, heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        out, lse = flash(q, k, v, 0.0, True)
        o = out.transpose(1, 2).reshape(tokens, width) @ layer["out"].t()
        gate, up = o @ layer["gate"].t(), o @ layer["up"].t()
        x = up @ layer["down"].t()
        del gate
        saved.append((q, k, v, out, lse))
    grad = (x @ weights["head"].t()) @ weights["head"]
    for index in reversed(range(len(weights["layers"]))):
        layer, (q, k, v, out, lse) = weights["layers"][index], saved[index]
        hidden = grad @ layer["down"]
        grad_o = hidden @ layer["gate"]
        grad_o.addmm_(hidden, layer["up"])
        grad_a = (grad_o @ layer["out"]).view(batch, length, heads, head_dim).transpose(1, 2)
        grad_q, grad_k, grad_v = flash_backward(grad_a, q, k, v, out, lse, 0.0, True)
        if index:  # layer 0's input takes no gradient (a frozen embedding)
            grad = grad_q.transpose(1, 2).reshape(tokens, width) @ layer["q"]
            grad.addmm_(grad_k.transpose(1, 2).reshape(tokens, -1), layer["k"])
            grad.addmm_(grad_v.transpose(1, 2).reshape(tokens, -1), layer["v"])


def main(threads: int = 1, rounds: int = 7, compiled: bool = False, clock=time.process_time) -> None:
    torch.set_num_threads(threads)
    spec = LoRASpec()
    generator = torch.Generator().manual_seed(0)
    kv, head_dim = spec.kv_heads * spec.width // spec.heads, spec.width // spec.heads

    def weight(rows, columns):
        return torch.randn(rows, columns, generator=generator) / columns ** 0.5

    shapes = {"q": (spec.heads * head_dim, spec.width), "k": (kv, spec.width), "v": (kv, spec.width),
              "out": (spec.width, spec.width), "gate": (spec.hidden, spec.width), "up": (spec.hidden, spec.width),
              "down": (spec.width, spec.hidden)}
    weights = {"layers": [{name: weight(*shape) for name, shape in shapes.items()} for _ in range(spec.layers)],
               "head": weight(spec.vocab, spec.width)}
    tokens = _batch(spec)
    steps = {"floor (products + SDPA)": lambda: floor_step(spec, weights, generator)}
    for library in ("formerkit", "transformers+peft"):
        for compile_ in (False, True) if compiled else (False,):
            model = _build(library, spec).train()
            optimizer = _optimizer(model)
            run = torch.compile(model) if compile_ else model
            steps[library + (" compiled" if compile_ else "")] = (
                lambda run=run, optimizer=optimizer: train_step(run, optimizer, tokens[:, :-1], tokens[:, 1:], "fp32"))
    for step in steps.values():  # warm-up (and the compiles)
        step(), step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    what = "CPU" if clock is time.process_time else "wall"
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:30s} {what} ms per step: min {min(values) * 1000:6.0f}, median {median * 1000:6.0f}")
    best = {name: min(values) for name, values in times.items()}
    peft = best["transformers+peft"]
    print("eager peft / each: " + ", ".join(f"{name} {peft / value:.3f}" for name, value in best.items()) +
          f"; load average {os.getloadavg()[0]:.1f}; {threads} thread(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("threads", type=int, nargs="?", default=1)
    parser.add_argument("rounds", type=int, nargs="?", default=7)
    parser.add_argument("--compile", action="store_true", help="also both models under torch.compile")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    main(args.threads, args.rounds, args.compile, time.process_time if args.clock == "cpu" else time.perf_counter)
