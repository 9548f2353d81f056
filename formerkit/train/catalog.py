"""What ``formerkit recipes`` prints: the shipped recipes one line each, one recipe's YAML to copy, and the reference
of every recipe key.

The key reference is generated from the schema (``TrainConfig``'s sections and, for the model, ``ModelConfig``'s),
each key with what it accepts, its default and the comment written above the field, so it cannot drift from the code.
``docs/recipe-keys.md`` is this reference; a test regenerates it and fails when the committed file differs.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from formerkit.config import ModelConfig
from formerkit.schema import ConfigSection, FieldInfo, field_infos
from formerkit.train.config import TrainConfig, list_recipes, load_recipe, shipped_recipe

__all__ = ["keys_reference", "recipe_listing", "recipe_text"]

# How to rewrite docs/recipe-keys.md (the test that compares it names this command).
REGENERATE = "formerkit recipes --keys > docs/recipe-keys.md"


def recipe_listing() -> str:
    """The shipped recipes, one line each (name, objective on data source, description), then what to do next."""
    recipes = [load_recipe(name) for name in list_recipes()]
    width = max(len(recipe.name) for recipe in recipes)
    lines = [f"{recipe.name:<{width}}  {recipe.objective.kind} on {recipe.data.source}: {recipe.description}"
             for recipe in recipes]
    return "\n".join([*lines, "", "formerkit recipes NAME > my.yaml   copy a recipe to edit (then: formerkit train "
                      "my.yaml --out runs/mine)", "formerkit recipes --keys           every key a recipe may set", ""])


def recipe_text(name: str) -> str:
    """The shipped recipe ``name`` exactly as the file reads (comments included), to copy and edit."""
    return shipped_recipe(name).read_text()


def keys_reference() -> str:
    """Every recipe key as Markdown: one table per section (key, what it accepts, default, description)."""
    out = [
        "# Recipe keys",
        "",
        f"Generated from the schema by `{REGENERATE}`; do not edit by hand. A recipe is a YAML file of these "
        "sections; every key is optional (the default applies) and checked when the recipe loads. Start from a shipped "
        "recipe (`formerkit recipes`, then `formerkit recipes NAME > my.yaml`) and override any key on the command "
        "line with `--set section.key=value`.",
        "",
    ]
    top = [info for info in field_infos(TrainConfig) if info.section is None]
    out += _table("Top level", "", top, prefix="")
    for info in field_infos(TrainConfig):
        if info.section is not None:
            out += _table(f"`{info.name}`", _doc(info.section), field_infos(info.section), prefix=f"{info.name}.")
    out += [
        "## Model keys",
        "",
        "The fields of the model config (`formerkit.config.ModelConfig`). With `model.preset`, set them under "
        "`model.overrides` (dotted keys: `attention.num_heads: 4`) or with `--set model.KEY=VALUE`; with "
        "`model.config`, write the whole model (nested sections: `attention: {num_heads: 4}`). The data sets "
        "the ones it decides (stem.vocab_size, stem.image_size, stem.in_channels, head.num_classes, stem.input_dim, "
        "head.output_dim, max_seq_len) unless the recipe overrides them.",
        "",
    ]
    out += _table("Model: top level", _doc(ModelConfig), [i for i in field_infos(ModelConfig) if i.section is None],
                  prefix="")
    for info in field_infos(ModelConfig):
        if info.section is not None:
            out += _table(f"Model: `{info.name}`", _doc(info.section), field_infos(info.section),
                          prefix=f"{info.name}.")
    return "\n".join(out)


def _doc(cls: type[ConfigSection]) -> str:
    """A section's own docstring on one line ("" for none: dataclass writes its signature as the docstring)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(inspect.cleandoc(doc).split())


def _table(title: str, doc: str, infos: list[FieldInfo], *, prefix: str) -> list[str]:
    lines = [f"## {title}", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| key | accepts | default | description |", "|---|---|---|---|"]
    for info in infos:
        # (rstrip: the recipe key model.from is the field from_, "from" being a Python keyword)
        cells = [f"`{prefix}{info.name.rstrip('_')}`", _cell(info.accepts), f"`{_default(info.default)}`",
                 _cell(info.doc)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _default(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) or not value else value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
