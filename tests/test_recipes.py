"""Every shipped recipe parses and validates against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_ft.recipe.load import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.toml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"scientsbank_lora.toml", "scientsbank_full.toml", "mnli_lora.toml", "sst2_lora.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.train
    assert recipe.source == str(path)
