"""Validated, frozen config dataclasses: the machinery behind ``ModelConfig`` and the training recipes.

A config is a tree of ``ConfigSection`` dataclasses. Every field is checked against its annotation (and, for
``choice`` fields, against its allowed values) when a section is constructed, so a bad value fails where it is written,
with an error that names the field, the value given and what is allowed; an unknown key gets a "did you mean". Sections
round-trip through plain dicts, JSON and YAML, and ``replace`` derives a new config from dotted or unambiguous keys.
Kept apart from any one config so that model and training configs share one set of rules and error messages.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from formerkit.errors import ConfigError, UnknownFieldError

__all__ = ["ConfigSection", "FieldInfo", "choice", "describe_type", "field_infos", "is_section", "load_yaml"]


def choice(default: Any, choices: tuple[Any, ...]) -> Any:
    """A dataclass field whose value must be one of ``choices``; a near miss gets a "did you mean"."""
    return field(default=default, metadata={"choices": choices})


def load_yaml(text: str) -> Any:
    """YAML as configs read it: PyYAML's safe loader, except that numbers such as ``1e-3`` (an exponent without a
    decimal point) are numbers, as in YAML 1.2 and JSON, not the strings YAML 1.1 makes of them."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
_S = typing.TypeVar("_S", bound="ConfigSection")


def is_section(annotation: Any) -> bool:
    """Whether a field's annotation is a nested section (built from a dict of its own fields)."""
    return isinstance(annotation, type) and issubclass(annotation, ConfigSection)


class ConfigSection:
    """Behaviour shared by every config dataclass (subclasses are frozen dataclasses): type checks on construction,
    dict and file round trips, and ``replace``. Subclasses set ``_prefix`` and ``_aliases`` and override
    ``_validate`` for checks that involve more than one field, reporting them with ``_fail``."""

    def __new__(cls, *args: Any, **kwargs: Any):
        # An unknown keyword gets the same "did you mean" error as an unknown key in a dict, not a bare TypeError.
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
                prefix = f"{cls._prefix}." if cls._prefix else ""
                raise UnknownFieldError(prefix + key, names, prefix + close[0] if close else None)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(self._path(f.name), getattr(self, f.name), hints[f.name], f.metadata.get("choices"),
                            self._aliases)
            object.__setattr__(self, f.name, value)
        self._validate()

    # A section's prefix in error messages ("attention.num_heads"); ModelConfig has none.
    _prefix = ""
    # Other libraries' names for this section's choices -> ours ("rotary" -> "rope"), for the "did you mean".
    _aliases: typing.ClassVar[dict[Any, Any]] = {}

    def _path(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def _validate(self) -> None:
        """Checks that involve more than one field; sections override it."""

    def _fail(self, name: str, expected: str, hint: str = "") -> typing.NoReturn:
        raise ConfigError(self._path(name), getattr(self, name), expected, hint=hint)

    def _check_applies(self, selector: str, applies: dict[str, tuple[Any, ...]]) -> None:
        """Fields that apply only to some values of the field ``selector`` (``applies``: field -> those values) keep
        their defaults under the other values: a value set where it would do nothing is an error, not ignored."""
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else None
                    for f in dataclasses.fields(self)}
        kind = getattr(self, selector)
        for name, kinds in applies.items():
            if kind not in kinds and getattr(self, name) != defaults[name]:
                self._fail(name, f"its default ({defaults[name]!r}) with {self._path(selector)}={kind!r}",
                           hint=f"{self._path(name)} applies only to {self._path(selector)} in {kinds}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Builds the section from a (possibly partial) dict; missing fields take their defaults."""
        if isinstance(data, cls):
            return data
        prefix = cls._prefix
        if not isinstance(data, dict):
            raise ConfigError(prefix or "config", data, f"a dict of {cls.__name__} fields")
        names = [f.name for f in dataclasses.fields(cls)]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                full = f"{prefix}.{key}" if prefix else str(key)
                suggestion = (f"{prefix}.{close[0]}" if prefix else close[0]) if close else None
                raise UnknownFieldError(full, names, suggestion)
            if is_section(hints[key]):
                value = hints[key].from_dict(value if value is not None else {})
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples) that ``from_dict`` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigSection):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self: _S, **overrides: Any) -> _S:
        """A new config with some values changed.

        Keys may be top-level fields (in a ModelConfig: ``width=256``), whole sections as dicts
        (``attention={"num_heads": 4}``, merged into the current section), dotted paths
        (``**{"attention.num_heads": 4}``) or a field name that exists in exactly one section (``num_classes=10``,
        ``vocab_size=50257``).
        """
        data = self.to_dict()
        for key, value in overrides.items():
            path = _resolve_key(type(self), key)
            target = data
            for part in path[:-1]:
                target = target[part]
            leaf = path[-1]
            if isinstance(value, dict) and isinstance(target.get(leaf), dict):
                merged = dict(target[leaf])
                merged.update(value)
                value = merged
            elif isinstance(value, ConfigSection):
                value = value.to_dict()
            target[leaf] = value
        return type(self).from_dict(data)

    # ----- files -----

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; with ``path``, also written there."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; with ``path``, also written there."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_file(cls: type[_S], path: str | Path) -> _S:
        """Reads a config from a .json, .yaml or .yml file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("path", str(path), "an existing .json, .yaml or .yml file")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = load_yaml(text)
            else:
                raise ConfigError("path", str(path), "a file ending in .json, .yaml or .yml")
        except (json.JSONDecodeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError("path", str(path), "a valid JSON or YAML document", hint=str(error)) from error
        return cls.from_dict(data)



def _coerce(path: str, value: Any, annotation: Any, choices: tuple[Any, ...] | None,
            aliases: dict[Any, Any]) -> Any:
    """Checks ``value`` against a field's annotation; returns it in canonical form (float, tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(path, value, _describe(annotation, choices))
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(path, value, option, choices, aliases)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(path, value, _describe(annotation, choices))
    if is_section(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return annotation.from_dict(value)
        raise ConfigError(path, value, f"a {annotation.__name__} or a dict of its fields")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
    elif origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, _describe(annotation, choices))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", v, args[0], None, aliases) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(path, value, _describe(annotation, choices))
        return tuple(_coerce(f"{path}[{i}]", v, a, None, aliases) for i, (v, a) in enumerate(zip(value, args)))
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "a mapping of keys to values")
        return value
    else:  # pragma: no cover - a field type this module does not know is a bug here, not bad input
        raise TypeError(f"{path}: unsupported annotation {annotation!r}")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        if value in aliases and aliases[value] in choices:
            close = [aliases[value]]
        hint = f"did you mean {close[0]!r}?" if close else ""
        raise ConfigError(path, value, "one of " + ", ".join(repr(c) for c in choices), hint=hint)
    return value


def describe_type(annotation: Any, choices: tuple[Any, ...] | None = None) -> str:
    """What a field accepts, in the words of the error messages: "an integer or null", "one of 'a', 'b'"."""
    return _describe(annotation, choices)


def _describe(annotation: Any, choices: tuple[Any, ...] | None) -> str:
    if choices:
        return "one of " + ", ".join("null" if c is None else repr(c) for c in choices)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, None) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
            return f"a list of {plural.get(args[0], _describe(args[0], None))}"
        return f"a list of {len(args)} values"
    if origin is dict:
        return "a mapping of keys to values"
    return names.get(annotation, str(annotation))


def _section_fields(cls: type[ConfigSection]) -> dict[str, list[str]]:
    hints = typing.get_type_hints(cls)
    return {f.name: [g.name for g in dataclasses.fields(hints[f.name])]
            for f in dataclasses.fields(cls) if is_section(hints[f.name])}


def _resolve_key(cls: type[ConfigSection], key: str) -> list[str]:
    """Maps an override key to its path in the dict of a ``cls`` config; see ``ConfigSection.replace``."""
    top = [f.name for f in dataclasses.fields(cls)]
    sections = _section_fields(cls)
    if "." in key:
        section, _, name = key.partition(".")
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1, cutoff=0.5)
            raise UnknownFieldError(key, list(sections), close[0] if close else None)
        if name not in sections[section] or "." in name:
            close = difflib.get_close_matches(name, sections[section], n=1, cutoff=0.5)
            raise UnknownFieldError(key, sections[section], f"{section}.{close[0]}" if close else None)
        return [section, name]
    if key in top:
        return [key]
    owners = [section for section, names in sections.items() if key in names]
    if len(owners) == 1:
        return [owners[0], key]
    if len(owners) > 1:
        raise ConfigError(key, key, "a dotted path naming the section",
                          hint="this field exists in " + ", ".join(f"{o}.{key}" for o in owners))
    every = top + [f"{s}.{n}" for s, names in sections.items() for n in names]
    close = difflib.get_close_matches(key, every + [n for names in sections.values() for n in names], n=1, cutoff=0.6)
    suggestion = close[0] if close else None
    if suggestion and suggestion not in every:
        suggestion = next(f"{s}.{suggestion}" for s, names in sections.items() if suggestion in names)
    raise UnknownFieldError(key, top, suggestion)


# ----- the reference: every field with its type, default and the comment above it -----


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a section, for a reference: ``section`` is set when the field is a nested section."""

    name: str
    accepts: str
    default: Any
    choices: tuple[Any, ...] | None
    doc: str
    section: type[ConfigSection] | None


def field_infos(cls: type[ConfigSection]) -> list[FieldInfo]:
    """The fields of ``cls`` in order, each documented by the comment block written above it in the class body.

    A field without a comment of its own shares the block above the field before it when that block names it
    (``experts_per_token``) or is a heading (one line without a final period: ``# conv``, ``# csv: window length,
    horizon, columns``), as long as no blank line comes between.
    """
    hints = typing.get_type_hints(cls)
    docs = _field_comments(cls)
    infos = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, ConfigSection):
            default = default.to_dict()
        elif isinstance(default, tuple):
            default = list(default)
        choices = f.metadata.get("choices")
        section = hints[f.name] if is_section(hints[f.name]) else None
        infos.append(FieldInfo(f.name, _describe(hints[f.name], choices), default, choices, docs.get(f.name, ""),
                               section))
    return infos


def _field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment block above it (joined into one line)} from the class body's source."""
    import inspect
    import textwrap

    names = {f.name for f in dataclasses.fields(cls)}
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    docs: dict[str, str] = {}
    block: list[str] = []  # the comment lines just read
    shared: tuple[str, bool] | None = None  # (the last block, whether it is a heading) for uncommented fields below
    for line in lines[1:]:
        text = line.strip()
        if not text:
            block, shared = [], None
        elif not line.startswith("    ") or line.startswith("     "):
            continue  # not a line of the class body itself (a method's body, a continuation line)
        elif text.startswith("#"):
            block.append(text.lstrip("#").strip())
        else:
            name = re.match(r"(\w+)\s*:", text)
            if name and name.group(1) in names:
                if block:
                    doc = " ".join(block)
                    shared = (doc, len(block) == 1 and not doc.endswith("."))
                    docs[name.group(1)] = doc
                elif shared and (shared[1] or re.search(rf"\b{name.group(1)}\b", shared[0])):
                    docs[name.group(1)] = shared[0]
                else:
                    shared = None
            block = []
    return docs
