"""Extractive QA: window preprocessing, post-processing on hand-made logits, and end to end on the tiny BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import official_file, qa_rows, recipe_text, write_jsonl, write_recipe
from peft_ft.data.files import Split
from peft_ft.data.formats.squad import squad_metrics
from peft_ft.engine.run import run
from peft_ft.errors import DataError
from peft_ft.recipe.load import build_recipe, load_recipe
from peft_ft.rundir.load import load_run
from peft_ft.tasks import TASKS
from peft_ft.tasks.qa import answer_token_span, best_answer, encode_windows, window_candidates

CONTEXT = "john lives in paris . mary works at acme corp in london ."
# Tokens of "where is john ?" with max_length 14: [CLS] where is john ? [SEP] + 7 context tokens + [SEP],
# stride 3 -> windows over context tokens 0-6, 4-10 and 8-12:
#   window 0: john lives in paris . mary works
#   window 1: . mary works at acme corp in
#   window 2: acme corp in london .
FIRST_CONTEXT_TOKEN = 6


def small_recipe(**task):
    return build_recipe({"model": {"max_length": 14}, "task": {"type": "qa", "doc_stride": 3, **task}, "data": {"train": "t.json"}}, "test.toml")


def example(answer: str, qid: str = "q1", question: str = "where is john ?") -> dict:
    start = CONTEXT.index(answer)
    return {"id": qid, "title": "", "question": question, "context": CONTEXT, "answers": {"text": [answer], "answer_start": [start]}}


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def spans(features) -> list[tuple[int, int]]:
    return [(f["start_positions"], f["end_positions"]) for f in features]


# --- preprocessing ------------------------------------------------------------------------------


def test_answer_only_in_the_second_window_maps_there(tokenizer):
    features = encode_windows([example("at acme")], tokenizer, small_recipe(), with_positions=True)
    assert len(features) == 3 and all(f["_example"] == 0 for f in features)
    # Window 1 holds ". mary works at acme ...": "at" is its 4th context token, "acme" the 5th.
    assert spans(features) == [(0, 0), (FIRST_CONTEXT_TOKEN + 3, FIRST_CONTEXT_TOKEN + 4), (0, 0)]
    f = features[1]
    assert CONTEXT[f["_offsets"][f["start_positions"]][0]:f["_offsets"][f["end_positions"]][1]] == "at acme"


def test_answer_cut_by_a_window_edge_maps_to_cls(tokenizer):
    # "mary works at": window 0 ends after "works", window 2 starts at "acme"; only window 1 holds all of it.
    features = encode_windows([example("mary works at")], tokenizer, small_recipe(), with_positions=True)
    assert spans(features) == [(0, 0), (FIRST_CONTEXT_TOKEN + 1, FIRST_CONTEXT_TOKEN + 3), (0, 0)]
    assert features[0]["input_ids"][0] == tokenizer.cls_token_id


def test_offsets_cover_only_the_context_and_map_back_exactly(tokenizer):
    features = encode_windows([example("london")], tokenizer, small_recipe(), with_positions=True)
    for f in features:
        offsets = f["_offsets"]
        assert offsets[:FIRST_CONTEXT_TOKEN] == [None] * FIRST_CONTEXT_TOKEN and offsets[-1] is None  # question, [CLS], [SEP]
        words = [CONTEXT[s:e] for s, e in offsets[FIRST_CONTEXT_TOKEN:-1]]
        assert " ".join(words) in CONTEXT
    last = features[-1]
    assert CONTEXT[last["_offsets"][last["start_positions"]][0]:last["_offsets"][last["end_positions"]][1]] == "london"
    assert "token_type_ids" in last and last["token_type_ids"][FIRST_CONTEXT_TOKEN] == 1


def test_evaluation_windows_carry_no_positions_and_no_segment_ids_without_them(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.model_input_names = ["input_ids", "attention_mask"]  # as a RoBERTa / DistilBERT tokenizer
    features = encode_windows([example("london")], tok, small_recipe(), with_positions=False)
    assert set(features[0]) == {"input_ids", "length", "_example", "_offsets"}


def test_a_question_too_long_for_a_window_is_named(tokenizer):
    long = example("london", qid="long-one", question="where is john ? " * 3)
    with pytest.raises(DataError, match=r"dev\.json: question\(s\) long-one \(12 tokens\) leave no more than task\.doc_stride \(3\)"):
        encode_windows([example("paris"), long], tokenizer, small_recipe(), with_positions=False, source="dev.json")


def test_answer_token_span_edges():
    offsets = [None, None, (0, 4), (5, 10), (11, 13), None]
    assert answer_token_span(offsets, 5, 13, cls_index=0) == (3, 4)
    assert answer_token_span(offsets, 0, 4, cls_index=0) == (2, 2)
    assert answer_token_span(offsets, 11, 19, cls_index=0) == (0, 0)  # runs past the window
    assert answer_token_span([None, None], 0, 4, cls_index=0) == (0, 0)  # a window without context


# --- post-processing ----------------------------------------------------------------------------

# [CLS] where is john ? [SEP] john lives in paris . [SEP]
OFFSETS = [None, None, None, None, None, None, (0, 4), (5, 10), (11, 13), (14, 19), (20, 21), None]


def logits(peaks: dict[int, float]) -> np.ndarray:
    out = np.zeros(len(OFFSETS), dtype=np.float32)
    for index, value in peaks.items():
        out[index] = value
    return out


def test_best_span_never_comes_from_the_question_or_special_tokens():
    start = logits({3: 50.0, 0: 40.0, 9: 5.0})  # "john" in the question and [CLS] score highest
    end = logits({3: 50.0, 11: 40.0, 9: 5.0})
    assert best_answer(CONTEXT, [(start, end, OFFSETS)], n_best=20, max_answer_length=30) == "paris"


def test_max_answer_length_limits_the_span():
    start = logits({6: 10.0, 8: 5.0})   # john, in
    end = logits({9: 10.0, 7: 6.0})     # paris, lives
    window = [(start, end, OFFSETS)]
    assert best_answer(CONTEXT, window, n_best=20, max_answer_length=4) == "john lives in paris"   # 10 + 10
    assert best_answer(CONTEXT, window, n_best=20, max_answer_length=2) == "john lives"            # 10 + 6 beats in paris (5 + 10)
    assert all(e - s <= len("john lives") for _, s, e in window_candidates(start, end, OFFSETS, n_best=20, max_answer_length=2))


def test_end_before_start_is_skipped_and_n_best_bounds_the_search():
    start = logits({9: 10.0, 3: 9.0})
    end = logits({7: 10.0, 9: 1.0})
    assert best_answer(CONTEXT, [(start, end, OFFSETS)], n_best=20, max_answer_length=30) == "paris"
    # With one candidate each, the only pair (paris .. lives) ends before it starts: no answer.
    assert best_answer(CONTEXT, [(start, end, OFFSETS)], n_best=1, max_answer_length=30) == ""


def test_the_best_window_wins_and_maps_to_the_context():
    second = [None, None, None, None, None, None, (22, 26), (27, 32), (33, 35), (36, 40), (41, 45), None]
    weak = (logits({9: 2.0}), logits({9: 2.0}), OFFSETS)
    strong = (logits({9: 7.0}), logits({10: 7.0}), second)  # "acme corp" in the second window
    assert best_answer(CONTEXT, [weak, strong], n_best=20, max_answer_length=30) == "acme corp"
    assert best_answer(CONTEXT, [weak], n_best=20, max_answer_length=30) == "paris"


# --- end to end ---------------------------------------------------------------------------------

def qa_recipe(model, data, out, method="lora", lr=1e-3) -> str:
    """6 epochs of `method` at `lr` on train.json, with a validation split; short windows (24 tokens, stride 6)."""
    return recipe_text(model, data, train="train.json", model_opts={"max_length": 24}, task={"type": "qa", "doc_stride": 6},
                       data={"validation": "valid.jsonl"}, adapter={"method": method}, train_opts={"epochs": 6, "lr": lr},
                       output={"dir": out})


RUN_FILES = {
    "lora": {"adapter_model.safetensors", "adapter_config.json"},
    "full": {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"},
}
COMMON_FILES = {"README.md", "recipe.toml", "train.log", "metrics.json", "peft_ft.json", "predictions_validation.json"}


@pytest.fixture(scope="module", params=["lora", "full"])
def trained(request, tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp(f"qa-{request.param}")
    d = tmp / "data"
    d.mkdir()
    official_file(d / "train.json", qa_rows(48, seed=1))
    write_jsonl(d / "valid.jsonl", qa_rows(12, seed=2))
    lr = 1e-2 if request.param == "lora" else 2e-3
    text = qa_recipe(tiny_bert, d, tmp / "runs", request.param, lr)
    return request.param, run(load_recipe(write_recipe(tmp / f"{request.param}.toml", text))), d


def test_run_folder_holds_exactly_the_expected_files(trained):
    method, run_dir, _ = trained
    assert {p.name for p in run_dir.iterdir()} == COMMON_FILES | RUN_FILES[method]


def test_predictions_are_official_and_metrics_recompute_from_them(trained):
    _, run_dir, d = trained
    predictions = json.loads((run_dir / "predictions_validation.json").read_text())
    gold = {r["id"]: r["answers"]["text"] for r in qa_rows(12, seed=2)}
    assert set(predictions) == set(gold) and all(isinstance(v, str) for v in predictions.values())
    contexts = {r["id"]: r["context"] for r in qa_rows(12, seed=2)}
    assert all(p in contexts[q] for q, p in predictions.items())  # every answer is a span of its own context
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    again = squad_metrics(predictions, gold)
    assert metrics["exact_match"] == pytest.approx(again["exact_match"]) and metrics["f1"] == pytest.approx(again["f1"])
    assert metrics["n"] == 12


def test_the_model_learns_the_toy_task(trained):
    _, run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validation"]["f1"] >= 50.0, metrics["validation"]


def test_lora_saves_the_qa_head_with_the_adapter(trained):
    method, run_dir, _ = trained
    info = json.loads((run_dir / "peft_ft.json").read_text())
    if method == "full":
        assert info["trainable_params"] == info["total_params"]
        return
    from safetensors import safe_open

    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert info["heads"] == ["qa_outputs"]
    assert any("qa_outputs" in k for k in keys) and any("lora_A" in k for k in keys)
    assert json.loads((run_dir / "adapter_config.json").read_text())["task_type"] is None


def test_reload_gives_the_same_answers(trained):
    _, run_dir, d = trained
    model, tokenizer, _ = load_run(run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    task = TASKS["qa"]
    data = task.load(recipe, d)
    split = data.splits["validation"]
    features = task.encode(split, tokenizer, recipe, data)
    assert len(features) > len(split.examples)  # long contexts were cut into several windows
    outputs = task.predict(model, features, tokenizer.pad_token_id, 4, "cpu")
    _, records = task.score(split, features, outputs, data)
    saved = json.loads((run_dir / "predictions_validation.json").read_text())
    assert {r["id"]: r["predicted"] for r in records} == saved


def test_segment_ids_reach_the_lora_model(tiny_bert):
    """peft's QUESTION_ANS wrapper would drop token_type_ids; the generic PeftModel the runner builds keeps them."""
    import torch

    from peft_ft.methods import METHODS
    from peft_ft.models.loading import load_model

    recipe = build_recipe({"model": {"name": str(tiny_bert)}, "task": {"type": "qa"}, "data": {"train": "t.json"}}, "test.toml")
    model, heads = load_model(str(tiny_bert), recipe, TASKS["qa"].auto_class)
    model = METHODS["lora"].wrap(model, recipe, heads, TASKS["qa"].peft_task_type).eval()
    ids = torch.tensor([[2, 10, 11, 3, 12, 13, 3]])
    with torch.inference_mode():
        zeros = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).start_logits
        segments = model(input_ids=ids, token_type_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1]])).start_logits
    assert heads == ["qa_outputs"]
    assert not torch.allclose(zeros, segments)


def test_qa_recipe_checks(tmp_path):
    from peft_ft.errors import RecipeError

    with pytest.raises(RecipeError, match=r"task\.doc_stride: 256 must be well below model\.max_length \(256\)"):
        build_recipe({"task": {"type": "qa", "doc_stride": 256}, "data": {"train": "t.json"}}, "r.toml")
    with pytest.raises(RecipeError, match=r"data\.validation_fraction: set either data\.validation or data\.validation_fraction"):
        build_recipe({"task": {"type": "qa"}, "data": {"train": "t.json", "validation": "v.json", "validation_fraction": 0.1}}, "r.toml")


def titled_rows(articles: int, per_article: int) -> list[dict]:
    rows = qa_rows(articles * per_article, seed=3)
    for i, row in enumerate(rows):
        row["title"] = f"article_{i // per_article}"
    return rows


def carved(tmp_path, tiny_bert, rows, fraction, seed=42, test=()):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    official_file(d / "train.json", rows)
    recipe = build_recipe({"model": {"name": str(tiny_bert)}, "task": {"type": "qa"}, "train": {"seed": seed},
                           "data": {"dir": str(d), "train": "train.json", "validation_fraction": fraction, "test": list(test)}},
                          str(tmp_path / "r.toml"))
    return TASKS["qa"].load(recipe, d)


def test_validation_fraction_holds_out_whole_articles(tmp_path, tiny_bert):
    rows = titled_rows(articles=10, per_article=6)
    data = carved(tmp_path, tiny_bert, rows, 0.25)
    train, held = data.splits["train"].examples, data.splits["validation"].examples
    train_titles, held_titles = {e["title"] for e in train}, {e["title"] for e in held}
    # 25 % of 60 questions is 15: three articles of 6 are the first whole-article count to reach it.
    assert len(held_titles) == 3 and len(held) == 18 and len(train) == 42
    assert not train_titles & held_titles
    assert sorted(e["id"] for e in train + held) == sorted(r["id"] for r in rows)
    assert data.notes == ["validation: held out 3 whole article(s), 18 of 60 training questions (seed 42; no article on both sides)"]
    # Seeded by train.seed: the same seed holds out the same articles, another seed (here) others.
    again = carved(tmp_path, tiny_bert, rows, 0.25)
    assert [e["id"] for e in again.splits["validation"].examples] == [e["id"] for e in held]
    other = {e["title"] for e in carved(tmp_path, tiny_bert, rows, 0.25, seed=7).splits["validation"].examples}
    assert other != held_titles


def test_validation_fraction_without_titles_holds_out_whole_paragraphs(tmp_path, tiny_bert):
    rows = qa_rows(12, seed=4)
    for i, row in enumerate(rows):
        row["title"], row["context"] = "", f"paragraph {i // 3} : " + row["context"]
        row["answers"]["answer_start"] = [row["answers"]["answer_start"][0] + len(f"paragraph {i // 3} : ")]
    data = carved(tmp_path, tiny_bert, rows, 0.2)
    held = {e["context"] for e in data.splits["validation"].examples}
    assert held and not held & {e["context"] for e in data.splits["train"].examples}


def test_validation_fraction_needs_two_articles(tmp_path, tiny_bert):
    with pytest.raises(DataError, match=r"train\.json: data\.validation_fraction needs at least two articles"):
        carved(tmp_path, tiny_bert, titled_rows(articles=1, per_article=5), 0.5)


def test_a_test_file_named_validation_is_reported_as_a_test_split(tmp_path, tiny_bert):
    """A held-out file called validation.json must not become the split that picks the best epoch."""
    d = tmp_path / "data"
    d.mkdir()
    official_file(d / "validation.json", qa_rows(4, seed=9))
    data = carved(tmp_path, tiny_bert, titled_rows(articles=4, per_article=3), 0.25, test=["validation.json"])
    assert list(data.splits) == ["train", "validation", "test_validation"]
    assert [e["id"] for e in data.splits["test_validation"].examples] == [f"9-{i}" for i in range(4)]
    assert {e["title"] for e in data.splits["validation"].examples} <= {f"article_{i}" for i in range(4)}


def test_max_samples_cap_questions_not_windows(tmp_path, tiny_bert):
    d = tmp_path / "data"
    d.mkdir()
    official_file(d / "train.json", qa_rows(20, seed=1))
    write_jsonl(d / "valid.jsonl", qa_rows(10, seed=2))
    text = qa_recipe(tiny_bert, d, tmp_path / "runs", "lora", 1e-3)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", text), ["data.max_train_samples=5", "data.max_eval_samples=3"])
    data = TASKS["qa"].load(recipe, d)
    assert [len(s.examples) for s in data.splits.values()] == [5, 3]
    assert isinstance(data.splits["train"], Split)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_training_loss_and_gradients_do_not_depend_on_padding(tiny_bert, method):
    """The QA head's stock loss takes its softmax over padded positions too; ours (prepare_training) leaves them
    out, so padding a batch wider (train.pad_to_multiple_of) changes neither the loss nor the gradients.
    Prompt tuning prepends virtual positions to the logits: they count as tokens."""
    import torch

    from peft_ft.data.batching import pad_batch
    from peft_ft.methods import METHODS
    from peft_ft.models.loading import load_model

    from transformers import AutoTokenizer

    recipe = build_recipe({"model": {"name": str(tiny_bert), "max_length": 24}, "task": {"type": "qa", "doc_stride": 6},
                           "data": {"train": "t.json"}, "adapter": {"method": method}}, "test.toml")
    task = TASKS["qa"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = Split("train", "t.json", qa_rows(6, seed=4))
    features = task.encode(split, tokenizer, recipe, None)
    assert len({f["length"] for f in features}) > 1  # rows of several lengths: the narrow ones are padded already

    def loss_and_grads(model, multiple: int):
        model.zero_grad(set_to_none=True)
        batch = pad_batch(features, tokenizer.pad_token_id, multiple=multiple)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    torch.manual_seed(0)
    model, heads = load_model(str(tiny_bert), recipe, task.auto_class)
    model = METHODS[method].wrap(model, recipe, heads, task.peft_task_type)
    for module in model.modules():  # dropout (the model's, LoRA's) would draw masks of each width's shape
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    stock = [loss_and_grads(model, m)[0] for m in (1, 64)]
    assert abs(stock[0] - stock[1]) > 1e-3  # the stock loss does change with padding: the case below is real

    task.prepare_training(model, recipe, None)
    (narrow, narrow_grads), (wide, wide_grads) = loss_and_grads(model, 1), loss_and_grads(model, 64)
    assert wide == pytest.approx(narrow, rel=1e-5)
    assert narrow < stock[0]  # padding no longer takes probability from the gold positions
    for a, b in zip(narrow_grads, wide_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.eval()  # a loss measured in eval mode is the one training lowers
    with torch.no_grad():
        assert model(**pad_batch(features, tokenizer.pad_token_id, multiple=64)).loss.item() == pytest.approx(narrow, rel=1e-5)
