"""Seq2seq (generative QA and text-to-text pairs) on a tiny T5 built in code: encoding, generation, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import official_file, qa_rows, recipe_text, write_jsonl, write_recipe, write_tiny_t5
from peft_ft.data.formats.squad import squad_metrics
from peft_ft.engine.run import run
from peft_ft.errors import DataError, PeftFtError, RecipeError
from peft_ft.recipe.load import build_recipe, load_recipe
from peft_ft.rundir.load import load_run
from peft_ft.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return write_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("s2s-data")
    official_file(d / "train.json", qa_rows(48, seed=1))
    write_jsonl(d / "valid.jsonl", qa_rows(10, seed=2))
    return d


def recipe_at(tmp_path, tiny_t5, data_dir, method="lora", lr=1e-2, overrides=()):
    text = recipe_text(tiny_t5, data_dir, train="train.json", model_opts={"max_length": 48},
                       task={"type": "seq2seq", "max_target_length": 8}, data={"validation": "valid.jsonl"},
                       adapter={"method": method}, train_opts={"epochs": 4, "lr": lr}, eval={"num_beams": 2, "max_new_tokens": 4},
                       output={"dir": tmp_path / "runs"})
    return load_recipe(write_recipe(tmp_path / f"{method}.toml", text), list(overrides))


# --- data and encoding --------------------------------------------------------------------------


def test_inputs_come_from_the_template_and_targets_from_the_first_answer(tmp_path, tiny_t5, squad_dir):
    from transformers import AutoTokenizer

    recipe = recipe_at(tmp_path, tiny_t5, squad_dir)
    task = TASKS["seq2seq"]
    data = task.load(recipe, squad_dir)
    first = qa_rows(48, seed=1)[0]
    example = data.splits["train"].examples[0]
    assert example["input"] == f"question: {first['question']} context: {first['context']}"
    assert example["golds"] == first["answers"]["text"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    train = task.encode(data.splits["train"], tokenizer, recipe, data)
    valid = task.encode(data.splits["validation"], tokenizer, recipe, data)
    assert train[0]["labels"] == tokenizer(first["answers"]["text"][0])["input_ids"] == [tokenizer.convert_tokens_to_ids(first["answers"]["text"][0]), 1]
    assert train[0]["input_ids"][-1] == tokenizer.eos_token_id and train[0]["length"] == len(train[0]["input_ids"])
    assert all("labels" not in f for f in valid)  # evaluation generates; the gold answer never reaches the model
    assert tokenizer.unk_token_id not in train[0]["input_ids"]


def test_text_to_text_pairs_from_a_table(tmp_path, tiny_t5):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"src": "john lives in paris", "tgt": "paris", "who": "john"}] * 4)
    recipe = build_recipe({"task": {"type": "seq2seq"}, "data": {"dir": str(d), "train": "train.jsonl", "text_column": "src", "target_column": "tgt"}}, "r.toml")
    examples = TASKS["seq2seq"].load(recipe, d).splits["train"].examples
    assert examples[0] == {"id": "1", "input": "john lives in paris", "target": "paris", "golds": ["paris"]}
    templated = build_recipe({"task": {"type": "seq2seq", "input_template": "where is {who} ? {src}"},
                              "data": {"dir": str(d), "train": "train.jsonl", "target_column": "tgt"}}, "r.toml")
    assert TASKS["seq2seq"].load(templated, d).splits["train"].examples[0]["input"] == "where is john ? john lives in paris"
    missing = build_recipe({"task": {"type": "seq2seq", "input_template": "{nope}"},
                            "data": {"dir": str(d), "train": "train.jsonl", "target_column": "tgt"}}, "r.toml")
    with pytest.raises(DataError, match=r"train\.jsonl: row 1: task\.input_template names \{nope\}, which the data lacks; it has: src, tgt, who"):
        TASKS["seq2seq"].load(missing, d)


def test_squad_data_holds_out_whole_articles_for_validation(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = qa_rows(24, seed=5)
    for i, row in enumerate(rows):
        row["title"] = f"article_{i % 6}"
    official_file(d / "train.json", rows)
    recipe = build_recipe({"task": {"type": "seq2seq"}, "data": {"dir": str(d), "train": "train.json", "validation_fraction": 0.3}}, "r.toml")
    data = TASKS["seq2seq"].load(recipe, d)
    titles = {name: {r["title"] for r in rows if r["id"] in {e["id"] for e in split.examples}} for name, split in data.splits.items()}
    assert len(data.splits["validation"].examples) == 8 and len(titles["validation"]) == 2  # 30 % of 24 -> two articles of 4
    assert not titles["train"] & titles["validation"]
    assert data.notes and data.notes[0].startswith("validation: held out 2 whole article(s), 8 of 24 training questions")


def test_template_problems_are_recipe_errors():
    base = {"data": {"train": "t.json"}}
    with pytest.raises(RecipeError, match=r"task\.input_template: answer not among the SQuAD fields id, title, question, context"):
        build_recipe({"task": {"type": "seq2seq", "input_template": "{question} {answer}"}, **base}, "r.toml")
    with pytest.raises(RecipeError, match=r"task\.input_template: .*literal brace"):
        build_recipe({"task": {"type": "seq2seq", "input_template": "{question"}, **base}, "r.toml")
    with pytest.raises(RecipeError, match=r"positional \{\} fields"):
        build_recipe({"task": {"type": "seq2seq", "input_template": "{} {question}"}, **base}, "r.toml")


def test_generation_ignores_labels_and_matches_generate(tmp_path, tiny_t5, squad_dir):
    """Training features carry labels (here longer than some inputs): predict must generate, not score them."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    recipe = recipe_at(tmp_path, tiny_t5, squad_dir)
    task = TASKS["seq2seq"]
    data = task.load(recipe, squad_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    features = task.encode(data.splits["train"], tokenizer, recipe, data)[:5]
    features[0]["labels"] = features[0]["labels"] * 40
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    texts = task.predict(model, features, tokenizer.pad_token_id, 2, "cpu")
    with torch.inference_mode():
        direct = model.generate(input_ids=torch.tensor([features[3]["input_ids"]]), num_beams=2, max_new_tokens=4)
    assert texts[3] == tokenizer.decode(direct[0], skip_special_tokens=True).strip()
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)


def test_targets_longer_than_their_inputs_can_be_batched(tmp_path, tiny_t5):
    from transformers import AutoTokenizer

    from peft_ft.data.batching import pad_batch

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": "where is john ?", "target": "john lives in paris . mary works in london ."},
                                    {"text": "where is mary ?", "target": "london"}])
    recipe = build_recipe({"task": {"type": "seq2seq"}, "data": {"dir": str(d), "train": "train.jsonl", "target_column": "target"}}, "r.toml")
    task = TASKS["seq2seq"]
    data = task.load(recipe, d)
    features = task.encode(data.splits["train"], AutoTokenizer.from_pretrained(tiny_t5), recipe, data)
    batch = pad_batch(features, 0)
    assert batch["labels"].shape == (2, len(features[0]["labels"]))  # the longest target, not the longest input


# --- end to end ---------------------------------------------------------------------------------


RUN_FILES = {
    "lora": {"adapter_model.safetensors", "adapter_config.json"},
    "prefix_tuning": {"adapter_model.safetensors", "adapter_config.json"},
    "full": {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"},
}
COMMON_FILES = {"README.md", "recipe.toml", "train.log", "metrics.json", "peft_ft.json", "predictions_validation.json"}


@pytest.fixture(scope="module", params=["lora", "prefix_tuning", "full"])
def trained(request, tmp_path_factory, tiny_t5, squad_dir):
    tmp = tmp_path_factory.mktemp(f"s2s-{request.param}")
    return run(recipe_at(tmp, tiny_t5, squad_dir, request.param, lr=5e-3 if request.param == "full" else 5e-2))


def test_run_folder_holds_exactly_the_expected_files(trained):
    method = json.loads((trained / "peft_ft.json").read_text())["method"]
    assert {p.name for p in trained.iterdir()} == COMMON_FILES | RUN_FILES[method]
    if method == "lora":
        config = json.loads((trained / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]


def test_metrics_recompute_from_the_official_predictions(trained):
    predictions = json.loads((trained / "predictions_validation.json").read_text())
    gold = {r["id"]: r["answers"]["text"] for r in qa_rows(10, seed=2)}
    assert set(predictions) == set(gold)
    metrics = json.loads((trained / "metrics.json").read_text())
    again = squad_metrics(predictions, gold)
    assert metrics["validation"]["f1"] == pytest.approx(again["f1"]) and metrics["validation"]["exact_match"] == pytest.approx(again["exact_match"])
    assert metrics["train"]["steps"] == 4 * 6


def test_reload_gives_the_same_answers(trained, squad_dir, tiny_t5):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model, tokenizer, info = load_run(trained)
    assert info["task"] == "seq2seq"
    assert type(model).__name__ == ("PeftModelForSeq2SeqLM" if info["is_adapter"] else "T5ForConditionalGeneration")
    recipe = load_recipe(trained / "recipe.toml")
    task = TASKS["seq2seq"]
    data = task.load(recipe, squad_dir)
    split = data.splits["validation"]
    features = task.encode(split, tokenizer, recipe, data)
    outputs = task.predict(model, features, tokenizer.pad_token_id, 4, "cpu")
    _, records = task.score(split, features, outputs, data)
    assert {r["id"]: r["predicted"] for r in records} == json.loads((trained / "predictions_validation.json").read_text())
    # ... and the trained weights are in effect: the reloaded model scores differently from its base.
    batch = {"input_ids": torch.tensor([features[0]["input_ids"]]), "decoder_input_ids": torch.tensor([[0]])}
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    with torch.inference_mode():
        assert not torch.allclose(model(**batch).logits, base(**batch).logits, atol=1e-3)


def test_card_says_where_a_prefix_reaches_generate(trained):
    """Stock `generate` drops a seq2seq prefix on transformers 5.24 + peft 0.21 (peft_ft.methods.route_prefixes):
    the card of a prefix-tuned run says so and sends users to peft_ft.pipeline; other runs' cards do not."""
    method = json.loads((trained / "peft_ft.json").read_text())["method"]
    card = (trained / "README.md").read_text()
    assert ("Stock `generate` on this model drops the prefix" in card) == (method == "prefix_tuning")


def test_shipped_t5_recipe_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(ROOT / "recipes/squad_t5_lora.toml", [f"output.dir={tmp_path / 'runs'}"])
    assert recipe.model.name == "google/flan-t5-small"
    with pytest.raises(PeftFtError, match=r"model\.name: 'google/flan-t5-small' is a hub id.*not in the local cache \(.+\).*set model\.name to a local model folder"):
        run(recipe)
    assert not (tmp_path / "runs").exists()


def test_the_cards_stock_code_generates_what_peft_ft_answers(trained, tiny_t5):
    """The card stopped after loading the tokenizer: stock generate() then used transformers' defaults (0 of 18
    answers equal to `peft-ft predict`), and without truncation some inputs ran past model.max_length."""
    import re
    import subprocess
    import sys

    import peft_ft

    method = json.loads((trained / "peft_ft.json").read_text())["method"]
    if method == "prefix_tuning":
        pytest.skip("the card says stock generate drops the prefix (test above)")
    card = (trained / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = re.sub(r'^DIR = .*$', f"DIR = {str(trained)!r}", code, flags=re.M)
    code = re.sub(r'^BASE = .*$', f"BASE = {str(tiny_t5)!r}", code, flags=re.M)
    code += "import sys; assert 'peft_ft' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=trained.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    question, context = "Where does the Eiffel Tower stand?", "The Eiffel Tower stands in Paris, the capital of France."
    expected = peft_ft.pipeline(trained)(f"question: {question} context: {context}")[0]["generated_text"]
    assert done.stdout.rstrip("\n").rsplit("\n", 1)[-1] == expected  # the answer may be empty (a tiny model)
    recipe = load_recipe(trained / "recipe.toml")
    assert f"num_beams={recipe.eval.num_beams}, max_new_tokens={recipe.eval.max_new_tokens}" in code
    assert f"truncation=True, max_length={recipe.model.max_length}" in code
