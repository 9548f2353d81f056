"""Training memory and speed of the bench LM (``formerkit bench lm``'s model), formerkit's training path against the
path before issue 22 ("plain": norms' outputs kept for the backward pass and the MLP activation's derivative a
tensor of its own in the backward pass), and the leanest peer.

    PYTHONPATH=. python benchmarks/train_memory.py --memory 3 --speed 20

Memory: ``formerkit bench lm``'s measure (a fresh process per figure; peak resident memory gained over building the
model and two training steps, after a tiny warm-up), alternating the contenders ``--memory`` times. Speed: one
process, the two paths alternating step by step on the same model (the trainer's step: cross-entropy, backward, the
gradient norm clipped to 1, fused AdamW), medians of ``--speed`` steps each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from formerkit.bench.common import in_fresh_process, train_step
from formerkit.bench.lm import LMSpec, _batch, _build

PLAIN = """
import contextlib
import formerkit.models.transformer as transformer_module, formerkit.nn.block as block_module
import formerkit.nn.feedforward as feedforward_module
block_module.recomputed_norm_output = transformer_module.recomputed_norm_output = (
    lambda *args: contextlib.nullcontext())
feedforward_module._derivative_in_place = lambda name, g, h: feedforward_module._DERIVATIVES[name](g, h)
"""


def plain_path(on: bool) -> None:
    """Switches this process to the path before issue 22 (``on``) or back."""
    import formerkit.models.transformer as transformer_module
    import formerkit.nn.block as block_module
    import formerkit.nn.feedforward as feedforward_module

    saved = getattr(plain_path, "saved", None)
    if saved is None:
        saved = plain_path.saved = (block_module.recomputed_norm_output, feedforward_module._derivative_in_place)
    if on:
        exec(PLAIN, {})
    else:
        block_module.recomputed_norm_output, feedforward_module._derivative_in_place = saved
        transformer_module.recomputed_norm_output = saved[0]


def memory(library: str, plain: bool = False) -> float:
    code = (PLAIN if plain else "") + (
        "import json; from formerkit.bench.lm import memory_child; "
        f"print(json.dumps(memory_child({library!r}, {json.dumps(LMSpec().__dict__)}, 'fp32', 2)))")
    return float(in_fresh_process(code, library))


def speed(steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    spec = LMSpec()
    contender = _build("formerkit", spec, decode_compile=False)
    model, optimizer, batch = contender.model, contender.optimizer(contender.model), _batch(spec)
    times = {"plain": [], "formerkit": []}

    def step(name: str) -> float:
        plain_path(name == "plain")
        start = time.perf_counter()
        train_step(model, optimizer, batch[:, :-1], batch[:, 1:], "fp32", contender.grad_clip)
        return time.perf_counter() - start

    for name in ("plain", "formerkit", "plain", "formerkit"):
        step(name)  # warm-up
    for i in range(steps):
        for name in (("plain", "formerkit") if i % 2 == 0 else ("formerkit", "plain")):
            times[name].append(step(name))
    plain_path(False)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=3, help="rounds of the fresh-process memory measure (0: skip)")
    parser.add_argument("--speed", type=int, default=20, help="alternating steps per path (0: skip)")
    parser.add_argument("--peer", default="nanogpt", help="the peer measured beside (bench lm's name)")
    args = parser.parse_args()
    with contextlib.suppress(OSError):
        print("load average:", open("/proc/loadavg").read().split()[:3], "threads:", torch.get_num_threads())
    if args.memory:
        figures = {"plain": [], "formerkit": [], args.peer: []}
        for _ in range(args.memory):
            figures["plain"].append(memory("formerkit", plain=True))
            figures["formerkit"].append(memory("formerkit"))
            figures[args.peer].append(memory(args.peer))
            print({name: values[-1] for name, values in figures.items()}, flush=True)
        medians = {name: statistics.median(values) for name, values in figures.items()}
        print(f"peak MB (median of {args.memory}): " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items())
              + f"; formerkit / {args.peer} = {medians['formerkit'] / medians[args.peer]:.3f}, plain / "
              f"{args.peer} = {medians['plain'] / medians[args.peer]:.3f}")
    if args.speed:
        result = speed(args.speed)
        tokens = LMSpec().batch * LMSpec().context
        print(f"training step (median of {args.speed}): plain {result['plain'] * 1e3:.0f} ms "
              f"({tokens / result['plain']:,.0f} tok/s), formerkit {result['formerkit'] * 1e3:.0f} ms "
              f"({tokens / result['formerkit']:,.0f} tok/s); formerkit / plain time = "
              f"{result['formerkit'] / result['plain']:.3f}")


if __name__ == "__main__":
    main()
