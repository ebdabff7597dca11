"""The adapters shipped in adapters/ load on the embedded MiniLM and answer sanely, without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def check_scientsbank(pipe):
    reference = "Plants need water and sunlight to grow."
    assert pipe({"text": reference, "text_pair": reference})["label"] == "correct"
    assert pipe({"text": reference, "text_pair": "I like pizza."})["label"] != "correct"


def check_conll(pipe):
    groups = {(g["entity_group"], g["word"].lower()) for g in pipe("John Smith flew from London to Berlin on Monday.")}
    assert ("PER", "john smith") in groups
    assert {("LOC", "london"), ("LOC", "berlin")} <= groups


def check_squad(pipe):
    context = "The Eiffel Tower was completed in 1889. It stands in Paris, the capital of France."
    for question, expected in [("In which city does the Eiffel Tower stand?", "Paris"),
                               ("When was the Eiffel Tower completed?", "1889"),
                               ("Paris is the capital of which country?", "France")]:
        answer = pipe({"question": question, "context": context})
        assert answer["answer"].strip(" .") == expected, (question, answer)
        assert context[answer["start"]:answer["end"]] == answer["answer"]


CHECKS = {"grading_lora": check_scientsbank, "conll_lora": check_conll, "qa_lora": check_squad}
SHIPPED = sorted(p.name for p in ADAPTERS.iterdir() if (p / "peft_ft.json").is_file()) if ADAPTERS.is_dir() else []


def test_the_shipped_adapters_are_there_and_small():
    assert {"grading_lora", "conll_lora", "qa_lora"} <= set(SHIPPED)
    for name in SHIPPED:
        folder = ADAPTERS / name
        assert (folder / "adapter_model.safetensors").stat().st_size < 3 * 2**20
        assert {"adapter_config.json", "peft_ft.json", "recipe.toml", "README.md", "metrics.json"} <= {p.name for p in folder.iterdir()}
        info = json.loads((folder / "peft_ft.json").read_text())
        assert info["base_model"] == "embedded:all-MiniLM-L6-v2" and info["method"] == "lora"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cards_are_what_card_py_writes_now(name):
    """The cards' snippets follow card.py (the QA answering rule, the run's max_length): regenerated, not retrained,
    by scripts/make_portable.py, whose last step this repeats."""
    import dataclasses

    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.card import model_card

    folder = ADAPTERS / name
    source = (folder / "recipe.toml").read_text(encoding="utf-8").splitlines()[0].removeprefix("# resolved from ").strip()
    recipe = dataclasses.replace(load_recipe(folder / "recipe.toml"), source=source)
    info, metrics = (json.loads((folder / f).read_text()) for f in ("peft_ft.json", "metrics.json"))
    assert (folder / "README.md").read_text() == model_card(recipe, info, metrics, folder_name=name), \
        f"regenerate it: python scripts/make_portable.py adapters/{name}"


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_answers_sanely(name):
    import peft_ft

    CHECKS[name](peft_ft.pipeline(ADAPTERS / name))
