"""The ``formerkit`` command's help (every option shows its default) and its shared argument types."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "Parser", "int_list"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, "(default: X)", unless the help already names it or there is
    nothing to show (None: the option is off or derived, as its help says; a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if not _shows_default(action) or "default" in text:
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
        return f"{text} (default: {default.replace('%', '%%')})".lstrip()


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return (bool(action.option_strings) and default is not None and default is not False
            and default != argparse.SUPPRESS and default not in ("", []))


class Parser(argparse.ArgumentParser):
    """Every command's parser shows the defaults (HelpFormatter), also of options given no help text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        if not action.help and _shows_default(action):
            action.help = "(default: %(default)s)"  # argparse prints no help line for an option without help
        return super()._add_action(action)


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers (``--seq-lens 1024,4096``), as argparse types take it."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1024,4096, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values
