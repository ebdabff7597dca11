"""SQuAD readers (official JSON, flat JSONL / parquet) and the official v1.1 EM/F1, on hand-written cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import write_jsonl
from peft_ft.data.formats.squad import (
    exact_match_score,
    f1_score,
    normalize_answer,
    read_squad_json,
    read_squad_split,
    squad_metrics,
)
from peft_ft.errors import DataError
from peft_ft.recipe.load import build_recipe

CONTEXT = "John lives in Paris. Mary works at Acme Corp in London."


def official(qas: list[dict], context: str = CONTEXT) -> dict:
    return {"version": "1.1", "data": [{"title": "People", "paragraphs": [{"context": context, "qas": qas}]}]}


def qa(qid: str, question: str, *answers: str, starts: list[int] | None = None) -> dict:
    starts = starts if starts is not None else [CONTEXT.index(a) for a in answers]
    return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": s} for a, s in zip(answers, starts)]}


def recipe_for(data_dir: Path, train: str, fmt: str = "auto"):
    return build_recipe({"task": {"type": "qa"}, "data": {"dir": str(data_dir), "train": train, "format": fmt}}, "test.toml")


# --- readers ------------------------------------------------------------------------------------


def test_official_json_gives_one_example_per_question(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(official([qa("q1", "Where does John live?", "Paris", "Paris."), qa("q2", "Who works at Acme?", "Mary")])))
    examples = read_squad_json(path)
    assert [e["id"] for e in examples] == ["q1", "q2"]
    assert examples[0] == {
        "id": "q1", "title": "People", "question": "Where does John live?", "context": CONTEXT,
        "answers": {"text": ["Paris", "Paris."], "answer_start": [14, 14]},
    }


def test_answer_start_that_misses_the_text_names_file_and_question(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(official([qa("q1", "Where?", "Paris"), qa("q-bad", "Who?", "Mary", starts=[3])])))
    with pytest.raises(DataError, match=r"dev\.json: question q-bad: answer_start 3 does not match the answer text 'Mary' "
                                        r"\(the context has 'n li' there; the text occurs at 21\)"):
        read_squad_json(path)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_flat_files_in_the_datasets_layout(tmp_path, suffix):
    rows = [{"id": "a", "title": "People", "question": "Where does John live?", "context": CONTEXT,
             "answers": {"text": ["Paris"], "answer_start": [14]}},
            {"id": "b", "title": "People", "question": "Who works at Acme?", "context": CONTEXT,
             "answers": {"text": ["Mary", "Mary"], "answer_start": [21, 21]}}]
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    examples = read_squad_split(recipe_for(tmp_path, path.name), str(path))
    assert examples == rows


def test_auto_format_reads_json_as_official_squad(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(official([qa("q1", "Where?", "Paris")])))
    examples = read_squad_split(recipe_for(tmp_path, "train.json"), str(tmp_path / "train.json"))
    assert examples[0]["answers"] == {"text": ["Paris"], "answer_start": [14]}
    # A JSON list of flat records is not an official file: the message says what to do.
    (tmp_path / "flat.json").write_text(json.dumps([{"id": "q1"}]))
    with pytest.raises(DataError, match=r"flat\.json: not an official SQuAD file .* use \.jsonl"):
        read_squad_split(recipe_for(tmp_path, "flat.json"), str(tmp_path / "flat.json"))


def test_flat_file_problems_are_named(tmp_path):
    good = {"id": "a", "question": "Where?", "context": CONTEXT, "answers": {"text": ["Paris"], "answer_start": [14]}}
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "Where?", "context": CONTEXT}])
    with pytest.raises(DataError, match=r"t\.jsonl: missing column\(s\) id, answers; .* the file has: question, context"):
        read_squad_split(recipe_for(tmp_path, "t.jsonl"), str(path))
    write_jsonl(path, [good, good])
    with pytest.raises(DataError, match=r"t\.jsonl: question id 'a' occurs twice"):
        read_squad_split(recipe_for(tmp_path, "t.jsonl"), str(path))
    write_jsonl(path, [{**good, "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(DataError, match=r"t\.jsonl: question a: no answers; unanswerable \(SQuAD v2\)"):
        read_squad_split(recipe_for(tmp_path, "t.jsonl"), str(path))
    write_jsonl(path, [{**good, "answers": {"text": ["Paris"], "answer_start": [15]}}])
    with pytest.raises(DataError, match=r"t\.jsonl: question a: answer_start 15 does not match the answer text 'Paris'"):
        read_squad_split(recipe_for(tmp_path, "t.jsonl"), str(path))


SHARED = Path(__file__).resolve().parent.parent.parent / "shared/data/squad_v1.1"


@pytest.mark.skipif(not (SHARED / "validation.json").is_file(), reason="the shared SQuAD files are not on this machine")
def test_the_shared_squad_files_read_cleanly():
    examples = read_squad_json(SHARED / "validation.json")
    assert len(examples) == 1988
    assert sum(len(e["answers"]["text"]) for e in examples) == 7255


# --- the official v1.1 metric ---------------------------------------------------------------------


@pytest.mark.parametrize("text, normalized", [
    ("The  Denver Broncos!", "denver broncos"),
    ("an apple, a pear", "apple pear"),
    ("A.M.", "am"),                   # punctuation goes first, so "a.m." is no article
    ("the-end", "theend"),            # ... and a hyphen joins the words it separated
    ("Theater", "theater"),           # articles only as whole words
    ("  \tParis\n", "paris"),
])
def test_normalization_is_the_official_one(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_single_gold():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # normalized: [cat, sat, on, mat] vs [cat, sat]: precision 2/4, recall 2/2
    assert f1_score("The cat sat on a mat", "a cat sat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("the", "a") == 0.0  # both empty after normalizing: 0, as in the official script
    # common tokens count with their multiplicity: one 'go' and one 'stop' in common, 2/3 each way
    assert f1_score("go go stop", "go stop stop") == pytest.approx(2 / 3)


def test_scores_take_the_best_gold_and_report_percent():
    golds = {
        "q1": ["Carolina Panthers", "Panthers"],   # pred "Carolina Panthers team": F1 0.8 vs the first, 0.5 vs the second
        "q2": ["Denver Broncos", "the Broncos"],    # pred "Broncos!": EM with the second
        "q3": ["Paris"],                            # no prediction: counts as 0
    }
    predictions = {"q1": "Carolina Panthers team", "q2": "Broncos!", "extra": "ignored"}
    scores = squad_metrics(predictions, golds)
    assert scores["n"] == 3
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1.0 + 0.0) / 3)
