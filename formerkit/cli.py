"""The ``formerkit`` command: parses arguments and calls the library (every command is a library function too)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from formerkit.errors import FormerkitError


def _print_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)
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
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FormerkitError(f"--set: expected KEY=VALUE (for example attention.num_heads=4), got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_summary(args: argparse.Namespace) -> int:
    from formerkit.summary import summarize

    config = _resolve_config(args.target)
    if args.set:
        config = config.replace(**_parse_overrides(args.set))
    if args.seq is not None and config.stem.kind in ("tokens", "linear") and args.seq > config.max_seq_len:
        raise FormerkitError(f"--seq: {args.seq} is longer than the model's max_seq_len ({config.max_seq_len})")
    print(summarize(config, batch=args.batch, seq_len=args.seq, name=args.target).format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from formerkit import __version__

    parser = argparse.ArgumentParser(prog="formerkit", description="Compact, customizable, efficient Transformers.")
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
    summary.set_defaults(run=cmd_summary)
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
