"""Label Studio exports: the pre-tokenizer, spans -> BIO, annotation choice and counting, JSON-MIN,
classification choices, the CoNLL2003 export, carved splits, and end-to-end runs on the tiny BERT.

Fixtures are written here in Label Studio's documented export shapes (tasks with `data` and
`annotations[].result[]`; JSON-MIN flat records); expected tags are computed by hand.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peft_ft.data.files import carve_fractions, carve_validation
from peft_ft.data.formats.conll import read_conll
from peft_ft.data.formats.label_studio import bio_to_spans, pre_tokenize, read_classification, read_ner, spans_to_bio
from peft_ft.errors import DataError, RecipeError
from peft_ft.recipe.load import build_recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent


# --- fixtures in Label Studio's shapes ----------------------------------------------------------


def span(text: str, start: int, end: int, label: str, from_name: str = "label") -> dict:
    return {"value": {"start": start, "end": end, "text": text[start:end], "labels": [label]}, "id": f"r{start}",
            "from_name": from_name, "to_name": "text", "type": "labels", "origin": "manual"}


def choice(*labels: str, from_name: str = "sentiment") -> dict:
    return {"value": {"choices": list(labels)}, "id": "c", "from_name": from_name, "to_name": "text", "type": "choices"}


def annotation(result: list[dict], number: int = 1, created: str = "2024-05-01T10:00:00.000000Z", updated: str | None = None,
               cancelled: bool = False) -> dict:
    return {"id": number, "completed_by": number, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": created, "updated_at": updated or created, "lead_time": 3.5}


def task(task_id: int, text: str, *annotations: dict, **data) -> dict:
    return {"id": task_id, "data": {"text": text, **data}, "annotations": list(annotations), "predictions": [], "meta": {}}


def write_export(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def recipe(task_type: str = "ner", **data) -> object:
    return build_recipe({"task": {"type": task_type}, "data": {"train": "export.json", "format": "label_studio", **data}}, "test.toml")


# --- words and BIO ------------------------------------------------------------------------------


def test_pre_tokenizer_splits_on_whitespace_and_punctuation():
    text = "Dr. O'Neil (São-Paulo) paid $5,\u00a0ok 😀"
    assert [text[s:e] for s, e in pre_tokenize(text)] == [
        "Dr", ".", "O", "'", "Neil", "(", "São", "-", "Paulo", ")", "paid", "$", "5", ",", "ok", "😀"]
    assert pre_tokenize("") == [] and pre_tokenize(" \n\t") == []
    assert pre_tokenize("Zürich") == [(0, 6)]  # letters with accents stay one word


def test_spans_become_hand_computed_bio_tags():
    text = "Peter Blackburn met Acme Corp in Berlin, Germany ."
    #       0     6         16  20   25   30 33    39 41      49
    spans = [span(text, 0, 5, "PER")["value"], span(text, 6, 15, "PER")["value"],  # adjacent: two entities
             span(text, 20, 29, "ORG")["value"], span(text, 33, 48, "LOC")["value"]]  # "Berlin, Germany": one entity
    words, tags, problems = spans_to_bio(text, spans, 1)
    assert problems == []
    assert words == ["Peter", "Blackburn", "met", "Acme", "Corp", "in", "Berlin", ",", "Germany", "."]
    assert tags == ["B-PER", "B-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "O"]


def test_a_span_with_surrounding_whitespace_covers_its_words_only():
    text = "in  Paris  today"
    _, tags, problems = spans_to_bio(text, [{"start": 3, "end": 10, "labels": ["LOC"]}], 1)
    assert problems == [] and tags == ["O", "B-LOC", "O"]


def test_a_span_ending_inside_a_word_is_reported_with_task_and_offsets(tmp_path):
    text = "Berliners voted"
    path = write_export(tmp_path / "export.json", [task(7, text, annotation([span(text, 0, 6, "LOC")]))])
    with pytest.raises(DataError) as e:
        read_ner(recipe(), path)
    message = str(e.value)
    assert "task 7" in message and "[0, 6)" in message and "ends inside the word 'Berliners' [0, 9)" in message


def test_a_span_starting_inside_a_word_is_reported():
    text = "the unBerlin way"
    _, tags, problems = spans_to_bio(text, [{"start": 6, "end": 12, "labels": ["LOC"]}], 3)
    assert len(problems) == 1 and "task 3" in problems[0] and "starts inside the word 'unBerlin'" in problems[0]


def test_overlapping_spans_are_reported_not_merged(tmp_path):
    text = "New York City Hall"
    spans = [span(text, 0, 13, "LOC"), span(text, 9, 18, "ORG")]
    path = write_export(tmp_path / "export.json", [task(4, text, annotation(spans))])
    with pytest.raises(DataError) as e:
        read_ner(recipe(), path)
    assert "task 4: span [9, 18) 'City Hall': overlaps span [0, 13) 'New York City'" in str(e.value)


def test_unicode_text_code_point_and_utf16_offsets_read_alike(tmp_path):
    text = "😀 Zoë visited Zürich"
    # Code points: 😀=0, Zoë=2..5, Zürich=14..20. A JavaScript (UTF-16) export counts 😀 as two units.
    code_points = [{"start": 2, "end": 5, "text": "Zoë", "labels": ["PER"]}, {"start": 14, "end": 20, "text": "Zürich", "labels": ["LOC"]}]
    utf16 = [{"start": 3, "end": 6, "text": "Zoë", "labels": ["PER"]}, {"start": 15, "end": 21, "text": "Zürich", "labels": ["LOC"]}]
    expected = ["O", "B-PER", "O", "B-LOC"]
    assert spans_to_bio(text, code_points, 1)[1] == expected
    assert spans_to_bio(text, utf16, 1)[1] == expected
    # A span whose text matches neither reading is an error, not a guess.
    problems = spans_to_bio(text, [{"start": 2, "end": 5, "text": "Zurich", "labels": ["LOC"]}], 9)[2]
    assert len(problems) == 1 and "task 9" in problems[0] and "'Zurich'" in problems[0]


def test_bio_to_spans_and_back_is_the_identity():
    tokens = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    text, spans = bio_to_spans(tokens, tags)
    assert text == "EU rejects German call to boycott British lamb ."
    assert spans[0] == {"start": 0, "end": 2, "text": "EU", "labels": ["ORG"]}
    assert spans_to_bio(text, spans, 1)[:2] == (tokens, tags)
    # IOB1: an I- opening an entity starts a span; B- between two entities of a type splits them.
    _, spans = bio_to_spans(["a", "b", "c", "d"], ["I-PER", "I-PER", "B-PER", "O"])
    assert [(s["start"], s["end"]) for s in spans] == [(0, 3), (4, 5)]


# --- tasks, annotations, counting ---------------------------------------------------------------


def annotators_export(tmp_path) -> Path:
    text = "John met Mary"
    john, mary = span(text, 0, 4, "PER"), span(text, 9, 13, "PER")
    mary_org = span(text, 9, 13, "ORG")
    return write_export(tmp_path / "export.json", [
        # Two annotators disagree; the second was created later but the first was updated last.
        task(1, text, annotation([john, mary], 1, "2024-05-01T10:00:00Z", "2024-05-03T09:00:00Z"),
             annotation([john, mary_org], 2, "2024-05-02T10:00:00Z")),
        # Two annotators agree (their results list the spans in a different order).
        task(2, text, annotation([john, mary], 3), annotation([mary, john], 4)),
        task(3, text, annotation([john], 5)),
    ])


@pytest.mark.parametrize("choice_, first_tags, kept, note", [
    ("first", ["B-PER", "O", "B-PER"], 3, "2 task(s) had several annotations; kept the first of each"),
    ("latest", ["B-PER", "O", "B-PER"], 3, "kept the latest of each"),
    ("skip_conflicting", None, 2, "left out 1 task(s) with conflicting annotations"),
])
def test_several_annotators_follow_annotation_choice(tmp_path, choice_, first_tags, kept, note):
    sentences, notes = read_ner(recipe(annotation_choice=choice_), annotators_export(tmp_path))
    assert len(sentences) == kept and any(note in n for n in notes)
    assert [s["line"] for s in sentences] == ([1, 2, 3] if first_tags else [2, 3])  # `line` holds the task id
    if first_tags:
        assert sentences[0]["tags"] == first_tags


def test_latest_picks_the_last_updated_annotation(tmp_path):
    text = "John met Mary"
    export = write_export(tmp_path / "export.json", [task(
        1, text, annotation([span(text, 9, 13, "PER")], 1, "2024-05-01T10:00:00Z"),
        annotation([span(text, 9, 13, "ORG")], 2, "2024-05-02T10:00:00Z"))])
    assert read_ner(recipe(annotation_choice="latest"), export)[0][0]["tags"] == ["O", "O", "B-ORG"]
    assert read_ner(recipe(annotation_choice="first"), export)[0][0]["tags"] == ["O", "O", "B-PER"]


def test_cancelled_empty_and_unannotated_tasks_are_counted_and_left_out(tmp_path):
    text = "Mary lives in Paris"
    paris = span(text, 14, 19, "LOC")
    export = write_export(tmp_path / "export.json", [
        task(1, text, annotation([paris])),
        task(2, text),  # nobody annotated it
        task(3, text, annotation([paris], cancelled=True)),  # skipped by its annotator
        task(4, text, annotation([])),  # submitted with an empty result
        task(5, text, annotation([paris], 1, cancelled=True), annotation([paris], 2)),  # one cancelled, one kept
        task(6, "   ", annotation([])),
    ])
    sentences, notes = read_ner(recipe(), export)
    assert [s["line"] for s in sentences] == [1, 5]
    assert sentences[0]["tags"] == ["O", "O", "O", "B-LOC"]
    text_notes = " | ".join(notes)
    assert "read 6 Label Studio task(s)" in text_notes and "kept 2" in text_notes
    assert "1 task(s) without annotations" in text_notes
    assert "3 task(s) whose annotations were all cancelled or empty" in text_notes
    assert "2 cancelled annotation(s), 2 annotation(s) with an empty result" in text_notes


def test_an_empty_export_and_one_with_nothing_usable_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="holds no task"):
        read_ner(recipe(), write_export(tmp_path / "empty.json", []))
    only_cancelled = write_export(tmp_path / "cancelled.json", [task(1, "a b", annotation([], cancelled=True)), task(2, "c d")])
    with pytest.raises(DataError, match="no task with a usable annotation.*1 cancelled annotation"):
        read_ner(recipe(), only_cancelled)
    with pytest.raises(DataError, match="expected a list of tasks"):
        read_ner(recipe(), write_export(tmp_path / "dict.json", {"id": 1}))


def test_several_controls_need_label_studio_control(tmp_path):
    text = "John met Mary"
    export = write_export(tmp_path / "export.json", [
        task(1, text, annotation([span(text, 0, 4, "PER", "ner"), span(text, 9, 13, "ORG", "coarse")]))])
    with pytest.raises(DataError, match=r"several <Labels> controls \(coarse, ner\); set data.label_studio_control"):
        read_ner(recipe(), export)
    assert read_ner(recipe(label_studio_control="coarse"), export)[0][0]["tags"] == ["O", "O", "B-ORG"]
    with pytest.raises(DataError, match="'nope': no 'labels' results from that control; the export has: coarse, ner"):
        read_ner(recipe(label_studio_control="nope"), export)


def test_text_field_is_data_text_column(tmp_path):
    export = write_export(tmp_path / "export.json", [
        {"id": 3, "data": {"sentence": "Mary lives"}, "annotations": [annotation([span("Mary lives", 0, 4, "PER")])]}])
    assert read_ner(recipe(text_column="sentence"), export)[0][0]["tokens"] == ["Mary", "lives"]
    with pytest.raises(DataError, match="task 3: no data field 'text' \\(it has: sentence\\); set data.text_column"):
        read_ner(recipe(), export)


def test_a_label_outside_task_labels_names_the_task(tmp_path):
    text = "John met Mary"
    export = write_export(tmp_path / "export.json", [task(1, text, annotation([span(text, 0, 4, "PER")])),
                                                     task(8, text, annotation([span(text, 9, 13, "ORG")]))])
    ner = build_recipe({"task": {"type": "ner", "labels": ["O", "B-PER", "I-PER"]},
                        "data": {"train": "x", "format": "label_studio"}}, "t.toml")
    with pytest.raises(DataError, match="task 8: tag B-ORG \\(label 'ORG'\\) is not in task.labels"):
        read_ner(ner, export)


# --- classification -----------------------------------------------------------------------------


def test_choices_become_the_label_and_several_choices_name_the_task(tmp_path):
    export = write_export(tmp_path / "export.json", [
        task(1, "great film", annotation([choice("pos")]), source="imdb"),
        task(2, "awful plot", annotation([choice("neg")])),
        task(3, "no label yet"),
    ])
    rows, notes = read_classification(recipe("classification"), export, "label")
    assert rows == [{"text": "great film", "source": "imdb", "label": "pos"}, {"text": "awful plot", "label": "neg"}]
    assert any("1 task(s) without annotations" in n for n in notes)

    twice = write_export(tmp_path / "twice.json", [task(5, "fine", annotation([choice("pos", "neg")]))])
    with pytest.raises(DataError, match=r"task 5: 2 choices \['pos', 'neg'\] on a single-label task"):
        read_classification(recipe("classification"), twice, "label")

    fixed = build_recipe({"task": {"type": "classification", "labels": ["neg", "pos"]},
                          "data": {"train": "x", "format": "label_studio"}}, "t.toml")
    other = write_export(tmp_path / "other.json", [task(6, "meh", annotation([choice("neutral")]))])
    with pytest.raises(DataError, match="task 6: label 'neutral' is not in task.labels \\(neg, pos\\)"):
        read_classification(fixed, other, "label")


def test_unlabelled_predict_export_keeps_every_task(tmp_path):
    export = write_export(tmp_path / "export.json", [task(1, "great film", annotation([choice("pos")])), task(2, "new text")])
    rows, _ = read_classification(recipe("classification"), export, "label", unlabelled=True)
    assert [r["text"] for r in rows] == ["great film", "new text"] and all("label" not in r for r in rows)
    # Label Studio's import format: tasks with their data and no `annotations` key at all. They were taken for
    # JSON-MIN records, and the error asked for data.label_studio_control, then for a column named text.
    imported = write_export(tmp_path / "import.json", [{"id": 900, "data": {"text": "to label"}}, {"id": 901, "data": {"text": "b"}}])
    rows, _ = read_classification(recipe("classification"), imported, "label", unlabelled=True)
    assert rows == [{"text": "to label"}, {"text": "b"}]


@pytest.mark.parametrize("start, end, says", [(5, 5, "an empty span"), (10, 3, "start after end"), (40, 60, "outside the text")])
def test_a_span_that_is_empty_or_reversed_is_called_so(start, end, says):
    from peft_ft.data.formats.label_studio import span_offsets

    assert span_offsets("John Smith lives in Paris.", {"start": start, "end": end}).startswith(says)


# --- JSON-MIN -----------------------------------------------------------------------------------


def min_record(task_id: int, text: str, annotation_id: int, created: str = "2024-05-01T10:00:00Z", **control) -> dict:
    return {"text": text, "id": task_id, **control, "annotator": annotation_id, "annotation_id": annotation_id,
            "created_at": created, "updated_at": created, "lead_time": 2.0}


def test_json_min_ner_reads_like_the_json_export(tmp_path):
    text = "John met Mary"
    spans = [{"start": 0, "end": 4, "text": "John", "labels": ["PER"]}, {"start": 9, "end": 13, "text": "Mary", "labels": ["PER"]}]
    export = write_export(tmp_path / "min.json", [
        min_record(1, text, 10, label=spans),
        min_record(1, text, 11, "2024-05-02T10:00:00Z", label=spans[:1]),  # a second annotator on task 1, later
        min_record(2, "Mary slept", 12, label=[{"start": 0, "end": 4, "text": "Mary", "labels": ["PER"]}]),
        min_record(3, "nothing here", 13, label=[]),
    ])
    sentences, notes = read_ner(recipe(), export)
    assert [s["tags"] for s in sentences] == [["B-PER", "O", "B-PER"], ["B-PER", "O"]]
    assert "(JSON-MIN export)" in notes[0] and any("1 annotation(s) with an empty result" in n for n in notes)
    assert read_ner(recipe(annotation_choice="latest"), export)[0][0]["tags"] == ["B-PER", "O", "O"]
    assert [s["line"] for s in read_ner(recipe(annotation_choice="skip_conflicting"), export)[0]] == [2]


def test_json_min_choices_as_string_list_or_dict(tmp_path):
    export = write_export(tmp_path / "min.json", [
        min_record(1, "great film", 1, sentiment="pos"),
        min_record(2, "awful plot", 2, sentiment={"choices": ["neg"]}),
        min_record(3, "so so", 3, sentiment={"choices": ["pos", "neg"]}),
    ])
    with pytest.raises(DataError, match="task 3: 2 choices"):
        read_classification(recipe("classification"), export, "label")
    rows, _ = read_classification(recipe("classification"), write_export(tmp_path / "ok.json", json.loads(export.read_text())[:2]), "label")
    assert [(r["text"], r["label"]) for r in rows] == [("great film", "pos"), ("awful plot", "neg")]


def test_json_min_with_several_candidate_fields_asks_for_the_control(tmp_path):
    export = write_export(tmp_path / "min.json", [min_record(1, "great film", 1, sentiment="pos", title="A review")])
    with pytest.raises(DataError, match=r"several fields could hold the choice \(a string\) \(sentiment, title\)"):
        read_classification(recipe("classification"), export, "label")
    rows, _ = read_classification(recipe("classification", label_studio_control="sentiment"), export, "label")
    assert rows == [{"text": "great film", "title": "A review", "label": "pos"}]


# --- the CoNLL2003 export -----------------------------------------------------------------------


def test_label_studio_conll2003_export_reads_through_the_conll_reader(tmp_path):
    # What Label Studio's CONLL2003 export writes: a -DOCSTART- line, then `word -X- _ TAG`.
    path = tmp_path / "project.conll"
    path.write_text("-DOCSTART- -X- O\nJohn -X- _ B-PER\nlives -X- _ O\nin -X- _ O\nNew -X- _ B-LOC\nYork -X- _ I-LOC\n\n"
                    "Mary -X- _ B-PER\nslept -X- _ O\n", encoding="utf-8")
    sentences = read_conll(path)
    assert [s["tokens"] for s in sentences] == [["John", "lives", "in", "New", "York"], ["Mary", "slept"]]
    assert [s["tags"] for s in sentences] == [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["B-PER", "O"]]


# --- splits and schema --------------------------------------------------------------------------


def test_carve_fractions_is_seeded_stratified_and_extends_carve_validation():
    rows = [{"label": i % 3, "i": i} for i in range(60)]
    keep, validation, test = carve_fractions(rows, [0.1, 0.2], 7, "label")
    assert len(validation) == 6 and len(test) == 12 and len(keep) == 42
    assert sorted(r["i"] for part in (keep, validation, test) for r in part) == list(range(60))
    assert [sum(r["label"] == k for r in test) for k in range(3)] == [4, 4, 4]  # stratified
    # The validation part is exactly what carve_validation holds out with the same seed.
    assert carve_validation(rows, 0.1, 7, "label")[1] == validation
    assert carve_fractions(rows, [0.1, 0.2], 7, "label") == [keep, validation, test]


def test_schema_fields_for_label_studio():
    with pytest.raises(RecipeError, match="set either data.test or data.test_fraction"):
        build_recipe({"task": {"type": "ner"}, "data": {"train": "a", "test": ["b"], "test_fraction": 0.1}}, "t.toml")
    with pytest.raises(RecipeError, match="data.annotation_choice: applies only when data.format is 'label_studio'"):
        build_recipe({"task": {"type": "ner"}, "data": {"train": "a", "annotation_choice": "latest"}}, "t.toml")
    with pytest.raises(RecipeError, match="data.test_fraction: applies only when task.type is 'classification' or 'ner'"):
        build_recipe({"task": {"type": "qa"}, "data": {"train": "a", "test_fraction": 0.1}}, "t.toml")
    with pytest.raises(RecipeError, match="must leave some training data"):
        build_recipe({"task": {"type": "ner"}, "data": {"train": "a", "validation_fraction": 0.5, "test_fraction": 0.5}}, "t.toml")
    with pytest.raises(RecipeError, match="data.format: unknown value 'label_studio'"):
        build_recipe({"task": {"type": "qa"}, "data": {"train": "a", "format": "label_studio"}}, "t.toml")
    shipped = load_recipe(ROOT / "recipes/label_studio_ner_lora.toml")
    assert shipped.data.format == "label_studio" and shipped.data.test_fraction == 0.1


def test_example_script_writes_an_export_the_reader_turns_back_into_the_tags(tmp_path):
    spec = importlib.util.spec_from_file_location("make_ls_example", ROOT / "scripts/make_label_studio_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    conll = tmp_path / "train.txt"
    sentences = [("John lives in New York .", "B-PER O O B-LOC I-LOC O"), ("Acme Corp hired Mary", "B-ORG I-ORG O B-PER"),
                 ("nothing here", "O O"), ("Paris is big", "B-LOC O O"), ("Mary met John", "B-PER O B-PER"),
                 ("Google and Acme", "B-ORG O B-ORG"), ("Berlin wins", "B-LOC O")]
    conll.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(
        "\n".join(f"{w} X X {t}" for w, t in zip(words.split(), tags.split())) for words, tags in sentences) + "\n")
    out = script.main([str(tmp_path / "data"), "--conll", str(conll), "--sentences", "2"])
    assert out == tmp_path / "data/label_studio_example/export.json"
    read, notes = read_ner(load_recipe(ROOT / "recipes/label_studio_ner_lora.toml"), out)
    # Tasks 1-2 plain, 3 agreeing annotators, 4 a disagreeing later one (first kept), 5 cancelled, 6 unannotated.
    assert [s["tags"] for s in read] == [t.split() for _, t in sentences if t != "O O"][:4]
    assert "1 task(s) without annotations" in " ".join(notes) and "2 task(s) had several annotations" in " ".join(notes)


# --- end to end on the tiny BERT ----------------------------------------------------------------


def ner_export(path: Path, n: int) -> Path:
    people, places = ["john", "mary"], ["paris", "london", "berlin"]
    tasks = []
    for i in range(n):
        person, place = people[i % 2], places[i % 3]
        text = f"{person} lives in {place} ."
        result = [span(text, 0, len(person), "PER"), span(text, len(person) + 10, len(person) + 10 + len(place), "LOC")]
        tasks.append(task(i + 1, text, annotation(result)))
    tasks.append(task(n + 1, "john works at acme corp .", annotation([], cancelled=True)))
    return write_export(path, tasks)


def test_ner_end_to_end_from_a_label_studio_export(tiny_bert, tmp_path):
    from helpers import recipe_text
    from peft_ft.engine.run import run

    data = tmp_path / "data"
    data.mkdir()
    ner_export(data / "export.json", 30)
    recipe_path = tmp_path / "ls.toml"
    recipe_path.write_text(recipe_text(tiny_bert, data, train="export.json", model_opts={"max_length": 32}, task={"type": "ner"},
                                       data={"format": "label_studio", "validation_fraction": 0.2, "test_fraction": 0.2},
                                       train_opts={"lr": 5e-3}, output={"dir": tmp_path / "runs"}))
    run_dir = run(load_recipe(recipe_path))
    assert {"splits.json", "predictions_validation.conll", "predictions_test.conll", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    splits = json.loads((run_dir / "splits.json").read_text())
    assert {n: s["size"] for n, s in splits.items()} == {"train": 18, "validation": 6, "test": 6}
    assert splits["test"]["entities"] == {"LOC": 6, "PER": 6} and splits["test"]["source"] == "20% of export.json"
    assert str(tmp_path) not in (run_dir / "splits.json").read_text()  # relative to the data folder: it travels
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 6 and metrics["test"]["entities"] == 12
    log = (run_dir / "train.log").read_text()
    assert "1 cancelled annotation(s)" in log and "test: held out 6 of 30 training sentences" in log
    assert "test: 6 rows; entities: LOC 6, PER 6" in log
    records = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert all(1 <= r["line"] <= 30 for r in records)  # the task ids
    # A text to tag is split into the words the run trained on, punctuation apart: split at whitespace instead,
    # "paris," was one word, and an entity's span swallowed the comma.
    import peft_ft
    from peft_ft.data.formats.label_studio import pre_tokenize

    text = "mary smith, from paris."
    answer = peft_ft.pipeline(run_dir)(text)
    words = pre_tokenize(text)
    assert len(answer.tags) == len(words) == 6  # mary smith , from paris .
    assert {(e["start"], e["end"]) for e in answer} <= {(a, b) for a, _ in words for _, b in words}


def test_runs_on_word_files_split_a_text_at_whitespace():
    from peft_ft.tasks.ner import Words

    conll = build_recipe({"task": {"type": "ner"}, "data": {"train": "train.txt"}}, "test.toml")
    assert Words.of_text("Berlin, Germany.", conll).words == ("Berlin,", "Germany.")
    assert Words.of_text("Berlin, Germany.", recipe()).words == ("Berlin", ",", "Germany", ".")


def test_classification_end_to_end_from_json_min(tiny_bert, tmp_path):
    from helpers import recipe_text, sentiment_rows
    from peft_ft.engine.run import run

    data = tmp_path / "data"
    data.mkdir()
    records = [min_record(i + 1, r["text"], i + 1, sentiment=r["label"]) for i, r in enumerate(sentiment_rows(40))]
    write_export(data / "export.json", records)
    recipe_path = tmp_path / "cls.toml"
    recipe_path.write_text(recipe_text(tiny_bert, data, train="export.json", model_opts={"max_length": 32},
                                       data={"format": "label_studio", "validation_fraction": 0.1, "test_fraction": 0.2},
                                       output={"dir": tmp_path / "runs"}))
    run_dir = run(load_recipe(recipe_path))
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["validation"]["labels"] == {"neg": 2, "pos": 2} and splits["test"]["labels"] == {"neg": 4, "pos": 4}
    assert splits["train"]["size"] == 28
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n"] == 8 and set(metrics["test"]["per_class"]) == {"neg", "pos"}


def test_a_fraction_that_rounds_to_nothing_still_gets_one_row():
    rows = [{"label": i % 2} for i in range(8)]  # 0.05 of 4 rows per label rounds to 0
    keep, validation, test = carve_fractions(rows, [0.05, 0.05], 1, "label")
    assert len(validation) == len(test) == 1 and len(keep) == 6
    assert carve_fractions(rows[:1], [0.5], 1, None) == [rows[:1], []]  # one row stays in training
