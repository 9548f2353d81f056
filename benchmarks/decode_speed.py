"""Greedy decoding speed: formerkit against Hugging Face ``generate`` on the same architecture and weights.

The model is the nanoGPT shakespeare-char-sized decoder (6 layers, 6 heads, width 384, context 256, vocabulary 65).
A random-weight transformers GPT-2 of that size is saved to a temporary directory and read into formerkit with
``formerkit.from_hf``, so both sides run identical weights; the script first checks that they generate the same
tokens. Then it alternates the contenders ``--repeats`` times and reports the median tokens per second of each.

Batch 1 decodes one ``--prompt``-token prompt. A larger ``--batch`` decodes prompts of mixed lengths (from 1 to
``--prompt`` tokens, spread evenly) left-padded with an attention mask, as ``generate`` takes them; tokens per second
then counts every row's new tokens. Contenders: transformers, formerkit eager (the default, no compile) and
formerkit ``compile=True``.

At batch 1 the weight-streaming floor takes its turns with the contenders (``_floor_products``): the model's weight
matrices multiplied by one vector each, back to back, the least any decoder of these weights does per token; the
run reports each contender against the floor's median and against its best round. It then adds what the floor leaves
out, the products of each step's query with the cached keys and values (``_cache_attention_floor``). Batched runs
time both kinds of products for the batch's rows and report the ceiling they put on any decoder's gain over
transformers. ``--clock cpu`` reads the process's CPU time instead of the wall clock for every contender and the
floor alike (meaningful with ``--threads 1`` only): on a machine shared with other jobs it leaves out the time the
process waited for a core.

    python benchmarks/decode_speed.py [--batch 1 8 32] [--new-tokens 200] [--prompt 8] [--repeats 7] [--threads N]
                                      [--no-compile] [--clock wall|cpu] [--json PATH]

Needs the ``dev`` extra (transformers). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to measure, one run each")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=8, help="prompt length in tokens (the longest, batched)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock (default) or the process's CPU time, for every contender and the floor")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    import transformers

    import formerkit

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=65,
                                     bos_token_id=None, eos_token_id=None)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = formerkit.from_hf(directory)
    report = {"clock": args.clock, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "runs": []}
    for batch in args.batch:
        report["runs"].append(_run(theirs, ours, batch, args, clock))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    print(json.dumps(report))


def mixed_prompts(batch: int, longest: int, vocab: int = 65) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``batch`` random prompts, left-padded to ``longest`` tokens: lengths spread evenly over 1..longest (the last
    row the longest), and their attention mask (None at batch 1, one prompt of ``longest`` tokens)."""
    ids = torch.randint(0, vocab, (batch, longest), generator=torch.Generator().manual_seed(1))
    if batch == 1:
        return ids, None
    lengths = [max(1, round(longest * (row + 1) / batch)) for row in range(batch)]
    keep = torch.zeros(batch, longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        keep[row, longest - length:] = 1
    return ids.masked_fill(keep == 0, 0), keep


def _run(theirs, ours, batch: int, args, clock) -> dict:
    import transformers

    prompt, keep = mixed_prompts(batch, args.prompt)
    count = args.new_tokens

    def hf() -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(prompt, attention_mask=keep, max_new_tokens=count, do_sample=False,
                                   pad_token_id=0)

    def eager() -> torch.Tensor:
        return ours.generate(prompt, count, attention_mask=keep, temperature=0)

    def compiled() -> torch.Tensor:
        return ours.generate(prompt, count, attention_mask=keep, temperature=0, compile=True)

    contenders = {"transformers": hf, "formerkit": eager}
    if not args.no_compile:
        contenders["formerkit compile=True"] = compiled
    start = time.perf_counter()
    outputs = {name: run() for name, run in contenders.items()}  # warm-up (and the compile)
    if batch == 1:  # the floor takes its turns with the contenders: the same rounds, the same statistic
        contenders[FLOOR] = _floor_products(ours, 1, count)
    warmup = time.perf_counter() - start
    reference = outputs["transformers"]
    for name, output in outputs.items():
        if not torch.equal(output, reference):
            rows = (output != reference).any(dim=1).nonzero().flatten().tolist()
            raise SystemExit(f"batch {batch}: {name} generated different tokens from transformers (rows {rows})")
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        # A shuffled order each round: a burst of load on a shared machine does not land on one contender's runs.
        for name in random.sample(list(contenders), len(contenders)):
            run = contenders[name]
            begin = clock()
            run()
            rates[name].append(batch * count / (clock() - begin))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["transformers"]
    lengths = [args.prompt] if keep is None else keep.sum(dim=1).tolist()
    print(f"batch {batch}, prompts of {min(lengths)}-{max(lengths)} tokens, {count} greedy tokens per row, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; identical tokens: yes; warm-up incl. compile {warmup:.1f} s")
    for name, value in medians.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:24s} {value:8.1f} tokens/s (median of {args.repeats}; range {spread})  "
              f"x{value / base:.2f} vs transformers")
    floor_rates = rates.pop(FLOOR, None)
    medians.pop(FLOOR, None)
    result = {"batch": batch, "prompt_lengths": lengths, "new_tokens": count, "tokens_per_second": medians,
              "all_rates": rates, "ratio_vs_transformers": {k: v / base for k, v in medians.items()}}
    if batch == 1:
        floor = _weight_streaming_floor(ours, clock)
        limit, typical = 1000 / floor["ms"], statistics.median(floor_rates)
        print(f"  {FLOOR}: the {floor['matrices']} weight matrices ({floor['megabytes']:.1f} MB) multiplied by one "
              f"vector each, back to back, nothing else; its best round alone {floor['ms']:.3f} ms per token = "
              f"{limit:.0f} tokens/s (x{limit / base:.2f} vs transformers)")
        for name, value in medians.items():
            if name != "transformers":
                print(f"  {name:24s} {value / typical:6.1%} of the floor (median of each), {value / limit:.1%} of "
                      f"its best round; best run {max(rates[name]) / limit:.1%}")
        # What the floor leaves out: each step also multiplies its query by every layer's cached keys and values.
        # Those products alone, timed over the same fills as the run's steps, added to the floor.
        attention = _cache_attention_floor(ours, 1, args.prompt, count, clock)
        with_cache = floor["ms"] + attention["ms"]
        print(f"  not in the floor: the key/value cache ({attention['megabytes']:.1f} MB per token on average); its "
              f"products alone {attention['ms']:.3f} ms per token, so weights and cache together {with_cache:.3f} ms "
              f"= at most {1000 / with_cache:.0f} tokens/s; of that: "
              + ", ".join(f"{name} {value * with_cache / 1000:.1%}" for name, value in medians.items()
                          if name != "transformers"))
        result["weight_streaming_floor_ms"] = floor["ms"]
        result["cache_attention_floor_ms"] = attention["ms"]
        result["weights_and_cache_floor_ms"] = with_cache
        result["fraction_of_weights_and_cache_floor"] = {k: v * with_cache / 1000 for k, v in medians.items()}
        result["fraction_of_floor"] = {k: v / limit for k, v in medians.items()}
        result["floor_tokens_per_second"] = floor_rates
        result["fraction_of_floor_medians"] = {k: v / typical for k, v in medians.items()}
    else:
        # Batched, the products are no longer a matter of streaming the weights once: a step multiplies ``batch``
        # rows by every matrix, and every row's query by its own cached keys and values. Timed alone (the same way
        # as the floor), they bound what any decoder can gain over transformers, which runs the same products: at
        # most its step time over theirs.
        floor = _weight_streaming_floor(ours, clock, rows=batch)
        attention = _cache_attention_floor(ours, batch, args.prompt, count, clock)
        step = 1000 * batch / base
        least = floor["ms"] + attention["ms"]
        print(f"  the step's matrix products alone, {batch} rows: {floor['ms']:.3f} ms per step, and its products "
              f"with the key/value cache ({attention['megabytes']:.1f} MB per step on average) {attention['ms']:.3f} "
              f"ms; transformers takes {step:.3f} ms per step, so no decoder running these products can beat it by "
              f"more than x{step / least:.2f} (x{step / floor['ms']:.2f} counting the weights' products only)")
        for name, value in medians.items():
            if name != "transformers":
                print(f"  {name:24s} {value / base * least / step:6.1%} of that ceiling")
        result["products_ms"] = floor["ms"]
        result["cache_attention_floor_ms"] = attention["ms"]
        result["ceiling_vs_transformers"] = step / least
        result["ceiling_weights_only_vs_transformers"] = step / floor["ms"]
    return result


FLOOR = "floor"


def _floor_products(model, rows: int, tokens: int) -> Callable[[], None]:
    """Every decoded token multiplies one vector by each weight matrix of the model once: ``tokens`` times those
    products back to back, nothing else, the least any decoder of these weights does for ``tokens`` tokens at batch 1.
    (``rows`` > 1: the products of a batched step, ``rows`` vectors per matrix.)"""
    matrices = [module.weight.detach() for module in model.modules() if isinstance(module, torch.nn.Linear)]
    vectors = {matrix.shape[1]: torch.randn(rows, matrix.shape[1]) for matrix in matrices}

    def run() -> None:
        with torch.inference_mode():
            for _ in range(tokens):
                for matrix in matrices:
                    torch.nn.functional.linear(vectors[matrix.shape[1]], matrix)

    run.matrices = matrices
    return run


def _weight_streaming_floor(model, clock=time.perf_counter, rows: int = 1) -> dict[str, float]:
    """The floor's products for one token (one step of ``rows`` rows): the best of 10 rounds of 20."""
    run = _floor_products(model, rows, 20)
    best = float("inf")
    for _ in range(10):
        begin = clock()
        run()
        best = min(best, (clock() - begin) / 20)
    return {"ms": best * 1000, "matrices": len(run.matrices),
            "megabytes": sum(matrix.numel() * matrix.element_size() for matrix in run.matrices) / 1e6}


def _cache_attention_floor(model, rows: int, prompt: int, count: int, clock=time.perf_counter) -> dict[str, float]:
    """The attention products a decode step cannot skip: each row's query heads times the keys, and the weights times
    the values, of every layer's filled cache slots. Timed back to back over the fills of a run's steps (``prompt``
    + 1 up to ``prompt + count`` slots; every layer's cache in one batched product per step, so no per-call work per
    layer; best of several rounds); no softmax or anything else. Returns the mean per step and the cache bytes a step
    reads on average."""
    config = model.config
    heads, kv_heads, head_dim = config.attention.num_heads, config.attention.kv_heads, config.head_dim
    groups = rows * kv_heads * config.num_layers
    longest = prompt + count
    keys, values = torch.randn(groups, longest, head_dim), torch.randn(groups, longest, head_dim)
    queries = torch.randn(groups, heads // kv_heads, head_dim)
    fills = range(prompt + 1, prompt + count)  # the steps after the prefill's token
    best = float("inf")
    with torch.inference_mode():
        for _ in range(5):
            begin = clock()
            for filled in fills:
                scores = torch.bmm(queries, keys[:, :filled].transpose(1, 2))
                torch.bmm(scores, values[:, :filled])
            best = min(best, (clock() - begin) / len(fills))
    mean_fill = sum(fills) / len(fills)
    return {"ms": best * 1000, "megabytes": 2 * groups * mean_fill * head_dim * 4 / 1e6}


if __name__ == "__main__":
    main()
