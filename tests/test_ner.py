"""The NER family: label alignment, windows, seqeval metrics, and end-to-end runs on the tiny BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from helpers import recipe_text, toy_sentences, write_conll
from peft_ft.data.files import Split
from peft_ft.data.formats.conll import read_conll
from peft_ft.errors import DataError
from peft_ft.recipe.load import build_recipe, load_recipe
from peft_ft.tasks import TASKS
from peft_ft.tasks.ner import NerData, entity_metrics, word_windows

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NER = TASKS["ner"]
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def ner_recipe(**sections) -> object:
    raw = {"task": {"type": "ner"}, "data": {"train": "train.txt"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return build_recipe(raw, "test.toml")


def tokenizer_of(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def split_of(sentences: list[tuple[list[str], list[str]]]) -> Split:
    return Split("test", "test.txt", [{"tokens": t, "tags": [LABELS.index(x) for x in g], "line": i + 1} for i, (t, g) in enumerate(sentences)])


# --- alignment and windows ----------------------------------------------------------------------


@pytest.mark.parametrize("label_all, expected", [(False, [-100, 5, -100, 0, 1, -100, -100]), (True, [-100, 5, 6, 0, 1, 2, -100])])
def test_subword_labels_in_both_modes(tiny_bert, label_all, expected):
    # "johns" -> john ##s (B-PER), "berlins" -> berlin ##s (B-LOC)
    split = split_of([(["johns", "in", "berlins"], ["B-PER", "O", "B-LOC"])])
    recipe = ner_recipe(task={"label_all_subwords": label_all})
    data = NerData({}, LABELS)
    [feature] = NER.encode(split, tokenizer_of(tiny_bert), recipe, data)
    assert feature["_word_ids"] == [None, 0, 0, 1, 2, 2, None]
    assert feature["labels"] == expected
    assert feature["length"] == len(feature["input_ids"]) == 7


def test_word_windows_respect_the_budget():
    assert word_windows([1, 2, 3, 1], 3) == [(0, 2), (2, 3), (3, 4)]
    assert word_windows([5, 1], 3) == [(0, 1), (1, 2)]  # a word longer than the budget sits alone
    assert word_windows([1, 1], 10) == [(0, 2)]


def perfect_outputs(features):
    """Outputs as `unpack` gives them, predicting each position's own label (O where unlabelled)."""
    import numpy as np

    return [(np.array([max(x, 0) for x in f["labels"]]), np.full(len(f["labels"]), 0.9, dtype="float32")) for f in features]


def test_long_sentence_is_windowed_and_every_word_predicted(tiny_bert):
    rng = random.Random(0)
    words = [rng.choice(["johns", "lives", "in", "paris", "the", "xyz"]) for _ in range(40)]
    tags = ["B-PER" if w == "johns" else "B-LOC" if w == "paris" else "O" for w in words]
    split = split_of([(words, tags), (["mary"], ["B-PER"])])
    data = NerData({}, LABELS, [])
    features = NER.encode(split, tokenizer_of(tiny_bert), ner_recipe(model={"max_length": 16}), data)
    assert all(f["length"] <= 16 for f in features)
    assert len([f for f in features if f["_example"] == 0]) > 3
    assert any("1 sentence(s) longer than model.max_length (16 tokens)" in n for n in data.notes)
    metrics, records = NER.score(split, features, perfect_outputs(features), data)
    assert [len(r["predicted"]) for r in records] == [40, 1]
    assert records[0]["predicted"] == tags
    assert metrics["f1"] == 1.0 and metrics["windowed"] == 1 and metrics["words"] == 41


def test_word_the_tokenizer_drops_still_gets_a_prediction(tiny_bert):
    split = split_of([(["john", "\u200b", "paris"], ["B-PER", "O", "B-LOC"])])
    data = NerData({}, LABELS, [])
    features = NER.encode(split, tokenizer_of(tiny_bert), ner_recipe(), data)
    assert features[0]["_word_ids"] == [None, 0, 1, 2, None]
    _, records = NER.score(split, features, perfect_outputs(features), data)
    assert records[0]["predicted"] == ["B-PER", "O", "B-LOC"]


# --- metrics ------------------------------------------------------------------------------------


def test_seqeval_metrics_on_hand_written_predictions():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O", "B-PER"]]
    predicted = [
        ["B-PER", "I-PER", "O", "O"],  # PER right, LOC missed
        ["B-ORG", "O", "O", "B-LOC"],  # ORG boundary error, PER typed as LOC
    ]
    m = entity_metrics(gold, predicted)
    # 4 gold entities, 3 predicted, 1 correct
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["LOC"]["precision"] == 0.0 and m["per_type"]["ORG"]["support"] == 1
    assert (m["entities"], m["n"], m["words"]) == (4, 2, 8)


def test_strict_mode_refuses_an_entity_opened_by_i_default_mode_counts_it():
    gold, predicted = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
    assert entity_metrics(gold, predicted, "strict")["f1"] == 0.0
    assert entity_metrics(gold, predicted, "default")["f1"] == 1.0  # conlleval reads I- after O as a start


def test_no_entities_anywhere_scores_zero_without_error():
    m = entity_metrics([["O", "O"]], [["O", "O"]])
    assert (m["f1"], m["accuracy"], m["per_type"]) == (0.0, 1.0, {})


# --- loading ------------------------------------------------------------------------------------

@pytest.fixture
def toy_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_conll(d / "train.txt", toy_sentences(48, 1))
    write_conll(d / "valid.txt", toy_sentences(12, 2))
    write_conll(d / "test.txt", toy_sentences(12, 3))
    return d


def test_load_labels_order_and_unknown_tag(toy_dir):
    recipe = ner_recipe(data={"validation": "valid.txt", "test": ["test.txt"]})
    data = NER.load(recipe, toy_dir)
    assert data.labels == LABELS
    assert list(data.splits) == ["train", "validation", "test"] and len(data.splits["test"].examples) == 12
    with (toy_dir / "test.txt").open("a") as f:
        f.write("\nbob NN O B-GPE\n")
    with pytest.raises(DataError, match=r"test\.txt: line \d+: tag 'B-GPE' never occurs in the training file"):
        NER.load(recipe, toy_dir)
    listed = ner_recipe(task={"labels": LABELS + ["B-GPE", "I-GPE"]}, data={"test": ["test.txt"]})
    assert NER.load(listed, toy_dir).labels[-2:] == ["B-GPE", "I-GPE"]


def test_load_converts_iob1_and_notes_it(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"tokens": ["john", "smith"], "tags": ["I-PER", "I-PER"]}) + "\n" + json.dumps({"tokens": [], "tags": []}) + "\n")
    data = NER.load(ner_recipe(data={"train": "train.jsonl"}), tmp_path)
    assert data.splits["train"].examples[0]["tags"] == [1, 2]  # B-PER, I-PER
    assert any("converted 1 IOB1 tag(s)" in n for n in data.notes) and any("skipped 1 empty" in n for n in data.notes)
    with pytest.raises(DataError, match="opens an entity"):
        NER.load(ner_recipe(data={"train": "train.jsonl"}, task={"convert_iob1": False}), tmp_path)


def test_same_token_and_tag_column_is_a_recipe_error():
    from peft_ft.errors import RecipeError

    with pytest.raises(RecipeError, match="data.tag_column: the same column"):
        ner_recipe(data={"token_column": 0, "tag_column": 0})


@pytest.mark.parametrize("name", ["conll_lora", "conll_full", "conll_quick", "custom_bio_lora"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    assert recipe.task.type == "ner"


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_end_to_end_run_reload_same_predictions(tiny_bert, toy_dir, tmp_path, method):
    from peft_ft.engine.run import run
    from peft_ft.rundir.load import load_run

    recipe_path = tmp_path / "ner.toml"
    recipe_path.write_text(recipe_text(
        tiny_bert, toy_dir, train="train.txt", model_opts={"max_length": 32}, task={"type": "ner"},
        data={"validation": "valid.txt", "test": ["test.txt"]}, adapter={"method": method},
        train_opts={"epochs": 2, "lr": 5e-3 if method == "lora" else 1e-3}, output={"dir": tmp_path / "runs"}))
    run_dir = run(load_recipe(recipe_path))
    files = {p.name for p in run_dir.iterdir()}
    expected = {"recipe.toml", "train.log", "peft_ft.json", "metrics.json", "README.md", "predictions_validation.jsonl",
                "predictions_validation.conll", "predictions_test.jsonl", "predictions_test.conll"}
    weights = {"adapter_model.safetensors", "adapter_config.json"} if method == "lora" else {"model.safetensors", "config.json"}
    assert expected | weights <= files

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {"validation", "test", "train"}
    test = metrics["test"]
    assert {"f1", "precision", "recall", "accuracy", "per_type"} <= set(test) and test["n"] == 12
    assert test["f1"] > 0  # the toy task is learnable: real entities were predicted and matched

    # The CoNLL file parses back, one line per word, and scores the same as metrics.json.
    records = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    gold = read_conll(run_dir / "predictions_test.conll", tag_column=1)
    predicted = read_conll(run_dir / "predictions_test.conll", tag_column=2)
    assert [s["tokens"] for s in gold] == [r["tokens"] for r in records]
    assert [s["tags"] for s in predicted] == [r["predicted"] for r in records]
    assert entity_metrics([s["tags"] for s in gold], [s["tags"] for s in predicted])["f1"] == pytest.approx(test["f1"])

    # Reload: real tag names in the config, and the same predictions.
    model, tokenizer, info = load_run(run_dir)
    assert model.config.id2label == dict(enumerate(LABELS))
    recipe = load_recipe(run_dir / "recipe.toml")
    data = NER.load(recipe, toy_dir)
    features = NER.encode(data.splits["test"], tokenizer, recipe, data)
    outputs = NER.predict(model, features, tokenizer.pad_token_id, 16, "cpu")
    again, reloaded = NER.score(data.splits["test"], features, outputs, data)
    assert [r["predicted"] for r in reloaded] == [r["predicted"] for r in records]
    assert again["f1"] == pytest.approx(test["f1"])

    # A transformers pipeline answers with the tag names.
    from transformers import pipeline

    tagger = pipeline(NER.pipeline_task, model=model, tokenizer=tokenizer, device="cpu")
    found = tagger("john lives in paris .")
    assert found and {e["entity"] for e in found} <= set(LABELS)
