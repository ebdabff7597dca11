"""`peft_ft.pipeline(RUN_DIR)` and the per-family answer table."""

from __future__ import annotations

import pytest

from peft_ft.errors import PeftFtError
from peft_ft.pipelines import ANSWERS, Generator, QuestionAnswerer, label_kwargs
from peft_ft.schema import build_recipe
from helpers import TEXTS, train_ner, train_sentiment


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    return train_sentiment(tmp_path_factory.mktemp("pipelines"), tiny_bert, "pos")


def test_every_family_has_an_answer_entry():
    from peft_ft.tasks import TASKS

    assert {t.pipeline_task for t in TASKS.values()} <= set(ANSWERS)


def test_pipeline_from_a_run_folder_has_real_label_names(trained):
    import transformers

    import peft_ft

    pipe = peft_ft.pipeline(trained)
    assert isinstance(pipe, transformers.TextClassificationPipeline)
    answers = pipe(TEXTS)
    assert {a["label"] for a in answers} == {"neg", "pos"}
    assert pipe.model.config.id2label == {0: "neg", 1: "pos"}


def test_stock_pipeline_on_a_run_folder_needs_our_label_names(trained):
    """What the pipelines docstring says: transformers loads the adapter and head through
    base_model_name_or_path, but names labels from the base config unless given ours."""
    import transformers

    from peft_ft.pipelines import pipeline

    ours = pipeline(trained)(TEXTS)
    plain = transformers.pipeline("text-classification", model=str(trained))(TEXTS)
    assert {a["label"] for a in plain} <= {"LABEL_0", "LABEL_1"}
    assert [a["score"] for a in plain] == pytest.approx([a["score"] for a in ours], abs=1e-6)
    named = transformers.pipeline("text-classification", model=str(trained), model_kwargs=label_kwargs(trained))(TEXTS)
    assert [a["label"] for a in named] == [a["label"] for a in ours]


def test_ner_pipeline_groups_entities_with_real_tag_names(tmp_path, tiny_bert):
    import transformers

    from peft_ft.pipelines import pipeline

    pipe = pipeline(train_ner(tmp_path, tiny_bert))
    assert isinstance(pipe, transformers.TokenClassificationPipeline)
    found = {(e["entity_group"], e["word"], e["start"], e["end"]) for e in pipe("john works in berlin .")}
    assert ("PER", "john", 0, 4) in found and ("LOC", "berlin", 14, 20) in found


def test_question_answerer_returns_a_span_of_the_context(tiny_bert):
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert).eval()
    # windows of 14 tokens with a stride of 3: the context spreads over several windows
    recipe = build_recipe({"model": {"max_length": 14}, "task": {"type": "qa", "doc_stride": 3}, "data": {"train": "t.json"}}, "test.toml")
    qa = QuestionAnswerer(model, AutoTokenizer.from_pretrained(tiny_bert), recipe)
    context = "john lives in paris . mary works at acme corp in london ."
    answers = qa([{"question": "where is john ?", "context": context}, {"question": "who works at acme ?", "context": context}], batch_size=2)
    for a in answers:
        assert a["answer"] and a["answer"] == context[a["start"]:a["end"]] and 0 < a["score"] <= 1
        assert len(a["answer"].split()) <= recipe.task.max_answer_length
    assert ANSWERS["question-answering"].to_answer(answers[0])["answer"] == answers[0]["answer"]


def test_generator_generates_with_the_run_settings(tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from helpers import write_tiny_t5

    path = write_tiny_t5(tmp_path / "t5")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    recipe = build_recipe({"task": {"type": "seq2seq"}, "eval": {"max_new_tokens": 3}, "data": {"train": "t.json"}}, "test.toml")
    row = {"question": "where is john ?", "context": "john lives in paris ."}
    text = ANSWERS["text2text-generation"].to_input(row, recipe, "row 1")
    assert text == "question: where is john ? context: john lives in paris ."
    [answer] = Generator(model, tokenizer, recipe)([text])
    with torch.inference_mode():
        ids = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=3, num_beams=1)
    assert answer == [{"generated_text": tokenizer.decode(ids[0], skip_special_tokens=True).strip()}]


def test_not_a_run_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PeftFtError, match="has adapter_config.json but no peft_ft.json"):
        label_kwargs(tmp_path)
