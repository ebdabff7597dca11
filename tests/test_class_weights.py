"""train.class_weights = "balanced": weighted cross-entropy from the training split's label counts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import recipe_text, write_jsonl, write_recipe
from peft_ft.engine.run import run
from peft_ft.errors import RecipeError
from peft_ft.recipe.load import load_recipe
from peft_ft.tasks.classification import balanced_weights, use_weighted_loss


def weights_recipe(model, task, data, out, class_weights=None, **sections) -> str:
    """2 epochs at lr 1e-2 with a validation split; `class_weights` is train.class_weights (None: not set)."""
    return recipe_text(model, data, model_opts={"max_length": 32}, task=task, data={"validation": "valid.jsonl"},
                       train_opts={"epochs": 2, "lr": 1e-2, "class_weights": class_weights}, output={"dir": out}, **sections)


def test_balanced_weights_are_rows_over_classes_times_count():
    assert balanced_weights([0, 0, 0, 1], 2) == [4 / (2 * 3), 4 / (2 * 1)]
    assert balanced_weights([0, 2, 2], 3) == [1.0, 1.0, 3 / (3 * 2)]  # a class absent from training: 1.0, never used


def test_the_hook_weights_training_loss_only(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    ids = torch.tensor([[2, 10, 3], [2, 11, 3], [2, 12, 3]])
    labels = torch.tensor([0, 1, 1])
    model.eval()
    plain = model(input_ids=ids, labels=labels)
    use_weighted_loss(model, [3.0, 0.5])
    assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(plain.loss.item())  # eval: untouched
    model.train()
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels)
    expected = F.cross_entropy(out.logits, labels, weight=torch.tensor([3.0, 0.5]))
    assert out.loss.item() == pytest.approx(expected.item())
    assert out.loss.item() != pytest.approx(F.cross_entropy(out.logits, labels).item())
    out.loss.backward()  # the replaced loss carries gradients to the model
    assert model.classifier.weight.grad is not None


def _imbalanced(tmp_path, tiny_bert, class_weights: str | None, name: str):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    rows = [{"text": "good movie" if i % 4 else "bad movie", "label": "pos" if i % 4 else "neg"} for i in range(32)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "valid.jsonl", rows[:8])
    text = weights_recipe(tiny_bert, {"type": "classification"}, d, tmp_path / "runs", class_weights)
    return run(load_recipe(write_recipe(tmp_path / f"{name}.toml", text)))


def test_balanced_run_logs_its_weights_and_trains_differently(tmp_path, tiny_bert):
    weighted = _imbalanced(tmp_path, tiny_bert, "balanced", "weighted")
    plain = _imbalanced(tmp_path, tiny_bert, None, "plain")
    assert "class weights (balanced): neg 2.000, pos 0.667" in (weighted / "train.log").read_text()
    assert "class weights" not in (plain / "train.log").read_text()
    assert 'class_weights = "balanced"' in (weighted / "recipe.toml").read_text()
    losses = [[h["train_loss"] for h in json.loads((r / "metrics.json").read_text())["train"]["history"]] for r in (weighted, plain)]
    assert losses[0] != pytest.approx(losses[1])


@pytest.mark.parametrize("task, class_weights, sections, message", [
    ({"type": "ner"}, "balanced", {}, "train.class_weights: applies only when task.type is 'classification'"),
    ({"type": "classification", "regression": True}, "balanced", {"eval": {"metric": "pearson"}},
     "train.class_weights: a regression task has no classes to weight"),
    ({"type": "classification"}, "inverse", {}, "train.class_weights: expected one of 'none', 'balanced'"),
])
def test_class_weights_is_checked(tmp_path, tiny_bert, task, class_weights, sections, message):
    text = weights_recipe(tiny_bert, task, tmp_path, tmp_path / "runs", class_weights, **sections)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write_recipe(tmp_path / "r.toml", text))
