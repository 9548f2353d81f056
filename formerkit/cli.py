"""The ``formerkit`` command: parses arguments and calls the library (every command is a library function too)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from formerkit.bench.cli import add_bench_commands
from formerkit.errors import FormerkitError
from formerkit.help_format import Parser, int_list


def _print_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for index, (name, justify) in enumerate(columns):
        table.add_column(name, justify=justify, no_wrap=index == 0)  # names stay whole; descriptions wrap
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def cmd_models(args: argparse.Namespace) -> int:
    from formerkit.models.registry import get_preset, list_models
    from formerkit.summary import count_parameters

    rows = []
    for name in list_models():
        preset = get_preset(name)
        config = preset.make_config()
        count = count_parameters(config)
        rows.append([name, f"{count:,}", config.arch, preset.description])
    _print_table("formerkit presets", [("name", "left"), ("parameters", "right"), ("arch", "left"),
                                       ("description", "left")], rows)
    return 0


def _resolve_config(target: str):
    """A preset name, a saved model directory, or a .json/.yaml config file."""
    from formerkit.checkpoint import load_config
    from formerkit.config import ModelConfig
    from formerkit.models.registry import model_config

    path = Path(target)
    if path.is_dir():
        return load_config(path)
    if path.suffix in (".json", ".yaml", ".yml"):
        return ModelConfig.from_file(path)
    return model_config(target)


def _parse_overrides(pairs: list[str]) -> dict:
    from formerkit.config import load_yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FormerkitError(f"--set: expected KEY=VALUE (for example attention.num_heads=4), got {pair!r}")
        overrides[key] = load_yaml(value)
    return overrides


def cmd_summary(args: argparse.Namespace) -> int:
    from formerkit.summary import summarize

    target = Path(args.target)
    run_adapt = None
    if (target / "recipe.yaml").is_file() and (target / "model").is_dir():
        # a run: its model, and the adapters its recipe trained (adapt:), merged into that model when saved
        from formerkit.train.config import TrainConfig

        run_adapt = TrainConfig.from_file(target / "recipe.yaml").adapt
        target = target / "model"
    config = _resolve_config(str(target))
    if args.set:
        config = config.replace(**_parse_overrides(args.set))
    if args.seq is not None and config.stem.kind in ("tokens", "linear") and args.seq > config.max_seq_len:
        raise FormerkitError(f"--seq: {args.seq} is longer than the model's max_seq_len ({config.max_seq_len})")
    adapt = _parse_overrides(args.adapt) if args.adapt else run_adapt
    print(summarize(config, batch=args.batch, seq_len=args.seq, name=args.target, adapt=adapt).format())
    return 0


def _console():
    from rich.console import Console

    return Console()


def cmd_recipes(args: argparse.Namespace) -> int:
    from formerkit.train.catalog import keys_reference, recipe_listing, recipe_text

    if args.keys and args.name:
        raise FormerkitError(f"recipes: give a recipe NAME or --keys, not both (got {args.name!r} and --keys)")
    print(keys_reference() if args.keys else recipe_text(args.name) if args.name else recipe_listing(), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from formerkit.train import load_recipe, train

    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = recipe.with_overrides(_parse_overrides(args.set))
    if args.strategy:
        recipe = recipe.with_overrides({"run.strategy": args.strategy})
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    if args.nproc and args.nproc > 1:
        return _launch_torchrun(args, out)
    train(recipe, out, resume=args.resume, console=_console())
    return 0


def _launch_torchrun(args: argparse.Namespace, out: Path) -> int:
    """Re-runs this same command under torchrun with --nproc processes on this machine."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "formerkit.cli", "train", args.recipe, "--out", str(out)]
    for pair in args.set:
        command += ["--set", pair]
    if args.resume:
        command.append("--resume")
    if args.strategy:
        command += ["--strategy", args.strategy]
    child = subprocess.Popen(command)
    # Ctrl-C or SIGTERM sent to this launcher goes on to torchrun, which passes it to every worker; they
    # checkpoint at the same step and exit.
    import signal

    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _merge_counts(text: str) -> int | list[int]:
    """--merge-tokens: R, or one R per layer separated by commas."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or integers separated by commas, got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from formerkit.runs import evaluate_run

    metrics = evaluate_run(args.target, splits=args.split, merge_tokens=args.merge_tokens,
                           exit_threshold=args.exit_threshold)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from formerkit.runs import generate_run

    for piece in generate_run(args.target, args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=args.stop, compile=args.compile, draft=args.draft,
                              draft_tokens=args.draft_tokens, steps=args.steps):
        print(piece, end="", flush=True)
    print()
    return 0


_TEXT_OPTIONS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop", "draft", "draft_tokens")
_IMAGE_OPTIONS = (("label", "--class"), ("num", "--num"), ("steps", "--steps"), ("guidance", "--guidance"),
                  ("out", "--out"))


def cmd_sample(args: argparse.Namespace) -> int:
    from formerkit.sample import generates_images, sample_command

    if not generates_images(args.target):
        # A language-model run: sample was generate's other name before image generators; it still generates text.
        given = [flag for name, flag in _IMAGE_OPTIONS if getattr(args, name) is not None]
        if given:
            raise FormerkitError(f"{given[0]}: {args.target} is not an image generator; for text use formerkit "
                                 f"generate {args.target} --prompt ...")
        if args.prompt is None:
            args.prompt = ""
        return cmd_generate(args)
    given = [f"--{name.replace('_', '-')}" for name in _TEXT_OPTIONS if getattr(args, name) is not None]
    if given or args.compile:
        raise FormerkitError(f"{(given or ['--compile'])[0]}: a text option, and {args.target} draws images (use "
                             "--class, --num, --steps, --guidance, --seed, --out)")
    out = Path(args.out) if args.out is not None else Path(args.target) / "sampled"
    result = sample_command(args.target, out, label=args.label, num=64 if args.num is None else args.num,
                            steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(f"{result['count']} samples of {', '.join(result['classes'])} in {result['seconds']:.2f} s "
          f"({result['steps']} steps, guidance {result['guidance']:g}, seed {args.seed})")
    print(result["grid"])
    print(result["samples"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from formerkit.predict import predict_command

    options = {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
               if getattr(args, key) is not None}
    print(predict_command(args.target, args.inputs, json_path=args.json, out=args.out, **options))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from formerkit.inspection import inspect_run

    inspection, paths = inspect_run(args.target, text=args.text, image_index=args.image_index, out=args.out,
                                    split=args.split, top_k=args.top_k)
    if inspection.prediction is not None:
        label, probability = inspection.prediction
        print(f"predicted {label} ({probability:.1%})")
    for path in paths:
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from formerkit.train.html_report import write_report

    print(write_report(args.target, args.out, samples=args.sample_tokens))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from formerkit.serve import serve

    serve(args.target, host=args.host, port=args.port, max_batch=args.max_batch, wait_ms=args.wait_ms,
          max_body_bytes=args.max_body_mb * 2**20, batching=args.batching, max_running=args.max_running,
          max_queued=args.max_queued, draft=args.draft, draft_tokens=args.draft_tokens)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from formerkit.interop import convert

    if args.trust_pickle:
        print("formerkit convert: warning: --trust-pickle reads a pickled .bin checkpoint (with torch.load's "
              "weights_only=True); only use it on files you trust", file=sys.stderr)
    direction, source = ("from_hf", args.from_hf) if args.from_hf else ("to_hf", args.to_hf)
    result = convert(source, args.out, direction=direction, trust_pickle=args.trust_pickle,
                     model_type=args.model_type)
    tokenizer = f"{result['tokenizer']} tokenizer" if result["tokenizer"] else "no tokenizer"
    print(f"{result['source']} -> {result['out']}: {result['architecture']} ({result['family']}), "
          f"{result['parameters']:,} parameters, {tokenizer}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from formerkit.export import export_run

    path, sidecar = export_run(args.target, args.format, args.out)
    print(f"{path} ({args.format}); inputs, dynamic axes and preprocessing: {sidecar}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from formerkit.compress.distill import distill_run

    distill_run(args.teacher, args.student, args.out, overrides=_parse_overrides(args.set or []),
                temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight, mixup=args.mixup,
                resume=args.resume, console=_console())
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from formerkit.compress.prune import prune_run

    out = prune_run(args.target, args.out, heads=args.heads, ffn=args.ffn, layers=args.layers, score=args.score,
                    finetune_steps=args.finetune_steps, console=_console())
    print(f"{args.target} -> {out}; next: formerkit eval {out}  |  formerkit compare {args.target} {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from formerkit.compress.quantize import quantize_run

    out = quantize_run(args.target, args.mode, args.out)
    print(f"{args.target} -> {out} ({args.mode}); next: formerkit eval {out}  |  formerkit compare {args.target} {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from formerkit.compress.compare import compare, markdown_table, write_comparison

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = args.names.split(",") if args.names else None
    result = compare(args.targets, names=names, split=args.split, batch_sizes=tuple(args.batch_sizes),
                     repeats=args.repeats, seconds=args.seconds)
    paths = write_comparison(result, args.out)
    print(markdown_table(result), end="")
    print(f"wrote {paths['markdown']}, {paths['plot']} and {paths['json']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from formerkit.version import __version__

    parser = Parser(prog="formerkit", description="Compact, customizable, efficient Transformers.")
    parser.add_argument("--version", action="version", version=f"formerkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the presets with their parameter counts")
    models.set_defaults(run=cmd_models)

    summary = commands.add_parser("summary", help="parameters per part, FLOPs and activation memory of a model")
    summary.add_argument("target", help="a preset name, a saved model directory, or a .json/.yaml config file")
    summary.add_argument("--batch", type=int, default=1, help="batch size for FLOPs and memory (default 1)")
    summary.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    summary.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field, e.g. --set num_layers=4 --set attention.num_kv_heads=2")
    summary.add_argument("--adapt", action="append", default=[], metavar="KEY=VALUE",
                         help="count the model with adapters (formerkit.add_adapters arguments, e.g. --adapt "
                              "method=lora --adapt rank=8 --adapt targets=[q,v]): trainable vs frozen parameters and "
                              "the training memory (a run's adapt: section applies by itself)")
    summary.set_defaults(run=cmd_summary)

    recipes = commands.add_parser(
        "recipes", help="list the shipped training recipes, print one to copy (formerkit recipes NAME > my.yaml), or "
                        "every recipe key (--keys)",
        description="Without arguments, the shipped recipes one line each. With NAME, that recipe's YAML to copy and "
                    "edit: formerkit recipes text-folder > my.yaml, set data.path in it, then formerkit train my.yaml "
                    "--out runs/mine. For your own data start from text-folder, jsonl-lm, image-folder or "
                    "csv-forecast.")
    recipes.add_argument("name", nargs="?", help="print this recipe's YAML exactly as shipped, to copy and edit")
    recipes.add_argument("--keys", action="store_true",
                         help="print every recipe key with what it accepts, its default and what it does "
                              "(Markdown; the same as docs/recipe-keys.md)")
    recipes.set_defaults(run=cmd_recipes)

    train = commands.add_parser("train", help="train a recipe (a shipped name or a YAML file) into a run directory")
    train.add_argument("recipe", help="a recipe name (formerkit recipes) or a path to a recipe YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any recipe key, e.g. --set optim.lr=1e-3 --set model.num_layers=2")
    train.add_argument("--out", help="the run directory (default runs/<recipe name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--nproc", type=int, default=None, help="train with N processes on this machine (torchrun)")
    train.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                       help="with several processes: replicate (ddp, default) or shard (fsdp) the model")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="metrics of a run (or saved model) on its recipe's held-out data")
    evaluate.add_argument("target", help="a run directory or a model directory saved by a run")
    evaluate.add_argument("--split", action="append", choices=["valid", "test"], default=None,
                          help="which split(s) (default: every held-out split the data has)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    adaptive = evaluate.add_mutually_exclusive_group()
    adaptive.add_argument("--merge-tokens", type=_merge_counts, default=None, metavar="R",
                          help="classifiers: merge R tokens in every layer (ToMe token merging), or R1,R2,... "
                               "one count per layer")
    adaptive.add_argument("--exit-threshold", type=float, default=None, metavar="T",
                          help="classifiers: each sample leaves at the first layer whose softmax confidence reaches "
                               "T (early exit); also reports the mean number of layers used")
    evaluate.set_defaults(run=cmd_eval)

    generate = commands.add_parser("generate", help="generate text from a language-model run, printed as it comes")
    generate.add_argument("target", help="a run directory, a model directory saved by a run, or a checkpoint "
                                         "converted with convert --from-hf")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=None,
                          help="default 200, or a converted checkpoint's generation_config.json")
    generate.add_argument("--temperature", type=float, default=None,
                          help="0 picks the most likely token (greedy); default 0.8, or a converted checkpoint's "
                               "generation_config.json (greedy unless it samples)")
    generate.add_argument("--top-k", type=int, default=None, help="draw among the k most likely tokens only")
    generate.add_argument("--top-p", type=float, default=None,
                          help="draw among the most likely tokens holding this much probability (nucleus)")
    generate.add_argument("--stop", default=None, help="a text of one token that ends the generation")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--compile", action="store_true",
                          help="compile the decode step ahead of time with AOTInductor (torch.compile where "
                               "AOTInductor cannot): faster per token, about 30 s to start")
    generate.add_argument("--draft", default=None, metavar="RUN_OR_ngram",
                          help="speculative decoding: a smaller language-model run with the same tokenizer guesses "
                               "tokens, or 'ngram' looks them up in the text so far; the target checks them in one "
                               "pass (greedy output unchanged)")
    generate.add_argument("--draft-tokens", type=int, default=None,
                          help="tokens guessed per pass with --draft (default 3 for a run, 8 for ngram)")
    generate.add_argument("--steps", type=int, default=None,
                          help="masked diffusion LMs: unmasking steps for the whole continuation (default: one per 4 "
                               "new tokens)")
    generate.set_defaults(run=cmd_generate)

    sample = commands.add_parser("sample", help="draw images from a generative run (dit-digits, ...): a grid PNG "
                                                "and the samples as safetensors; a language-model run generates "
                                                "text as formerkit generate does")
    sample.add_argument("target", help="a run directory or a model directory saved by a run")
    sample.add_argument("--class", dest="label", type=int, default=None, metavar="ID",
                        help="the class to draw (default: every class in turn)")
    sample.add_argument("--num", type=int, default=None, help="how many images (default 64)")
    sample.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's "
                                                                "objective.sample_steps)")
    sample.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale; 1 is the conditional prediction alone (default: the "
                             "recipe's objective.guidance)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default=None, help="directory for grid.png and samples.safetensors (default: "
                                                    "RUN/sampled)")
    text = sample.add_argument_group("language-model runs (as formerkit generate)")
    for flag, kind in (("--prompt", str), ("--max-new-tokens", int), ("--temperature", float), ("--top-k", int),
                       ("--top-p", float), ("--stop", str), ("--draft", str), ("--draft-tokens", int)):
        text.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    text.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    sample.set_defaults(run=cmd_sample)

    predict = commands.add_parser("predict", help="predictions of a run for raw inputs: images (labels and "
                                                  "probabilities), prompts (generated text) or a CSV (forecasts)")
    predict.add_argument("target", help="a run directory or a model directory saved by a run")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files or folders (image classifiers), prompts (language models) or one CSV file "
                              "(forecasters), preprocessed as in training")
    predict.add_argument("--json", metavar="FILE", help="also write the answers as JSON")
    predict.add_argument("--out", metavar="FILE", help="forecasters: write the CSV with the forecast rows appended")
    predict.add_argument("--max-new-tokens", type=int, default=None, help="language models (default 200)")
    predict.add_argument("--temperature", type=float, default=None,
                         help="language models: 0 picks the most likely token (default 0.8)")
    predict.add_argument("--top-k", type=int, default=None, help="language models: the k most likely tokens only")
    predict.add_argument("--top-p", type=float, default=None, help="language models: nucleus sampling")
    predict.add_argument("--stop", default=None, help="language models: a text of one token that ends the text")
    predict.add_argument("--seed", type=int, default=None, help="language models (default 0)")
    predict.set_defaults(run=cmd_predict)

    convert = commands.add_parser("convert", help="convert a Hugging Face checkpoint directory to formerkit or back "
                                                  "(local files only)")
    which = convert.add_mutually_exclusive_group(required=True)
    which.add_argument("--from-hf", metavar="DIR", help="a Hugging Face directory (config.json + model.safetensors)")
    which.add_argument("--to-hf", metavar="DIR", help="a formerkit run directory or model directory (formerkit.save)")
    convert.add_argument("--out", required=True, help="the new directory to write")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow reading a pickled pytorch_model.bin (refused by default)")
    convert.add_argument("--model-type", metavar="TYPE", default=None,
                         help="--to-hf: the Hugging Face family to write (e.g. roberta rather than bert, opt rather "
                              "than gpt2); default: the first that holds the model")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser("export", help="export a run's model to ONNX or a torch.export program (+ a JSON "
                                                "sidecar), to run without formerkit")
    export.add_argument("target", help="a run directory or a model directory")
    export.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    export.add_argument("--out", default=None,
                        help="the file to write (default: beside the model directory, e.g. RUN/model.onnx)")
    export.set_defaults(run=cmd_export)

    distill = commands.add_parser("distill", help="train a student on a teacher run's data with the teacher's outputs "
                                                  "in the loss (knowledge distillation)")
    distill.add_argument("--teacher", required=True, help="the teacher's run directory (classification or causal LM)")
    distill.add_argument("--student", required=True, help="a recipe (name or YAML with data), a preset, or a model "
                                                          "YAML (then the teacher's recipe with that model)")
    distill.add_argument("--out", required=True, help="the student's run directory")
    distill.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a student recipe field")
    distill.add_argument("--temperature", type=float, default=2.0, help="softening of both distributions (default 2)")
    distill.add_argument("--alpha", type=float, default=0.5,
                         help="weight of the teacher's soft targets; 1 - alpha weighs the labels (default 0.5)")
    distill.add_argument("--hidden-weight", type=float, default=0.0,
                         help="weight of matching the teacher's final hidden states (default 0: off)")
    distill.add_argument("--mixup", action="store_true",
                         help="function matching: train on pairs of images mixed with a uniform weight, the teacher "
                              "labelling each mixed image (image classification)")
    distill.add_argument("--resume", action="store_true", help="continue an interrupted distillation run")
    distill.set_defaults(run=cmd_distill)

    prune = commands.add_parser("prune", help="remove attention heads, feed-forward channels and layers (smaller "
                                              "matrices, a valid config), then optionally fine-tune")
    prune.add_argument("target", help="a run directory or a model directory")
    prune.add_argument("--out", required=True, help="the model (or, with --finetune-steps, run) directory to write")
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of each layer's heads to remove, in [0, 1)")
    prune.add_argument("--ffn", type=float, default=0.0,
                       help="fraction of each layer's feed-forward channels to remove, in [0, 1)")
    prune.add_argument("--layers", type=int, default=0, help="whole layers to remove (the lowest-scoring)")
    prune.add_argument("--score", choices=["magnitude", "taylor"], default="magnitude",
                       help="weight norms, or first-order Taylor saliency on training batches")
    prune.add_argument("--finetune-steps", type=int, default=0, help="fine-tune this many steps with the run's recipe")
    prune.set_defaults(run=cmd_prune)

    quantize = commands.add_parser("quantize", help="int8 weights for a run's Linear layers (dynamic int8 through "
                                                    "torch.ao, or weight-only int8), saved as a model directory")
    quantize.add_argument("target", help="a run directory or a model directory")
    quantize.add_argument("--mode", choices=["dynamic-int8", "weight-int8"], default="dynamic-int8")
    quantize.add_argument("--out", required=True, help="the model directory to write")
    quantize.set_defaults(run=cmd_quantize)

    compare = commands.add_parser("compare", help="quality against CPU latency and size of a model's variants (a run "
                                                  "and its quantized, pruned or distilled versions), measured in one "
                                                  "run: a Markdown table, a PNG plot and JSON")
    compare.add_argument("targets", nargs="+", help="run directories or model directories (the first is the baseline)")
    compare.add_argument("--out", default="compare", help="directory for compare.md, compare.png and compare.json")
    compare.add_argument("--names", default=None, help="comma-separated names, one per target (default: directory "
                                                       "names)")
    compare.add_argument("--split", default=None, help="held-out split (default: test, else valid)")
    compare.add_argument("--batch-sizes", type=int_list, default=[1, 64],
                         help="batch sizes to time, comma-separated (default 1,64)")
    compare.add_argument("--repeats", type=int, default=None, help="timed passes per variant and batch size "
                         "(default: as many as fit in --seconds)")
    compare.add_argument("--seconds", type=float, default=10.0, help="time budget for the timing (default 10)")
    compare.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    compare.set_defaults(run=cmd_compare)

    inspect = commands.add_parser("inspect", help="attention maps (and next-token probabilities or attention "
                                                  "rollout) of one text or image, as PNGs")
    inspect.add_argument("target", help="a run directory or a model directory a run saved")
    what = inspect.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text for a language model (encoded with the run's tokenizer)")
    what.add_argument("--image-index", type=int, help="an image of the run's data (its --split) by position")
    inspect.add_argument("--split", default="test", help="the split --image-index reads (default test)")
    inspect.add_argument("--top-k", type=int, default=5, help="next tokens shown per position (default 5)")
    inspect.add_argument("--out", default=None, help="where to write the PNGs (default TARGET/inspect)")
    inspect.set_defaults(run=cmd_inspect)

    report = commands.add_parser("report", help="one self-contained HTML page about a run: summary, curves, "
                                                "confusion matrix or samples, attention maps")
    report.add_argument("target", help="a run directory")
    report.add_argument("--out", default=None, help="the HTML file (default TARGET/report.html)")
    report.add_argument("--sample-tokens", type=int, default=200, help="length of each language-model sample")
    report.set_defaults(run=cmd_report)

    serve = commands.add_parser("serve", help="serve a run over HTTP: OpenAI-compatible completions, chat, "
                                              "embeddings and image generation, generate, classify, forecast "
                                              "(needs the [serve] extra)")
    serve.add_argument("target", help="a run directory or a model directory a run saved")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=16, help="most requests in one batch (default 16)")
    serve.add_argument("--wait-ms", type=float, default=5.0,
                       help="how long a request waits for others to share its batch (default 5 ms)")
    serve.add_argument("--batching", choices=("continuous", "window"), default="continuous",
                       help="language models: admit requests between decode steps (continuous, default) or start a "
                            "batch only when the last one has ended (window, the earlier batcher)")
    serve.add_argument("--max-running", type=int, default=None,
                       help="sequences generated together (default: --max-batch)")
    serve.add_argument("--max-queued", type=int, default=64,
                       help="requests that may wait for a free sequence; more are refused with 429 (default 64)")
    serve.add_argument("--draft", default=None, metavar="RUN_OR_ngram",
                       help="language models: speculative decoding with a smaller run sharing the tokenizer, or "
                            "'ngram' (prompt lookup); sequences are then decoded one at a time (lowest latency for "
                            "one client; many clients are served better without it)")
    serve.add_argument("--draft-tokens", type=int, default=None,
                       help="tokens the draft guesses per pass of the model (default: the draft's)")
    serve.add_argument("--max-body-mb", type=int, default=8, help="largest request body accepted (default 8 MB)")
    serve.set_defaults(run=cmd_serve)

    add_bench_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch", 1) < 1 or (getattr(args, "seq", None) is not None and args.seq < 1):
        parser.error("--batch and --seq must be at least 1")
    try:
        return args.run(args)
    except FormerkitError as error:
        print(f"formerkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
