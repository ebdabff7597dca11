"""`peft_ft.pipeline(RUN_DIR)` and how each task family answers (`Task.answers`)."""

from __future__ import annotations

import pytest

from helpers import TEXTS, train_ner, train_sentiment
from peft_ft.errors import DataError, PeftFtError
from peft_ft.recipe.load import build_recipe
from peft_ft.rundir.load import label_kwargs
from peft_ft.tasks import TASKS
from peft_ft.tasks.base import Answers
from peft_ft.tasks.qa import QuestionAnswerer
from peft_ft.tasks.seq2seq import Generator


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    return train_sentiment(tmp_path_factory.mktemp("pipelines"), tiny_bert, "pos")


def test_every_family_says_how_it_answers():
    assert all(isinstance(t.answers, Answers) for t in TASKS.values())


def test_pipeline_from_a_run_folder_has_real_label_names(trained):
    import transformers

    import peft_ft

    pipe = peft_ft.pipeline(trained)
    assert isinstance(pipe.answerer, transformers.TextClassificationPipeline)
    answers = pipe(TEXTS)
    assert {a["label"] for a in answers} == {"neg", "pos"}
    assert pipe.model.config.id2label == {0: "neg", 1: "pos"}


def test_ner_pipeline_groups_entities_with_real_tag_names(tmp_path, tiny_bert, monkeypatch):
    import peft_ft.serving.pipelines
    from peft_ft.serving.pipelines import pipeline
    from peft_ft.tasks.ner import WordTagger

    run_dir = train_ner(tmp_path, tiny_bert)
    with monkeypatch.context() as patched:  # an option the family's callable does not take: refused before loading
        patched.setattr(peft_ft.serving.pipelines, "load_run", lambda *a, **k: pytest.fail("loaded the model first"))
        with pytest.raises(PeftFtError, match=r"unexpected keyword argument 'aggregation_strategy'; the ner family takes no such option"):
            pipeline(run_dir, aggregation_strategy="first")
    pipe = pipeline(run_dir)
    assert isinstance(pipe.answerer, WordTagger)
    found = {(e["entity_group"], e["word"], e["start"], e["end"]) for e in pipe("john works in berlin .")}
    assert ("PER", "john", 0, 4) in found and ("LOC", "berlin", 14, 20) in found


def test_the_pipeline_takes_the_rows_predict_takes(trained, tmp_path, tiny_bert):
    """A dict row was iterated as a list of words: the NER pipeline tagged its keys ("tokens", "text"), seq2seq
    generated from each key. Rows now go through the family's own to_input, as in predict."""
    import copy

    import peft_ft

    ner = peft_ft.pipeline(train_ner(tmp_path, tiny_bert))
    by_text = ner("john works in berlin .")
    assert ner({"text": "john works in berlin ."}) == by_text
    assert ner({"tokens": ["john", "works", "in", "berlin", "."]}).tags == by_text.tags == ["B-PER", "O", "O", "B-LOC", "O"]
    assert ner(["john works in berlin .", {"text": "mary lives in paris ."}])[0] == by_text
    pipe = peft_ft.pipeline(trained)
    assert pipe({"text": TEXTS[0]}) == pipe(TEXTS[0]) and pipe([{"text": t} for t in TEXTS]) == pipe(TEXTS)
    assert copy.copy(pipe).model is pipe.model  # the stock pipeline's attributes reach through, copies included


@pytest.mark.parametrize("inputs, message", [
    ([], "inputs: expected a text, a dict of fields or a non-empty list of them, got list []"),
    (None, "got NoneType None"),
    (5, "got int 5"),
    ([["john"]], "input 1: expected a text or a dict of fields, got list ['john']"),
    ([{"sentence": "good"}], "input 1: expected a text field 'text'; got fields 'sentence'"),
])
def test_the_pipeline_refuses_malformed_inputs_naming_them(trained, inputs, message):
    """These were IndexError, TypeError and transformers' own ValueError from deep inside."""
    import peft_ft

    with pytest.raises(PeftFtError) as refused:
        peft_ft.pipeline(trained)(inputs)
    assert message in str(refused.value), str(refused.value)


def test_the_pipeline_switches_take_booleans_and_the_device_is_checked_before_loading(trained, monkeypatch):
    """allow_pickle="false" is a truthy string and switched pickle loading on; device="cuda" on a CPU-only torch was
    torch's AssertionError after the whole model had loaded."""
    import peft_ft
    import peft_ft.serving.pipelines

    with pytest.raises(PeftFtError, match=r"allow_pickle='false'; it takes True or False"):
        peft_ft.pipeline(trained, allow_pickle="false")
    with pytest.raises(PeftFtError, match=r"trust_remote_code='no'; it takes True or False"):
        peft_ft.pipeline(trained, trust_remote_code="no")
    with pytest.raises(PeftFtError, match=r"batch_size=0: give a whole number of 1 or more"):
        peft_ft.pipeline(trained)(TEXTS, batch_size=0)
    with pytest.raises(PeftFtError, match=r"run_dir is ''"):
        peft_ft.pipeline("")
    monkeypatch.setattr(peft_ft.serving.pipelines, "check_run_folder", lambda *a: pytest.fail("checked the folder before the device"))
    with pytest.raises(PeftFtError, match=r"device 'mps': peft-ft answers on cpu or cuda"):
        peft_ft.pipeline(trained, device="mps")


NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def biased_tagger(tiny_bert, tag: str, max_length: int = 128):
    """A WordTagger whose head answers `tag` for every subword (zero weights, one large bias): what a
    word gets is then decided by the word-level rules alone."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from peft_ft.tasks.ner import WordTagger

    model = AutoModelForTokenClassification.from_pretrained(
        tiny_bert, id2label=dict(enumerate(NER_LABELS)), label2id={n: i for i, n in enumerate(NER_LABELS)}).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0).index_fill_(0, torch.tensor([NER_LABELS.index(tag)]), 10.0)
    recipe = build_recipe({"model": {"max_length": max_length}, "task": {"type": "ner"}, "data": {"train": "t.jsonl"}}, "test.toml")
    return WordTagger(model, AutoTokenizer.from_pretrained(tiny_bert), recipe)


def test_a_word_of_several_subwords_is_one_entity(tiny_bert):
    from transformers import AutoTokenizer

    text = "john lives in parisxq"
    assert len(AutoTokenizer.from_pretrained(tiny_bert).tokenize("parisxq")) > 1  # paris ##x ##q
    # B-LOC on every subword: the stock "simple" grouping made one entity per subword; per word, 4
    words = biased_tagger(tiny_bert, "B-LOC")(text)
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in words] == [
        ("LOC", "john", 0, 4), ("LOC", "lives", 5, 10), ("LOC", "in", 11, 13), ("LOC", "parisxq", 14, 21)]
    assert all(0 < e["score"] <= 1 for e in words)
    # I-LOC everywhere: conlleval reads one entity opening with I- and running over every word
    [whole] = biased_tagger(tiny_bert, "I-LOC")(text)
    assert (whole["entity_group"], whole["word"], whole["start"], whole["end"]) == ("LOC", text, 0, len(text))


def test_a_long_text_is_tagged_to_its_last_word(tiny_bert):
    text = " ".join(["paris", "london", "berlinxq"] * 40)  # 120 words, 160 subwords, windows of 14
    found = biased_tagger(tiny_bert, "B-PER", max_length=16)(text)
    assert len(found) == 120 and found[-1]["end"] == len(text) and found[-1]["word"] == "berlinxq"
    assert [e["word"] for e in found] == text.split()


def test_empty_texts_and_token_rows(tiny_bert):
    from peft_ft.tasks.ner import Words

    tagger = biased_tagger(tiny_bert, "B-PER")
    assert tagger(["", "   "]) == [[], []]
    row = TASKS["ner"].answers.to_input({"tokens": ["john", "lives"]}, tagger.recipe, "row 1")
    assert row == Words("john lives", ("john", "lives"), ((0, 4), (5, 10)))
    assert [e["word"] for e in tagger(row)] == ["john", "lives"]


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
    assert TASKS["qa"].answers.to_answer(answers[0])["answer"] == answers[0]["answer"]


def test_a_request_question_too_long_for_the_windows_names_its_row_and_what_to_shorten(tiny_bert):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert).eval()
    recipe = build_recipe({"model": {"max_length": 14}, "task": {"type": "qa", "doc_stride": 3}, "data": {"train": "t.json"}}, "test.toml")
    qa = QuestionAnswerer(model, AutoTokenizer.from_pretrained(tiny_bert), recipe)
    to_input = TASKS["qa"].answers.to_input
    rows = [to_input({"question": q, "context": "john lives in paris ."}, recipe, f"in.jsonl: line {n}")
            for n, q in ((1, "where ?"), (4, "where does john live and work and sleep ?"))]
    with pytest.raises(DataError, match=r"^in\.jsonl: line 4: the question is \d+ tokens; .* room for 7: shorten the question"):
        qa(rows, batch_size=2)
    # serve weighs a request (Answers.cost) before answering it: a question longer than a whole window made the
    # tokenizer raise there ("Truncation error: Sequence to truncate too short"), a 500
    longer = to_input({"question": "where is it " * 10, "context": "john lives in paris ."}, recipe, "inputs[0]")
    with pytest.raises(DataError, match=r"^inputs\[0\]: the question is 40 tokens; .* shorten the question"):
        TASKS["qa"].answers.cost(qa.tokenizer, recipe, longer)


def test_seq2seq_requests_are_text_and_say_when_the_encoder_cut_them(tmp_path):
    from transformers import AutoTokenizer

    from helpers import write_tiny_t5

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_t5(tmp_path / "t5"))
    recipe = build_recipe({"model": {"max_length": 16}, "task": {"type": "seq2seq"}, "data": {"train": "t.json"}}, "test.toml")
    answers = TASKS["seq2seq"].answers
    for row, message in (({"question": 5, "context": None}, "row 1: field 'question' is int"),
                         ({"text": 5}, "row 1: field 'text' is int"), ({"text": "a\ud800b"}, "lone UTF-16 surrogate"),
                         ({"question": "who ?"}, r"names \{context\}, which the data lacks")):
        with pytest.raises(DataError, match=message):
            answers.to_input(row, recipe, "row 1")
    short, long = "where is john ?", " ".join(["paris"] * 40)
    assert [answers.truncated(tokenizer, answers.to_input({"text": t}, recipe, "row 1"), 16) for t in (short, long)] == [False, True]


def test_generator_generates_with_the_run_settings(tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from helpers import write_tiny_t5

    path = write_tiny_t5(tmp_path / "t5")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    recipe = build_recipe({"task": {"type": "seq2seq"}, "eval": {"max_new_tokens": 3}, "data": {"train": "t.json"}}, "test.toml")
    row = {"question": "where is john ?", "context": "john lives in paris ."}
    text = TASKS["seq2seq"].answers.to_input(row, recipe, "row 1")
    assert text == "question: where is john ? context: john lives in paris ."
    [answer] = Generator(model, tokenizer, recipe)([text])
    with torch.inference_mode():
        ids = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=3, num_beams=1)
    assert answer == [{"generated_text": tokenizer.decode(ids[0], skip_special_tokens=True).strip()}]


def test_not_a_run_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PeftFtError, match="has adapter_config.json but no peft_ft.json"):
        label_kwargs(tmp_path)
