"""Where batch-1 decoding's time goes (issue 22): the parts of a compiled ``generate``, the loop around the step,
the per-step overhead of formerkit eager and transformers with free matrices, the eager lean step against the
general forward pass, and operator counts.

The bench LM of ``decode_speed.py`` (6 layers, width 384, context 256, vocabulary 65; transformers GPT-2 weights read
with ``formerkit.from_hf``). Every timing is CPU time of one thread (``time.process_time``; wall time with
``--threads`` above 1), repeated and
interleaved; medians. ``--gemm`` also compiles the step with each of the compiled step's matrix-product settings and
times them side by side (``--rows`` rows per step; each compile takes minutes).

    python benchmarks/decode_profile.py [--repeats 5] [--gemm] [--rows 1] [--eager-only] [--threads 1]

Needs the ``dev`` extra (transformers). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time

import torch

clock = time.process_time


def bench_models(width: int = 384):
    import transformers

    import formerkit

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=width, n_positions=256, vocab_size=65,
                                     bos_token_id=None, eos_token_id=None)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = formerkit.from_hf(directory).eval()
    return theirs, ours


def floor_ms(model, rows: int = 1, tokens: int = 200) -> float:
    """decode_speed's weight-streaming floor per token, over as many tokens as a run decodes (one round). (Over 20
    tokens right after a compiled generate, what this took before, it measured 13% slower than over 200 on the
    2026-12-05 host, 1.79 against 1.58 ms at one thread -- the compiled step's packed copy of the weights had taken
    their place in the caches -- and made the compiled step look closer to the floor than it is.)"""
    from decode_speed import _floor_products

    run = _floor_products(model, rows, tokens)
    begin = clock()
    run()
    return (clock() - begin) / tokens * 1000


def report(results: dict[str, list[float]]) -> dict[str, float]:
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        print(f"  {name:44s} median {medians[name]:9.3f}  min {min(values):9.3f}")
    return medians


def compiled_parts(ours, prompt, count: int, repeats: int) -> None:
    from formerkit.generation.compiled_step import CompiledDecoder, bind_compiled_step
    from formerkit.generation.sampling import _prefill
    from formerkit.nn.cache import KVCache

    def whole():
        begin = clock()
        ours.generate(prompt, count, temperature=0, compile=True)
        return (clock() - begin) * 1000

    def allocate():
        begin = clock()
        for _ in range(10):
            KVCache.for_model(ours, 1, 256, rolling=False)
        return (clock() - begin) * 100

    def prefill():
        caches = [KVCache.for_model(ours, 1, 256, rolling=False) for _ in range(5)]
        with torch.inference_mode():
            begin = clock()
            for cache in caches:
                _prefill(ours, cache, prompt, None, None, None)
            return (clock() - begin) * 200

    def find_step():
        begin = clock()
        for _ in range(20):
            CompiledDecoder.for_model(ours)
        return (clock() - begin) * 50

    def steps():
        with torch.inference_mode():
            cache = KVCache.for_model(ours, 1, 256, rolling=False)
            _prefill(ours, cache, prompt, None, None, None)
            step, _ = bind_compiled_step(ours, cache)
            token = torch.zeros(1, 1, dtype=torch.long)
            begin = clock()
            for _ in range(count - 1):
                _, best = step(token)
                token = best.view(-1, 1)
            return (clock() - begin) / (count - 1) * 1000

    parts = {f"generate({count}, compile=True), ms": whole, "cache allocation, ms": allocate,
             "eager prefill, ms": prefill, "finding the compiled step, ms": find_step,
             "one compiled step alone, ms": steps, "floor per token, ms": lambda: floor_ms(ours)}
    for part in parts.values():
        part()  # warm-up (and the compile)
    results = {name: [] for name in parts}
    for _ in range(repeats):
        for name, part in parts.items():
            results[name].append(part())
    print(f"compiled generate, batch 1, {prompt.shape[1]}-token prompt, {count} tokens (CPU ms):")
    medians = report(results)
    floor = medians["floor per token, ms"]
    print(f"  whole call at {count * floor / medians[f'generate({count}, compile=True), ms']:.1%} of the floor; "
          f"the step alone at {floor / medians['one compiled step alone, ms']:.1%}")


def loop_overhead(ours, prompt, repeats: int) -> None:
    """generate(compile=True)'s loop around a step that does nothing: its own Python per step."""
    import formerkit.generation.sampling as sampling

    logits, best = torch.zeros(1, 65), torch.zeros(1, dtype=torch.long)
    rest = [torch.zeros(1) for _ in range(17)]

    class Slots:
        slot = torch.zeros(1)

    real = sampling.bind_compiled_step
    sampling.bind_compiled_step = lambda model, cache: ((lambda tokens: (logits, best) if [tokens, *rest] else None),
                                                        Slots())
    try:
        def run(count: int) -> float:
            begin = clock()
            ours.generate(prompt, count, temperature=0, compile=True)
            return clock() - begin

        run(200)
        per_step = [(run(200) - run(2)) / 198 * 1e6 for _ in range(3 * repeats)]
    finally:
        sampling.bind_compiled_step = real
    print(f"generate's loop around a step that does nothing: {statistics.median(per_step):.1f} µs per step")


def free_matrices(prompt, repeats: int) -> None:
    """Per-token time with the matrices nearly free (width 12, same 6 layers): per-step overhead."""
    theirs, ours = bench_models(width=12)

    def per_token(run) -> float:
        run(2)
        begin = clock()
        run(102)
        long = clock() - begin
        begin = clock()
        run(2)
        return (long - (clock() - begin)) / 100 * 1000

    def hf(count):
        with torch.inference_mode():
            theirs.generate(prompt, max_new_tokens=count, do_sample=False, pad_token_id=0)

    def eager(count):
        ours.generate(prompt, count, temperature=0)

    results = {"transformers, ms per token": [], "formerkit eager, ms per token": []}
    for _ in range(2 * repeats):
        results["transformers, ms per token"].append(per_token(hf))
        results["formerkit eager, ms per token"].append(per_token(eager))
    print("per-step overhead: the same decoder at width 12 (CPU ms per token):")
    report(results)


def eager_paths(prompt, repeats: int, count: int = 100) -> None:
    """generate without compile through the lean step (the default) and through the general forward pass
    (``LeanStep.build`` made to refuse), beside transformers, at width 384 and at width 12 (matrices nearly free:
    the per-step overhead). Interleaved in shuffled order, ms per token."""
    for width in (384, 12):
        _eager_paths_at(width, prompt, repeats, count)


def _eager_paths_at(width: int, prompt, repeats: int, count: int) -> None:
    import random

    from formerkit.generation.lean_step import LeanStep

    build = LeanStep.__dict__["build"]
    theirs, ours = bench_models(width)

    def hf():
        with torch.inference_mode():
            return theirs.generate(prompt, max_new_tokens=count, do_sample=False, pad_token_id=0)

    def lean():
        return ours.generate(prompt, count, temperature=0)

    def general():
        LeanStep.build = staticmethod(lambda model, cache: None)
        try:
            return ours.generate(prompt, count, temperature=0)
        finally:
            LeanStep.build = build

    runs = {"transformers": hf, "formerkit eager, lean step": lean, "formerkit eager, general forward": general}
    outputs = [run() for run in runs.values()]  # warm-up; every path makes the same tokens
    if not all(torch.equal(output, outputs[0]) for output in outputs):
        raise SystemExit(f"width {width}: the eager paths generated different tokens")
    results = {name: [] for name in runs}
    for _ in range(3 * repeats):
        for name in random.sample(list(runs), len(runs)):
            begin = clock()
            runs[name]()
            results[name].append((clock() - begin) / count * 1000)
    print(f"eager generate at width {width}, batch 1, {count} tokens (ms per token, same tokens):")
    medians = report(results)
    base = medians["transformers"]
    print("  vs transformers: " + ", ".join(f"{name} x{base / value:.2f}" for name, value in medians.items()
                                             if name != "transformers"))


def operator_counts(theirs, ours, prompt) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from formerkit.nn.cache import KVCache

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    from formerkit.generation.lean_step import LeanStep

    with torch.inference_mode():
        cache = KVCache.for_model(ours, 1, 256)
        ours(prompt, cache=cache, logits_to_keep=1)
        with Count() as counted:
            ours(prompt[:, :1], cache=cache, logits_to_keep=1)
        step = LeanStep.build(ours, cache)
        with Count() as lean:
            step(prompt[:, 0])

    def hf(count: int) -> int:
        with torch.inference_mode(), Count() as counted:
            theirs.generate(prompt, max_new_tokens=count, do_sample=False, pad_token_id=0)
        return sum(counted.calls.values())

    print(f"ATen calls per eager step: formerkit's lean step {sum(lean.calls.values())} "
          f"({', '.join(f'{name} {n}' for name, n in lean.calls.most_common(8))}); "
          f"through the general forward {sum(counted.calls.values())} "
          f"({', '.join(f'{name} {n}' for name, n in counted.calls.most_common(8))}); "
          f"transformers {(hf(12) - hf(2)) / 10:.0f} per token")
    x, y = torch.randn(1, 384), torch.randn(1, 384)
    with torch.inference_mode():
        begin = clock()
        for _ in range(20000):
            torch.add(x, y)
        print(f"one small ATen call (add of 384 floats): {(clock() - begin) / 20000 * 1e6:.2f} µs")


def gemm_settings(ours, prompt, rows: int, repeats: int) -> None:
    import formerkit.generation.compiled_step as compiled_step
    from formerkit.generation.sampling import _prefill
    from formerkit.nn.cache import KVCache, StaticSlots

    names = ("inductor templates, weights packed", "matrix library call")
    runners = {}
    keep = None
    if rows > 1:
        from decode_speed import mixed_prompts

        prompt, keep = mixed_prompts(rows, prompt.shape[1])
        keep = keep.bool()

    def fresh_slots():
        cache = KVCache.for_model(ours, rows, 256, rolling=False)
        _prefill(ours, cache, prompt, keep, None, None)
        return StaticSlots(cache)

    configs = compiled_step._GEMM_CONFIGS
    try:
        with torch.inference_mode():
            for name, config in zip(names, configs):
                compiled_step._GEMM_CONFIGS = (config,)
                slots = fresh_slots()
                flat = compiled_step.flat_inputs(torch.zeros(rows, 1, dtype=torch.long), slots)
                runners[name] = compiled_step.compile_ahead_of_time(ours, slots, flat)
    finally:
        compiled_step._GEMM_CONFIGS = configs

    def steps(runner) -> float:
        with torch.inference_mode():
            rest = compiled_step.flat_inputs(torch.zeros(rows, 1, dtype=torch.long), fresh_slots())[1:]
            run = runner.loader.boxed_run
            token = torch.zeros(rows, 1, dtype=torch.long)
            begin = clock()
            for _ in range(199):
                _, best = run([token, *rest])
                token = best.view(-1, 1)
            return (clock() - begin) / 199 * 1000

    results = {f"step, {name}, ms": [] for name in names}
    for _ in range(repeats):
        for name in names:
            results[f"step, {name}, ms"].append(steps(runners[name]))
    print(f"the compiled step's matrix products, {rows} rows (CPU ms per step):")
    report(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--gemm", action="store_true", help="also compile and time each matrix-product setting")
    parser.add_argument("--rows", type=int, default=1, help="rows per step for --gemm")
    parser.add_argument("--eager-only", action="store_true", help="only the eager paths and the operator counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; above 1 every timing is wall time (CPU time adds up the threads)")
    args = parser.parse_args()
    global clock
    torch.set_num_threads(args.threads)
    if args.threads > 1:
        clock = time.perf_counter
    theirs, ours = bench_models()
    prompt = torch.randint(0, 65, (1, 8), generator=torch.Generator().manual_seed(1))
    if not args.eager_only:
        compiled_parts(ours, prompt, args.new_tokens, args.repeats)
        loop_overhead(ours, prompt, args.repeats)
        free_matrices(prompt, args.repeats)
    eager_paths(prompt, args.repeats)
    operator_counts(theirs, ours, prompt)
    if args.gemm:
        gemm_settings(ours, prompt, args.rows, args.repeats)


if __name__ == "__main__":
    main()
