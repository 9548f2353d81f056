"""Speculative decoding: batch-1 greedy tokens/s of a char-lm-sized model alone, with a smaller distilled draft model,
and with prompt lookup (n-grams), on Python source; the script checks that every contender generates the same tokens.

The models are trained, not random, since acceptance is what speculation lives on: the target is the shipped
``char-lm`` recipe (4 layers, width 192, RoPE, bytes of the standard library's source) shortened to ``--steps``
steps at batch 8, and the draft a 1-layer width-64 student distilled from it (``formerkit distill``). Both are
trained once into ``--work`` and reused by later invocations (or pass ``--target RUN --draft RUN``). The prompts are
slices of standard-library files the model continues greedily; contenders run interleaved ``--repeats`` times and
the median tokens/s is reported, with the tokens made per pass of the target and the guesses kept.

    python benchmarks/speculative.py [--work DIR] [--steps 400] [--draft-steps 300] [--new-tokens 128] [--repeats 5]
    python benchmarks/speculative.py --target RUN --draft RUN

It also times one pass of the target over 1 token and over k + 1 tokens (cache warm), the ceiling that acceptance
works against. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def trained_runs(work: Path, steps: int, draft_steps: int) -> tuple[Path, Path]:
    """The target and draft run directories in ``work``, trained unless already there."""
    from formerkit.compress.distill import distill_run
    from formerkit.train import train

    # Half the recipe's batch, so a run takes minutes on a laptop's CPU.
    schedule = {"schedule.steps": steps, "schedule.batch_size": 8, "eval.every": steps, "eval.batches": 2,
                "run.progress": False, "run.checkpoint_every": steps}
    target, draft = work / "target", work / "draft"
    if not (target / "summary.json").exists():
        print(f"training the target ({steps} steps) into {target} ...", flush=True)
        train("char-lm", target, overrides=schedule)
    if not (draft / "summary.json").exists():
        print(f"distilling the draft ({draft_steps} steps) into {draft} ...", flush=True)
        distill_run(str(target), "char-lm", draft, overrides={**schedule, "schedule.steps": draft_steps,
                                                              "eval.every": draft_steps,
                                                              "run.checkpoint_every": draft_steps,
                                                              "model.num_layers": 1, "model.width": 64,
                                                              "model.num_heads": 2})
    return target, draft


def prompts(count: int, length: int) -> list[list[int]]:
    """Byte prompts: slices of standard-library modules (code repeats its names, which prompt lookup finds)."""
    import csv
    import json as json_module
    import textwrap

    texts = []
    for module in (textwrap, csv, json_module.encoder):
        source = Path(module.__file__).read_bytes()
        start = source.find(b"\ndef ") + 1
        texts.append(list(source[start:start + length]))
    return texts[:count]


def pass_costs(model, prompt: list[int], k: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one cached pass of ``model`` over 1 token and over k + 1 tokens."""
    from formerkit.nn.cache import KVCache

    cache = KVCache.for_model(model, 1, len(prompt) + k + 1, rolling=False)
    times: dict[int, list[float]] = {1: [], k + 1: []}
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache)
        for _ in range(repeats):
            for size in times:
                begin = time.perf_counter()
                model(torch.tensor([prompt[:size]]), cache=cache, logits_to_keep=size)
                times[size].append(time.perf_counter() - begin)
                cache.truncate(len(prompt))
    return statistics.median(times[1]), statistics.median(times[k + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="bench-speculative", help="where the trained runs are kept")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the target")
    parser.add_argument("--draft-steps", type=int, default=300, help="distillation steps of the draft")
    parser.add_argument("--target", default=None, help="a language-model run (instead of training one)")
    parser.add_argument("--draft", default=None, help="a smaller run with the same tokenizer (with --target)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=120, help="prompt length in bytes")
    parser.add_argument("--draft-tokens", type=int, default=3, help="k of the draft model")
    parser.add_argument("--ngram-tokens", type=int, default=8, help="k of prompt lookup")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from formerkit.generation.speculative import ModelDraft, NGramDraft, SpeculativeStats
    from formerkit.runs import load_draft, load_run_model

    if args.target:
        target_dir, draft_dir = Path(args.target), Path(args.draft) if args.draft else None
    else:
        target_dir, draft_dir = trained_runs(Path(args.work), args.steps, args.draft_steps)
    model = load_run_model(target_dir)[0].eval()
    contenders: dict[str, object] = {"alone": None}
    if draft_dir is not None:
        draft = load_draft(target_dir, draft_dir, num_tokens=args.draft_tokens)
        contenders[f"draft model (k={args.draft_tokens})"] = draft
    contenders[f"ngram (k={args.ngram_tokens})"] = NGramDraft(num_tokens=args.ngram_tokens)
    texts = prompts(3, args.prompt)

    def run(draft, stats=None) -> list[torch.Tensor]:
        return [model.generate(torch.tensor([text]), args.new_tokens, temperature=0, draft=draft, draft_stats=stats)
                for text in texts]

    stats = {name: SpeculativeStats() for name in contenders if contenders[name] is not None}
    reference = run(None)
    for name, draft in contenders.items():
        if draft is not None and not all(torch.equal(a, b) for a, b in zip(run(draft, stats[name]), reference)):
            raise SystemExit(f"{name}: generated different tokens from the target alone")
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, draft in contenders.items():
            begin = time.perf_counter()
            run(draft)
            rates[name].append(len(texts) * args.new_tokens / (time.perf_counter() - begin))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    one, several = pass_costs(model, texts[0], args.draft_tokens, 20)
    draft_sizes = ""
    if draft_dir is not None:
        draft_model = next(d for d in contenders.values() if isinstance(d, ModelDraft)).model
        draft_sizes = f", draft {sum(p.numel() for p in draft_model.parameters()):,} parameters"
    print(f"batch 1, {len(texts)} prompts of {args.prompt} bytes of stdlib source, {args.new_tokens} greedy tokens "
          f"each, {torch.get_num_threads()} threads, torch {torch.__version__}; target "
          f"{sum(p.numel() for p in model.parameters()):,} parameters{draft_sizes}; identical tokens: yes")
    print(f"one cached pass of the target: {one * 1e3:.2f} ms over 1 token, {several * 1e3:.2f} ms over "
          f"{args.draft_tokens + 1} tokens ({several / one:.2f}x)")
    base = medians["alone"]
    results = {}
    for name, rate in medians.items():
        line = f"  {name:<22} {rate:8.1f} tokens/s  {rate / base:5.2f}x"
        results[name] = {"tokens_per_s": rate, "speedup": rate / base}
        if name in stats:
            counts = stats[name]
            line += (f"   {counts.tokens_per_round:.2f} tokens per pass, {counts.acceptance_rate:.0%} of "
                     f"{counts.proposed} guesses kept")
            results[name].update(tokens_per_pass=counts.tokens_per_round, acceptance_rate=counts.acceptance_rate)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
