"""``formerkit recipes``: the listing, one recipe's YAML to copy, and the key reference generated from the schema."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import formerkit
from formerkit.cli import main
from formerkit.config import ModelConfig
from formerkit.schema import is_section
from formerkit.train import list_recipes, load_recipe
from formerkit.train.catalog import REGENERATE, keys_reference
from formerkit.train.config import TrainConfig

RECIPES = Path(formerkit.__file__).parent / "recipes"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipe-keys.md"


def test_recipes_lists_every_shipped_recipe_on_one_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(path.stem for path in RECIPES.glob("*.yaml"))
    assert list_recipes() == names
    width = max(map(len, names))
    for line, name in zip(lines, names):
        recipe = load_recipe(name)
        assert line == f"{name:<{width}}  {recipe.objective.kind} on {recipe.data.source}: {recipe.description}"
    assert lines[len(names)] == ""
    assert "formerkit recipes NAME > my.yaml" in lines[len(names) + 1]


@pytest.mark.parametrize("name", sorted(path.stem for path in RECIPES.glob("*.yaml")))
def test_recipes_name_prints_the_shipped_file_exactly(name, capsys, tmp_path):
    assert main(["recipes", name]) == 0
    printed = capsys.readouterr().out
    assert printed == (RECIPES / f"{name}.yaml").read_text()
    copy = tmp_path / "my.yaml"
    copy.write_text(printed)
    assert load_recipe(copy) == load_recipe(name)


def test_an_unknown_recipe_name_lists_the_recipes_and_suggests_the_closest(capsys):
    assert main(["recipes", "vit-digit"]) == 2
    error = capsys.readouterr().err
    assert "got 'vit-digit'" in error
    assert "did you mean 'vit-digits'?" in error
    assert "a recipe name (" + ", ".join(list_recipes()) + ")" in error
    assert main(["recipes", "char-lm", "--keys"]) == 2
    assert "not both" in capsys.readouterr().err


def _keys(cls, prefix=""):
    """Every leaf key of a config class, dotted."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name.rstrip("_"))  # model.from is the field from_
    return keys


def test_the_key_reference_has_one_row_for_every_recipe_key_and_every_model_key(capsys):
    assert main(["recipes", "--keys"]) == 0
    text = capsys.readouterr().out
    assert text == keys_reference()
    rows = [line.split(" | ")[0].removeprefix("| `").removesuffix("`") for line in text.splitlines()
            if line.startswith("| `")]
    assert sorted(rows) == sorted(_keys(TrainConfig) + _keys(ModelConfig))
    lines = text.splitlines()
    assert ("| `data.tokenizer` | one of 'byte', 'char', 'bpe' | `byte` | text sources: byte, char or bpe (trained on "
            "the training split with the `tokenizers` library) |") in lines
    assert ("| `data.path` | a string or null | `null` | text, jsonl, instruct, image_folder, csv: a file or folder "
            "of the user's |") in lines
    assert "| `optim.betas` | a list of 2 values | `[0.9, 0.999]` | AdamW's moment decays and its epsilon |" in lines
    assert ("| `attention.num_kv_heads` | an integer or null | `null` | Grouped-query attention (Ainslie et al., "
            "2023): key/value heads shared by groups of query heads; 1 is multi-query. |") in lines


def test_docs_recipe_keys_is_the_generated_reference():
    assert DOCS.read_text() == keys_reference(), (
        f"docs/recipe-keys.md is out of date with the recipe schema; regenerate it with: {REGENERATE}")


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readmes_own_data_section_copies_shipped_recipes_and_sets_keys_they_accept():
    from formerkit.schema import load_yaml

    text = README.read_text()
    start = text.index("## Your own data")
    section = text[start:text.index("\n## ", start)]
    recipe, checked = None, []
    pair = r"--set\s+'?([\w.]+)=([^\s`']+)'?\s*"
    for match in re.finditer(rf"formerkit recipes ([\w-]+) >|((?:{pair})+)", section):
        if match.group(1):
            recipe = match.group(1)
            assert recipe in list_recipes()
            continue
        # The keys set together exist in the recipe the section last copied, and their values are ones it accepts
        # (model keys included); "--set section.key=value" is the form itself.
        overrides = {key: load_yaml(value) for key, value in re.findall(pair, match.group(2)) if key != "section.key"}
        load_recipe(recipe).with_overrides(overrides).model.resolve()
        checked += overrides
    assert {"data.path", "data.text_field", "data.image_size", "model.stem.conv_layers", "data.columns",
            "data.tokenizer", "data.vocab_size", "data.label_field"} <= set(checked)
    for name in ("text-folder", "jsonl-lm", "jsonl-classify", "image-folder", "csv-forecast"):
        assert f"formerkit recipes {name} >" in section
