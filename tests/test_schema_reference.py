"""The field reference the schema gives (``field_infos``): types, defaults, choices and the comment above each field."""

from __future__ import annotations

from dataclasses import dataclass, field

from formerkit.schema import ConfigSection, choice, describe_type, field_infos


@dataclass(frozen=True)
class Inner(ConfigSection):
    _prefix = "inner"

    size: int = 3


@dataclass(frozen=True)
class Example(ConfigSection):
    """An example section."""

    _prefix = "example"

    # The mode, in two
    # comment lines.
    mode: str = choice("a", ("a", "b", None))
    # conv
    layers: int = 1
    kernel: int = 3

    plain: bool = True
    # Mixture: `experts` and `per_token` together.
    experts: int | None = None
    per_token: int = 2
    other: float = 0.5
    names: tuple[str, ...] | None = None
    inner: Inner = field(default_factory=Inner)

    def _validate(self) -> None:
        # a comment inside a method documents nothing
        size: int = 1  # noqa: F841


def test_field_infos_read_the_comment_above_each_field_and_share_headings_and_blocks_that_name_a_field():
    infos = {info.name: info for info in field_infos(Example)}
    assert list(infos) == ["mode", "layers", "kernel", "plain", "experts", "per_token", "other", "names", "inner"]
    assert infos["mode"].doc == "The mode, in two comment lines."
    assert infos["mode"].accepts == "one of 'a', 'b', null"
    assert infos["mode"].choices == ("a", "b", None)
    # A one-line heading without a final period covers the fields below it until a blank line.
    assert (infos["layers"].doc, infos["kernel"].doc, infos["plain"].doc) == ("conv", "conv", "")
    # A block that names a later field documents it too; one that does not, not.
    assert infos["per_token"].doc == "Mixture: `experts` and `per_token` together."
    assert infos["other"].doc == ""
    assert (infos["names"].accepts, infos["names"].default) == ("a list of strings or null", None)
    assert (infos["inner"].section, infos["inner"].default) == (Inner, {"size": 3})
    assert (infos["experts"].accepts, infos["plain"].accepts) == ("an integer or null", "true or false")


def test_describe_type_uses_the_words_of_the_error_messages():
    assert describe_type(tuple[int, ...]) == "a list of integers"
    assert describe_type(tuple[float, float]) == "a list of 2 values"
    assert describe_type(dict[str, int] | None) == "a mapping of keys to values or null"
    assert describe_type(str, ("x", "y")) == "one of 'x', 'y'"
