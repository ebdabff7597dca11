"""Classification end to end on the tiny BERT: run folder, metrics from real predictions, reload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import recipe_text, reload_difference, write_jsonl, write_recipe
from peft_ft.engine.run import run
from peft_ft.errors import DataError
from peft_ft.recipe.load import load_recipe
from peft_ft.tasks import TASKS
from peft_ft.tasks.classification import classification_metrics


def classification_recipe(model, data, out, method="lora", lr=5e-3) -> str:
    """8 epochs of `method` at `lr`, with validation and test splits."""
    return recipe_text(model, data, model_opts={"max_length": 64}, task={"type": "classification"},
                       data={"validation": "valid.jsonl", "test": ["test.jsonl"]}, adapter={"method": method},
                       train_opts={"epochs": 8, "lr": lr}, output={"dir": out})


RUN_FILES = {
    "lora": {"adapter_model.safetensors", "adapter_config.json"},
    "full": {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"},
}
COMMON_FILES = {"README.md", "recipe.toml", "train.log", "metrics.json", "peft_ft.json",
                "predictions_validation.jsonl", "predictions_test.jsonl", "labels.json"}


def make_run(tmp_path, tiny_bert, data_dir, method="lora", lr=5e-3):
    text = classification_recipe(tiny_bert, data_dir, tmp_path / "runs", method, lr)
    return run(load_recipe(write_recipe(tmp_path / f"{method}.toml", text)))


@pytest.fixture(scope="module", params=["lora", "full"])
def trained(request, tmp_path_factory, tiny_bert):
    from helpers import sentiment_rows

    tmp = tmp_path_factory.mktemp(request.param)
    d = tmp / "data"
    d.mkdir()
    # LoRA on a random tiny BERT must learn attention from the last word to [CLS]: with 64 rows at lr 1e-2
    # its accuracy on 16 test rows ranged 0.5-0.8 over seeds 1-6; with 256 rows at lr 3e-3, on 64 test rows,
    # 0.84-0.97 over seeds 1, 2, 7, 8, 10 and 42.
    write_jsonl(d / "train.jsonl", sentiment_rows(256, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(64, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(64, seed=3))
    lr = 3e-3 if request.param == "lora" else 2e-3
    return request.param, make_run(tmp, tiny_bert, d, request.param, lr)


def test_run_folder_holds_exactly_the_expected_files(trained):
    method, run_dir = trained
    files = {p.name for p in run_dir.iterdir()}
    assert files == COMMON_FILES | RUN_FILES[method]


def test_metrics_equal_a_recomputation_from_the_predictions(trained):
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "peft_ft.json").read_text())
    names = info["labels"]
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in (run_dir / f"predictions_{split}.jsonl").read_text().splitlines()]
        gold = np.array([names.index(r["gold"]) for r in rows])
        predicted = np.array([names.index(r["predicted"]) for r in rows])
        assert all(r["predicted"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)
        again = classification_metrics(gold, predicted, names)
        assert metrics[split]["accuracy"] == pytest.approx(again["accuracy"])
        assert metrics[split]["macro_f1"] == pytest.approx(again["macro_f1"])
        assert metrics[split]["n"] == 64
    assert metrics["train"]["steps"] == 8 * 256 // 8 and metrics["train"]["tokens_per_second"] > 0


def test_model_learns_the_toy_task(trained):
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]


def test_reload_gives_identical_predictions(trained):
    _, run_dir = trained
    assert reload_difference(run_dir) < 1e-5


def test_lora_trains_only_adapter_and_head(trained):
    method, run_dir = trained
    info = json.loads((run_dir / "peft_ft.json").read_text())
    if method == "full":
        assert info["trainable_params"] == info["total_params"]
        return
    # tiny BERT: hidden 32, intermediate 64, 2 layers; r = 8 on query/key/value/attention-output dense (32->32),
    # intermediate dense (32->64), output dense (64->32), and the pooler dense (32->32); head 32*2+2.
    r, h, i = 8, 32, 64
    per_layer = 4 * r * (h + h) + r * (h + i) + r * (i + h)
    lora = 2 * per_layer + r * (h + h)
    assert info["trainable_params"] == lora + (h * 2 + 2)
    assert info["heads"] == ["classifier"]


def test_an_existing_run_folder_is_never_reused(tmp_path, tiny_bert, sentiment_dir):
    import datetime

    from peft_ft.rundir.layout import create_run_dir

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", classification_recipe(tiny_bert, sentiment_dir, tmp_path / "runs", "lora", 1e-3)))
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)
    first = create_run_dir(recipe, now)
    (first / "metrics.json").write_text("{}")
    second, third = create_run_dir(recipe, now), create_run_dir(recipe, now)  # runs started in the same second
    assert (first.name, second.name, third.name) == ("20260101-120000", "20260101-120000-2", "20260101-120000-3")
    assert (first / "metrics.json").read_text() == "{}" and not any(second.iterdir())


def pair_rows(n):
    rows = []
    for i in range(n):
        label = i % 3
        rows.append({"ref": "plants need water", "answer": ["plants need water", "the sun", "john lives in paris"][label], "label": label})
    rows.append({"ref": "x", "answer": "y", "label": -1})  # MNLI-style unlabelled row
    return rows


def test_pairs_integer_labels_names_and_held_out_validation(tmp_path, tiny_bert):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", pair_rows(60))
    write_jsonl(d / "test.jsonl", pair_rows(9))
    recipe = load_recipe(write_recipe(tmp_path / "pair.toml", recipe_text(
        tiny_bert, d, task={"labels": ["correct", "contradictory", "irrelevant"]},
        data={"validation_fraction": 0.2, "test": ["test.jsonl"], "text_column": "ref", "text_pair_column": "answer"},
        train_opts={"epochs": 1, "threads": 1}, defaults=False)))
    data = TASKS["classification"].load(recipe, d)
    assert len(data.splits["validation"].examples) == 12 and len(data.splits["train"].examples) == 48
    assert sorted(e["label"] for e in data.splits["validation"].examples) == [0] * 4 + [1] * 4 + [2] * 4
    assert any("dropped 1 unlabelled" in n for n in data.notes)
    assert data.splits["test"].examples[1]["text_pair"] == "the sun"
    assert data.labels == ["correct", "contradictory", "irrelevant"]


def test_unknown_eval_label_names_file_row_and_label(tmp_path, tiny_bert, sentiment_dir):
    rows = [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}]
    write_jsonl(sentiment_dir / "test.jsonl", rows)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", classification_recipe(tiny_bert, sentiment_dir, tmp_path / "runs", "lora", 1e-3)))
    with pytest.raises(DataError, match=r"test.jsonl: row 2: label 'neutral' is not among the training labels \(neg, pos\)"):
        TASKS["classification"].load(recipe, sentiment_dir)


def test_missing_column_and_missing_file_are_clear(tmp_path, tiny_bert, sentiment_dir):
    text = classification_recipe(tiny_bert, sentiment_dir, tmp_path / "runs", "lora", 1e-3)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", text), ["data.text_column=sentence"])
    with pytest.raises(DataError, match=r"train.jsonl: missing column\(s\) data.text_column = 'sentence'; the file has: text, label"):
        TASKS["classification"].load(recipe, sentiment_dir)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", text), ["data.train=nope.jsonl"])
    with pytest.raises(DataError, match=r"data.train: file not found: .*nope.jsonl\. Files there: test.jsonl, train.jsonl, valid.jsonl"):
        run(recipe)
    assert not (tmp_path / "runs").exists()  # nothing is created before the inputs are known good
