"""Batch-1 greedy decoding speed: formerkit against Hugging Face ``generate`` on the same architecture and weights.

The model is the nanoGPT shakespeare-char-sized decoder (6 layers, 6 heads, width 384, context 256, vocabulary 65).
A random-weight transformers GPT-2 of that size is saved to a temporary directory and read into formerkit with
``formerkit.from_hf``, so both sides run identical weights; the script first checks that they generate the same
tokens. Then it alternates the contenders ``--repeats`` times and reports the median tokens per second of each.

    python benchmarks/decode_speed.py [--new-tokens 200] [--prompt 8] [--repeats 7] [--threads N] [--no-compile]

Needs the ``dev`` extra (transformers). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=8, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import formerkit

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=65,
                                     bos_token_id=None, eos_token_id=None)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = formerkit.from_hf(directory)
    prompt = torch.randint(0, 65, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    count = args.new_tokens

    def hf() -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(prompt, max_new_tokens=count, do_sample=False, pad_token_id=0)

    def eager() -> torch.Tensor:
        return ours.generate(prompt, count, temperature=0)

    def compiled() -> torch.Tensor:
        return ours.generate(prompt, count, temperature=0, compile=True)

    contenders = {"transformers": hf, "formerkit": eager}
    if not args.no_compile:
        contenders["formerkit compile=True"] = compiled
    start = time.perf_counter()
    outputs = {name: run() for name, run in contenders.items()}  # warm-up (and the compile)
    warmup = time.perf_counter() - start
    reference = outputs["transformers"]
    for name, output in outputs.items():
        if not torch.equal(output, reference):
            raise SystemExit(f"{name} generated different tokens from transformers")
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            begin = time.perf_counter()
            run()
            rates[name].append(count / (time.perf_counter() - begin))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    floor = _weight_streaming_floor(ours)
    base = medians["transformers"]
    print(f"batch 1, {args.prompt}-token prompt, {count} greedy tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; identical tokens: yes; "
          f"warm-up incl. compile {warmup:.1f} s")
    for name, value in medians.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:24s} {value:7.1f} tokens/s (median of {args.repeats}; range {spread})  "
              f"x{value / base:.2f} vs transformers")
    print(f"  floor: the {floor['matrices']} weight matrices ({floor['megabytes']:.1f} MB) multiplied back to back, "
          f"nothing else: {floor['ms']:.3f} ms per token = at most {1000 / floor['ms']:.0f} tokens/s "
          f"(x{1000 / floor['ms'] / base:.2f} vs transformers)")
    print(json.dumps({"tokens_per_second": medians, "ratio_vs_transformers": {k: v / base for k, v in medians.items()},
                      "weight_streaming_floor_ms": floor["ms"]}))


def _weight_streaming_floor(model) -> dict[str, float]:
    """Every decoded token multiplies one vector by each weight matrix of the model once. Timing just those products,
    back to back (best of several rounds), gives a floor no decoder of these weights can beat at batch 1."""
    matrices = [module.weight.detach() for module in model.modules() if isinstance(module, torch.nn.Linear)]
    vectors = {matrix.shape[1]: torch.randn(1, matrix.shape[1]) for matrix in matrices}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(10):
            begin = time.perf_counter()
            for _ in range(20):
                for matrix in matrices:
                    torch.nn.functional.linear(vectors[matrix.shape[1]], matrix)
            best = min(best, (time.perf_counter() - begin) / 20)
    return {"ms": best * 1000, "matrices": len(matrices),
            "megabytes": sum(matrix.numel() * matrix.element_size() for matrix in matrices) / 1e6}


if __name__ == "__main__":
    main()
