"""The ``formerkit bench`` commands (attention, samples, lm, vision, lora, dit, recipes): argument parsing and
printing around ``formerkit.bench``'s measurements, kept out of ``formerkit.cli`` so that stays a short list of
commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from formerkit.bench.common import PRECISIONS, machine_description
from formerkit.bench.dit import LIBRARIES as DIT_LIBRARIES
from formerkit.bench.lm import LIBRARIES as LM_LIBRARIES
from formerkit.bench.lora import LIBRARIES as LORA_LIBRARIES
from formerkit.bench.recipes import LIBRARIES as RECIPE_LIBRARIES
from formerkit.bench.recipes import TARGETS as RECIPE_TARGETS
from formerkit.bench.vision import LIBRARIES as VISION_LIBRARIES
from formerkit.help_format import int_list

__all__ = ["add_bench_commands"]


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from formerkit.bench.attention import attention_benchmark, format_table, plot

    records = attention_benchmark(args.seq_lens, kinds=args.kinds, window=args.window, heads=args.heads,
                                  head_dim=args.head_dim, repeats=args.repeats,
                                  dtype=getattr(torch, args.dtype), memory=not args.no_memory,
                                  progress=lambda text: print(f"measuring {text}...", file=sys.stderr, flush=True))
    print(f"One attention layer ({args.heads} heads x {args.head_dim}, batch 1, {args.dtype}, causal, window "
          f"{args.window}), {torch.get_num_threads()} threads; median of {args.repeats} runs.\n")
    print(format_table(records))
    plot(records, args.plot)
    print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(record) + "\n" for record in records))
        print(f"records: {args.json}")
    return 0


def _bench_peers(args: argparse.Namespace, kind: str) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = (lambda text: print(f"measuring {text}...", file=sys.stderr, flush=True)) if not args.quiet else None
    if kind == "lm":
        from formerkit.bench.lm import LMSpec, format_lm, lm_benchmark

        spec = LMSpec(layers=args.layers, heads=args.heads, width=args.width, context=args.context,
                      vocab=args.vocab, batch=args.batch, new_tokens=args.new_tokens)
        records, notes = lm_benchmark(spec, libraries=args.libraries, precisions=args.precisions,
                                      rounds=args.rounds, decode=not args.no_decode, memory=not args.no_memory,
                                      progress=progress)
        table = format_lm(records)
    elif kind == "lora":
        from formerkit.bench.lora import LoRASpec, format_lora, lora_benchmark

        spec = LoRASpec(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, width=args.width,
                        hidden=args.hidden, context=args.context, vocab=args.vocab, batch=args.batch,
                        rank=args.rank, alpha=args.alpha, targets=tuple(args.targets))
        records, notes = lora_benchmark(spec, libraries=args.libraries, rounds=args.rounds,
                                        memory=not args.no_memory, progress=progress)
        table = format_lora(records)
    elif kind == "dit":
        from formerkit.bench.dit import DiTSpec, dit_benchmark, format_dit

        spec = DiTSpec(image=args.image, channels=args.channels, patch=args.patch, width=args.width,
                       depth=args.depth, heads=args.heads, classes=args.classes, batch=args.batch)
        records, notes = dit_benchmark(spec, libraries=args.libraries, rounds=args.rounds, memory=not args.no_memory,
                                       progress=progress)
        table = format_dit(records)
    else:
        from formerkit.bench.vision import format_vision, vision_benchmark

        records, notes = vision_benchmark(libraries=args.libraries, precisions=args.precisions,
                                          rounds=args.rounds, memory=not args.no_memory, progress=progress)
        table = format_vision(records)
    text = "\n".join([f"Machine: {machine_description()}", f"Command: `{_command(kind)}`", "", table, "", *notes])
    print(text)
    _save(args, text, records)
    if args.markdown:
        print(f"\ntable: {args.markdown}")
    if args.json:
        print(f"records: {args.json}")
    return 0


def _command(kind: str) -> str:
    """The command line that ran this bench (for the table's header), or its plain form when called otherwise."""
    return "formerkit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"formerkit bench {kind}"


def _save(args: argparse.Namespace, text: str, records) -> None:
    """``--markdown PATH`` gets the printed text, ``--json PATH`` the records (indented JSON), folders made."""
    for path, content in ((args.markdown, text), (args.json, json.dumps(records, indent=1))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content + "\n")


def cmd_bench_lm(args: argparse.Namespace) -> int:
    return _bench_peers(args, "lm")


def cmd_bench_vision(args: argparse.Namespace) -> int:
    return _bench_peers(args, "vision")


def cmd_bench_lora(args: argparse.Namespace) -> int:
    return _bench_peers(args, "lora")


def cmd_bench_dit(args: argparse.Namespace) -> int:
    return _bench_peers(args, "dit")


def cmd_bench_recipes(args: argparse.Namespace) -> int:
    from formerkit.bench.recipes import format_recipes, recipes_benchmark

    overrides: dict[str, dict] = {}
    for item in args.set:
        recipe, _, assignment = item.partition(":")
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise SystemExit(f"bench recipes: --set expects RECIPE:KEY=VALUE, got {item!r}")
        overrides.setdefault(recipe, {})[key] = yaml.safe_load(value)
    progress = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.quiet else None
    records, notes = recipes_benchmark(args.recipes, libraries=args.libraries, threads=args.threads,
                                       overrides=overrides, progress=progress)
    text = "\n".join([f"Machine: {machine_description()}; load average {_load_average()}",
                      f"Command: `{_command('recipes')}`", "", format_recipes(records), "", *notes])
    print(text)
    _save(args, text, records)
    return 0


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def cmd_bench_samples(args: argparse.Namespace) -> int:
    from formerkit.bench.generation import judge_samples, load_samples

    images, labels = load_samples(args.samples)
    report = judge_samples(images, labels, args.classifier, baseline_noise=args.baseline_noise, seed=args.seed)
    text = "\n".join([f"Samples: {args.samples}; judge: the classifier run {args.classifier} (FD: Fréchet distance "
                      "of its pooled features to the real test images)", "", report.markdown()])
    print(text)
    _save(args, text, report.as_dict())
    return 0


def add_bench_commands(commands) -> None:
    """Adds ``bench attention|samples|lm|vision|lora|dit|recipes`` to the ``formerkit`` command's subparsers."""
    bench = commands.add_parser("bench", help="benchmarks (measured on this machine, printed as tables)")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    attention = benches.add_parser("attention", help="time and memory of full, sliding-window and linear attention "
                                                     "as the sequence grows")
    attention.add_argument("--seq-lens", type=int_list, default=[1024, 4096, 16384], metavar="N,N,...",
                           help="sequence lengths (default 1024,4096,16384)")
    attention.add_argument("--kinds", type=lambda text: text.split(","), default=["full", "window", "linear"],
                           metavar="KIND,...", help="full, window, linear (default: all three)")
    attention.add_argument("--window", type=int, default=256, help="the sliding window (default 256)")
    attention.add_argument("--heads", type=int, default=6)
    attention.add_argument("--head-dim", type=int, default=64)
    attention.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    attention.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    attention.add_argument("--plot", default="bench/attention.png", help="where to write the plot (PNG)")
    attention.add_argument("--json", metavar="PATH", help="also write one JSON record per measurement (JSON lines)")
    attention.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    attention.set_defaults(run=cmd_bench_attention)
    samples = benches.add_parser("samples", help="generated images judged by a classifier run: recognized fraction, "
                                                 "Fréchet distance of its features (with floor and baseline)")
    samples.add_argument("samples", help="the samples.safetensors of formerkit sample (or its folder)")
    samples.add_argument("--classifier", required=True, metavar="RUN",
                         help="an image classifier run on the real data (formerkit train cct-digits --out RUN)")
    samples.add_argument("--baseline-noise", type=float, default=2.0, metavar="STD",
                         help="the baseline's pixel noise in raw units (default 2.0 of the digits' 0-16)")
    samples.add_argument("--seed", type=int, default=0, help="the baseline's noise seed")
    samples.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    samples.add_argument("--markdown", metavar="PATH", help="also write the table (Markdown)")
    samples.set_defaults(run=cmd_bench_samples)


    def comma_list(choices):
        def parse(text: str) -> list[str]:
            items = [item for item in text.split(",") if item]
            unknown = [item for item in items if item not in choices]
            if unknown or not items:
                raise argparse.ArgumentTypeError(f"expected some of {','.join(choices)}, got {text!r}")
            return items
        return parse

    for name, libraries, help_text in (
            ("lm", LM_LIBRARIES, "a GPT-2-layout decoder against transformers, x-transformers and a nanoGPT-style "
                                 "model: training, inference and decoding speed, peak memory"),
            ("vision", VISION_LIBRARIES, "CCT-7/3x1 (32x32) and ViT-tiny (224x224) against vit-pytorch and timm: "
                                         "training and inference speed, peak memory"),
            ("lora", LORA_LIBRARIES, "LoRA fine-tuning of a LLaMA-layout decoder against transformers + peft: "
                                     "training speed, trainable parameters, peak memory"),
            ("dit", DIT_LIBRARIES, "a diffusion Transformer (adaLN-Zero) against a reference DiT written as the "
                                   "original code: training speed, peak memory")):
        peer = benches.add_parser(name, help=help_text)
        peer.add_argument("--libraries", type=comma_list(libraries), default=list(libraries),
                          metavar="LIB,...", help=f"which of {','.join(libraries)} (default: all installed)")
        if name not in ("lora", "dit"):  # LoRA and DiT are measured in fp32
            peer.add_argument("--precisions", type=comma_list(PRECISIONS), default=list(PRECISIONS),
                              metavar="P,...", help=f"which of {','.join(PRECISIONS)} (default both)")
        peer.add_argument("--rounds", type=int, default=5, help="timed rounds, contenders taking turns (median)")
        peer.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        peer.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
        peer.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
        peer.add_argument("--markdown", metavar="PATH", help="also write the machine, command and table (Markdown)")
        peer.add_argument("--quiet", action="store_true", help="no progress lines")
        if name == "lm":
            peer.add_argument("--layers", type=int, default=6)
            peer.add_argument("--heads", type=int, default=6)
            peer.add_argument("--width", type=int, default=384)
            peer.add_argument("--context", type=int, default=256)
            peer.add_argument("--vocab", type=int, default=65)
            peer.add_argument("--batch", type=int, default=8)
            peer.add_argument("--new-tokens", type=int, default=200, help="batch-1 greedy decode length")
            peer.add_argument("--no-decode", action="store_true", help="skip the decoding measurement")
        if name == "lora":
            peer.add_argument("--layers", type=int, default=4)
            peer.add_argument("--heads", type=int, default=8)
            peer.add_argument("--kv-heads", type=int, default=2)
            peer.add_argument("--width", type=int, default=512)
            peer.add_argument("--hidden", type=int, default=1376, help="the SwiGLU width")
            peer.add_argument("--context", type=int, default=256)
            peer.add_argument("--vocab", type=int, default=256)
            peer.add_argument("--batch", type=int, default=8)
            peer.add_argument("--rank", type=int, default=8)
            peer.add_argument("--alpha", type=int, default=16)
            peer.add_argument("--targets", type=lambda text: [t for t in text.split(",") if t], default=["q", "v"],
                              metavar="T,...", help="projections to adapt: q,k,v,out,gate,fc_in,fc_out")
        if name == "dit":
            peer.add_argument("--image", type=int, default=16, help="image side (default 16, a 128px latent)")
            peer.add_argument("--channels", type=int, default=4)
            peer.add_argument("--patch", type=int, default=2)
            peer.add_argument("--width", type=int, default=384)
            peer.add_argument("--depth", type=int, default=4)
            peer.add_argument("--heads", type=int, default=6)
            peer.add_argument("--classes", type=int, default=10)
            peer.add_argument("--batch", type=int, default=16)
        peer.set_defaults(run={"lm": cmd_bench_lm, "vision": cmd_bench_vision, "lora": cmd_bench_lora,
                               "dit": cmd_bench_dit}[name])
    recipes = benches.add_parser("recipes", help="training seconds until cct-digits and char-lm reach their quality "
                                                 "targets, against vit-pytorch's CCT and a nanoGPT-style model")
    recipes.add_argument("--recipes", type=comma_list(RECIPE_TARGETS), default=list(RECIPE_TARGETS),
                         metavar="R,...", help=f"which of {','.join(RECIPE_TARGETS)} (default both)")
    recipes.add_argument("--libraries", type=comma_list(RECIPE_LIBRARIES),
                         default=list(RECIPE_LIBRARIES), metavar="LIB,...",
                         help=f"which of {','.join(RECIPE_LIBRARIES)} (default all; each recipe runs its own peer)")
    recipes.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    recipes.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                         help="change a recipe for every contender (e.g. char-lm:schedule.steps=300, "
                              "cct-digits:eval.every=50)")
    recipes.add_argument("--json", metavar="PATH", help="also write the records (with curves) as a JSON list")
    recipes.add_argument("--markdown", metavar="PATH", help="also write the machine, command and table (Markdown)")
    recipes.add_argument("--quiet", action="store_true", help="no progress lines")
    recipes.set_defaults(run=cmd_bench_recipes)
