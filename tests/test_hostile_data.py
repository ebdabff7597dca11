"""Malformed data files are refused with the file and row, or read as the user meant them; never read wrongly
in silence. Each case here was found by feeding peft-ft broken files: before, it crashed with a traceback
(exit 1) or trained on rows it had lost or labels it had mapped to the wrong class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_ft.data.files import read_table, resolve_data_dir, resolve_file
from peft_ft.data.formats import conll, squad
from peft_ft.errors import DataError
from peft_ft.recipe.load import build_recipe
from peft_ft.tasks import TASKS

TEXTS = [f"text {i}" for i in range(8)]


def classify(tmp_path: Path, train: str, test: str | None = None, **sections):
    data = {"dir": str(tmp_path), "train": train, **({"test": [test]} if test else {}), **sections.pop("data", {})}
    recipe = build_recipe({"data": data, **sections}, str(tmp_path / "r.toml"))
    return TASKS["classification"].load(recipe, tmp_path)


def csv_file(path: Path, labels: list, header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in zip(TEXTS, labels)))
    return path


def golds(data, split: str) -> list[str]:
    return [data.labels[e["label"]] for e in data.splits[split].examples]


# --- classification labels ---------------------------------------------------------------------------


def test_float_written_ids_are_the_same_classes_as_integer_ids(tmp_path):
    # pandas writes an integer column with a gap as floats: 1.0, 2.0 in train, 1, 2 in a test file.
    csv_file(tmp_path / "train.csv", ["1.0", "2.0", "3.0", "1.0", "2.0", "3.0", "1.0", "2.0"])
    csv_file(tmp_path / "test.csv", ["1", "2", " 3 ", "2.0"])
    data = classify(tmp_path, "train.csv", "test.csv")
    assert data.labels == ["1", "2", "3"]
    assert golds(data, "test") == ["1", "2", "3", "2"]  # before: "1" indexed the names and became "2.0"


def test_integer_ids_index_only_names_the_recipe_gives(tmp_path):
    csv_file(tmp_path / "train.csv", ["entailment", "neutral", "contradiction"] * 2 + ["entailment", "neutral"])
    csv_file(tmp_path / "test.csv", ["0", "1", "2"])
    with pytest.raises(DataError, match=r"test.csv: row 1: label '0' is not among the training labels .*task.labels lists"):
        classify(tmp_path, "train.csv", "test.csv")  # before: 0 became "contradiction", the first name sorted
    data = classify(tmp_path, "train.csv", "test.csv", task={"labels": ["entailment", "neutral", "contradiction"]})
    assert golds(data, "test") == ["entailment", "neutral", "contradiction"]


def test_ids_and_names_mixed_in_training_are_refused(tmp_path):
    rows = [{"text": t, "label": label} for t, label in zip(TEXTS, [1, "pos", "neg", "pos", 0.0, "neg", "pos", "neg"])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl: the training labels mix integer ids \(0, 1\) and names \(neg, pos\)"):
        classify(tmp_path, "train.jsonl")


def test_label_cells_are_trimmed_and_case_clashes_refused(tmp_path):
    csv_file(tmp_path / "train.csv", ["neg", " neg", "pos ", "pos"] * 2)
    data = classify(tmp_path, "train.csv")
    assert data.labels == ["neg", "pos"] and len(data.splits["train"].examples) == 8
    csv_file(tmp_path / "train.csv", ["neg", "pos", "NEG", "pos", "neg", "pos", "neg", "pos"])
    with pytest.raises(DataError, match="'NEG' and 'neg' differ only in case"):
        classify(tmp_path, "train.csv")
    assert classify(tmp_path, "train.csv", task={"labels": ["neg", "NEG", "pos"]}).labels == ["neg", "NEG", "pos"]


def test_nan_written_as_text_is_no_label(tmp_path):
    csv_file(tmp_path / "train.csv", ["neg", "NaN", "pos", "nan", "neg", "pos", "neg", "pos"])
    data = classify(tmp_path, "train.csv")
    assert data.labels == ["neg", "pos"]
    assert any("dropped 2 unlabelled rows" in note for note in data.notes)


@pytest.mark.parametrize("label, kind", [(["pos"], "a list"), ({"name": "pos"}, "a dict"), (0.5, "a fraction")])
def test_a_label_that_is_no_class_names_its_row(tmp_path, label, kind):
    rows = [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXTS)] + [{"text": "x", "label": label}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"train.jsonl: row 9: label .* is {kind}"):
        classify(tmp_path, "train.jsonl")


def test_a_pair_column_that_is_not_text_names_its_row(tmp_path):
    rows = [{"text": t, "pair": "p", "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXTS)]
    rows[3]["pair"] = None
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl: row 4: column 'pair' is None, expected text"):
        classify(tmp_path, "train.jsonl", data={"text_pair_column": "pair"})


# --- tables ------------------------------------------------------------------------------------------


def test_a_repeated_header_name_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("text,label,label\na,neg,pos\n")
    with pytest.raises(DataError, match=r"t.csv: line 1: the header names column\(s\) 'label' more than once"):
        read_table(tmp_path / "t.csv")


def test_an_unclosed_quote_is_refused_not_read_as_lost_rows(tmp_path):
    good = "".join(f"row {i},pos\n" for i in range(10))
    (tmp_path / "mid.csv").write_text("text,label\n" + good + '"oops an open quote,pos\n' + good)
    with pytest.raises(DataError, match=r"mid.csv: lines 12-22: 1 field\(s\) where the header has 2; a quote opened there is not closed"):
        read_table(tmp_path / "mid.csv")  # before: 11 rows vanished, logged as one "unlabelled" row
    # In the last column the field swallows the rest of the file and the row looks whole.
    (tmp_path / "last.tsv").write_text("label\ttext\n" + "pos\tfine\n" * 3 + 'neg\t"oops\n' + "pos\tmore\n" * 5)
    with pytest.raises(DataError, match=r"last.tsv: lines 5-10: a quote opened on line 5 is never closed"):
        read_table(tmp_path / "last.tsv")
    (tmp_path / "ok.csv").write_text('text,label\n"two\nlines, and a ""quote""",pos\n\nnext,neg\n')
    assert read_table(tmp_path / "ok.csv") == [{"text": 'two\nlines, and a "quote"', "label": "pos"}, {"text": "next", "label": "neg"}]


def test_a_short_row_is_refused_not_dropped_as_unlabelled(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,pos\nb\nc,neg\n")
    with pytest.raises(DataError, match=r"t.csv: line 3: 1 field\(s\) where the header has 2"):
        read_table(tmp_path / "t.csv")


def test_a_text_longer_than_csv_s_default_field_limit_is_read(tmp_path):
    (tmp_path / "t.csv").write_text(f"text,label\n{'x' * 200_000},pos\n")
    assert len(read_table(tmp_path / "t.csv")[0]["text"]) == 200_000


def test_json_records_must_be_objects_and_carry_every_column(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([{"text": "a", "label": "pos"}, "oops"]))
    with pytest.raises(DataError, match=r"train.json: record 2: expected a JSON object"):
        read_table(tmp_path / "train.json")
    rows = [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXTS)]
    del rows[5]["label"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl: record 6: no 'label' \(it has: text\)"):
        classify(tmp_path, "train.jsonl")


def test_paths_that_are_no_readable_file_are_named(tmp_path):
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(DataError, match=r"data.train: .*train.csv is a folder; name a data file in it"):
        resolve_file(tmp_path, "train.csv", "data.train", "r.toml")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(DataError, match=r"data.train: .*loop is a symbolic link that leads to no file"):
        resolve_file(tmp_path, "loop", "data.train", "r.toml")
    os.mkfifo(tmp_path / "pipe.jsonl")  # read, it waited forever for a writer; /dev/zero never ends
    for name in ("pipe.jsonl", "/dev/zero"):
        with pytest.raises(DataError, match=r"data.train: .* is a pipe, socket or device, not a file"):
            resolve_file(tmp_path, name, "data.train", "r.toml")
    with pytest.raises(DataError, match=r"cannot read the file"):
        read_table(tmp_path / "train.csv", "csv")
    recipe = build_recipe({"data": {"dir": str(tmp_path / "loop"), "train": "t.csv"}}, str(tmp_path / "r.toml"))
    with pytest.raises(DataError, match=r"data directory not found; looked in .*loop \(data.dir\)"):
        resolve_data_dir(recipe)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_named(tmp_path):
    path = csv_file(tmp_path / "train.csv", ["neg", "pos"] * 4)
    path.chmod(0)
    with pytest.raises(DataError, match=r"train.csv: cannot read the file \(Permission denied\)"):
        read_table(path)


# --- QA ----------------------------------------------------------------------------------------------


def squad_file(path: Path, qas: list | None = None, articles: list | None = None) -> Path:
    context = "The capital of France is Paris."
    qas = qas if qas is not None else [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 25}]}]
    path.write_text(json.dumps({"data": articles if articles is not None else [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return path


@pytest.mark.parametrize("answers, says", [
    (None, r"question q1: answers is 'None'"),
    ({"text": ["Paris"], "answer_start": [25]}, r"question q1: answers is .*expected a list"),
    (["Paris"], r"question q1: answers is .*expected a list"),
    ([{"text": " ", "answer_start": 3}], r"question q1: answer ' ' at 3: expected a non-blank text"),
])
def test_official_squad_answers_of_the_wrong_shape(tmp_path, answers, says):
    path = squad_file(tmp_path / "s.json", [{"id": "q1", "question": "Capital?", "answers": answers}])
    with pytest.raises(DataError, match=says):
        squad.read_squad_json(path)


@pytest.mark.parametrize("articles, says", [
    (["oops"], r"data\[0\] is a str; expected"),
    ([{"title": "t"}], r"data\[0\].paragraphs is missing; expected"),
    ([{"title": "t", "paragraphs": [{"context": "c"}]}], r"data\[0\].paragraphs\[0\].qas is missing"),
])
def test_official_squad_articles_of_the_wrong_shape(tmp_path, articles, says):
    with pytest.raises(DataError, match=says):  # before: a traceback, or the article's questions silently skipped
        squad.read_squad_json(squad_file(tmp_path / "s.json", articles=articles))


def test_flat_squad_rows_are_checked_each(tmp_path):
    context = "The capital of France is Paris."
    row = {"id": "q1", "question": "Capital?", "context": context, "answers": {"text": ["Paris"], "answer_start": [25]}}
    rows = [row, {**row, "id": "q2", "answers": {"text": "Paris", "answer_start": 25}}]
    with pytest.raises(DataError, match=r"question q2: answers is .*expected"):
        squad.examples_from_rows(rows, "s.jsonl")
    rows = [row, {k: v for k, v in row.items() if k != "answers"}]
    with pytest.raises(DataError, match=r"s.jsonl: record 2: no answers"):
        squad.examples_from_rows(rows, "s.jsonl")


# --- NER ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ["y", "z"]])
def test_a_jsonl_token_that_is_not_text_is_refused(tmp_path, token):
    (tmp_path / "n.jsonl").write_text(json.dumps({"tokens": ["EU", token], "tags": ["B-ORG", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"n.jsonl: line 1: token .* every token is a string"):
        conll.read_jsonl(tmp_path / "n.jsonl")


def test_a_blank_token_in_a_tab_file_is_named(tmp_path):
    (tmp_path / "n.conll").write_text("EU\tB-ORG\n\tO\n")
    with pytest.raises(DataError, match=r"line 2: 1 column\(s\) .* one of its columns is blank"):
        conll.read_conll(tmp_path / "n.conll", separator="tab")


# --- validate ----------------------------------------------------------------------------------------


def test_validate_prints_what_the_reader_dropped(tmp_path, tiny_bert):
    csv_file(tmp_path / "train.csv", ["neg", "", "pos", "neg", "-1", "pos", "neg", "pos"])
    (tmp_path / "r.toml").write_text(f'[model]\nname = "{tiny_bert}"\n[data]\ndir = "{tmp_path}"\ntrain = "train.csv"\n')
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", str(tmp_path / "r.toml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "note: train: dropped 2 unlabelled rows" in done.stdout


def test_a_lone_surrogate_in_training_text_names_its_row(tmp_path):
    # JSON can spell half a UTF-16 pair; the tokenizer raised a TypeError on it in the middle of `run`.
    # The JSON reader refuses it now, naming the line and field, before any row reader sees it.
    rows = [{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXTS)]
    rows[2]["text"] = "caf\ud800"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl: line 3: field 'text': character 3 is a lone UTF-16 surrogate"):
        classify(tmp_path, "train.jsonl")
    (tmp_path / "n.jsonl").write_text(json.dumps({"tokens": ["EU", "\udfff"], "tags": ["B-ORG", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"n.jsonl: line 1: field 'tokens\[1\]': character 0 is a lone UTF-16 surrogate"):
        conll.read_jsonl(tmp_path / "n.jsonl")
    path = squad_file(tmp_path / "s.json", [{"id": "q1", "question": "Capital\ud800?", "answers": [{"text": "Paris", "answer_start": 25}]}])
    with pytest.raises(DataError, match=r"question q1: question: character 7 is a lone UTF-16 surrogate"):
        squad.read_squad_json(path)


def test_validate_refuses_a_question_too_long_for_its_window_as_run_does(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    assert (tiny_bert / "tokenizer.json").is_file()  # read by `tokenizers` alone: validate imports no transformers
    long = "the film " * 40
    squad_file(tmp_path / "train.json", [{"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 25}]},
                                         {"id": "q2", "question": long, "answers": [{"text": "Paris", "answer_start": 25}]}])
    (tmp_path / "r.toml").write_text(f'[model]\nname = "{tiny_bert}"\nmax_length = 64\n[task]\ntype = "qa"\ndoc_stride = 16\n'
                                     f'[data]\ndir = "{tmp_path}"\ntrain = "train.json"\n')
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", str(tmp_path / "r.toml")], capture_output=True, text=True)
    tokens = len(AutoTokenizer.from_pretrained(tiny_bert)(long.lstrip(), add_special_tokens=False)["input_ids"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"train.json: question(s) q2 ({tokens} tokens) leave no more than task.doc_stride (16)" in done.stderr  # before: "valid"
