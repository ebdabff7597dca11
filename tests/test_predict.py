"""`peft-ft predict`: several adapters on one loaded base, routing, input formats, hot-swap correctness."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from helpers import TEXTS, reference, train_ner, train_sentiment, write_jsonl
from peft_ft.errors import DataError, PeftFtError
from peft_ft.serving.predict import AdapterSet, read_inputs, route


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    return {"pos": train_sentiment(root, tiny_bert, "pos"), "flip": train_sentiment(root, tiny_bert, "flip", flip=True)}


def test_each_adapter_gives_its_own_answers_after_any_sequence_of_switches(runs, tiny_bert):
    import torch
    from transformers import BertModel

    expected = {name: reference(d, TEXTS) for name, d in runs.items()}
    # trained on flipped labels: the two adapters disagree on these clear-cut texts
    disagree = sum(a["label"] != b["label"] for a, b in zip(expected["pos"], expected["flip"]))
    assert disagree >= len(TEXTS) - 1
    adapters = AdapterSet(runs)
    groups = {id(a.group) for a in adapters.adapters.values()}
    assert len(groups) == 1  # one base in memory, both adapters attached to it
    model = adapters.get("pos").group.model
    assert set(model.peft_config) == {"pos", "flip"}
    rows = [{"text": t} for t in TEXTS]
    for name in ["pos", "flip", "flip", "pos", "flip", "pos", "pos"]:
        answers = adapters.answer(name, rows)
        assert [{k: a[k] for k in ("label", "score")} for a in answers] == expected[name]
        assert {a["adapter"] for a in answers} == {name}
        assert model.active_adapter == name
    # the frozen base weights under the adapters are the checkpoint's, untouched by switching
    base = BertModel.from_pretrained(tiny_bert).state_dict()
    compared = 0
    for key, value in model.state_dict().items():
        plain = key.removeprefix("base_model.model.bert.").replace(".base_layer", "")
        if plain in base:
            assert torch.equal(value, base[plain]), key
            compared += 1
    assert compared == len(base)


@pytest.mark.parametrize("second", ["lora", "a"])
def test_an_adapter_named_inside_peft_prefix_loads_its_own_weights_without_peft_warning(runs, second, recwarn):
    """peft warns that a name inside "lora_" "may lead to reinitialization of the adapter weights during loading";
    `check_loaded` checks the weights after every load instead, so users' names (`--adapter lora=...`) work quietly."""
    adapters = AdapterSet({"pos": runs["pos"], second: runs["flip"]})
    assert len({id(a.group) for a in adapters.adapters.values()}) == 1
    assert [{k: a[k] for k in ("label", "score")} for a in adapters.answer(second, [{"text": t} for t in TEXTS])] == \
        reference(runs["flip"], TEXTS)
    assert not [w for w in recwarn if "should not be contained in the prefix" in str(w.message)]


def test_weights_peft_did_not_load_as_saved_are_refused(runs):
    import torch

    from peft_ft.rundir.load import check_loaded, load_run

    model, _, _ = load_run(runs["pos"], adapter_name="pos")
    check_loaded(model, runs["pos"], "pos", "here")  # as loaded: passes
    lora_b = next(p for n, p in model.named_parameters() if "lora_B.pos" in n)
    with torch.no_grad():
        lora_b.zero_()  # what a load that left the adapter at its initial values holds
    with pytest.raises(PeftFtError, match=r"here: peft did not load this adapter's weights as saved under the name 'pos' "
                                          r"\(.*lora_B.weight\); load it under another name"):
        check_loaded(model, runs["pos"], "pos", "here")


def test_answers_come_back_in_input_order_when_batched_by_length(runs):
    # run_inputs sorts inputs by length into batches: answers must still line up with the inputs
    texts = ["great", "the plot of the film was long and the acting was awful", "bad", "the movie was good", "fine"]
    adapters = AdapterSet({"pos": runs["pos"]}, batch_size=2)
    together = adapters.answer("pos", [{"text": t} for t in texts])
    alone = [adapters.answer("pos", [{"text": t}])[0] for t in texts]
    assert [a["label"] for a in together] == [a["label"] for a in alone]
    assert [a["score"] for a in together] == pytest.approx([a["score"] for a in alone], abs=1e-4)


def test_different_head_classes_get_their_own_base_and_real_tag_names(runs, tiny_bert, tmp_path):
    ner = train_ner(tmp_path, tiny_bert)
    adapters = AdapterSet({"ner": ner, "pos": runs["pos"], "flip": runs["flip"]})
    groups = {name: id(a.group) for name, a in adapters.adapters.items()}
    assert groups["pos"] == groups["flip"] != groups["ner"]
    for name in ["ner", "pos", "ner", "flip"]:
        [answer] = adapters.answer(name, [{"text": "mary lives in london ."}])
        assert answer["adapter"] == name
        if name == "ner":
            found = {(e["entity_group"], e["word"], e["start"], e["end"]) for e in answer["entities"]}
            assert ("PER", "mary", 0, 4) in found and ("LOC", "london", 14, 20) in found
        else:
            assert answer["label"] in ("pos", "neg")
    assert set(adapters.describe()["ner"]["labels"]) == {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}


def test_cli_routes_each_row_by_its_field(runs, tmp_path):
    from peft_ft.cli import main

    rows = [{"text": t, "model": "pos" if i % 2 else "flip", "id": f"r{i}"} for i, t in enumerate(TEXTS)]
    out = tmp_path / "answers.jsonl"
    args = ["predict", "--adapter", f"pos={runs['pos']}", "--adapter", f"flip={runs['flip']}", "--adapter-field", "model"]
    assert main([*args, str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    expected = {name: reference(d, TEXTS) for name, d in runs.items()}
    assert [a["row"] for a in answers] == list(range(1, len(TEXTS) + 1))
    assert [a["id"] for a in answers] == [r["id"] for r in rows]
    for i, (row, answer) in enumerate(zip(rows, answers)):
        assert answer["adapter"] == row["model"]
        assert answer["label"] == expected[row["model"]][i]["label"]


def test_cli_reads_text_lines_from_stdin_and_csv(runs, tmp_path, monkeypatch, capsys):
    from peft_ft.cli import main

    expected = reference(runs["flip"], TEXTS[:2])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS[:2]) + "\n"))
    assert main(["predict", "--adapter", f"pos={runs['pos']}", "--adapter", f"flip={runs['flip']}", "--use", "flip"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["label"] for a in answers] == [e["label"] for e in expected] and {a["adapter"] for a in answers} == {"flip"}
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("text,who\n" + "\n".join(f'"{t}",pos' for t in TEXTS[:2]) + "\n")
    assert main(["predict", "--adapter", f"solo={runs['pos']}", str(csv_file)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["label"] for a in answers] == [e["label"] for e in reference(runs["pos"], TEXTS[:2])]


def test_a_json_list_is_read_as_records_not_as_text_lines(tmp_path):
    """A `.json` list (a training file's format, or Label Studio tasks) was read as text lines: 2 records gave 1
    answer for the whole line, and an indented export one answer per line of JSON ("[", "{", ...), exit 0."""
    records = tmp_path / "in.json"
    records.write_text(json.dumps([{"text": "The cat sleeps."}, {"text": "Dog the the."}]))
    assert read_inputs(str(records)) == ([{"text": "The cat sleeps."}, {"text": "Dog the the."}],
                                         [f"{records}: record 1", f"{records}: record 2"])
    tasks = tmp_path / "tasks"  # no extension: the input itself says it is a JSON list
    tasks.write_text(json.dumps([{"id": 7, "data": {"text": "John lives in Paris."}, "annotations": []}], indent=2))
    assert read_inputs(str(tasks))[0] == [{"id": 7, "text": "John lives in Paris."}]
    text = tmp_path / "news.txt"
    text.write_text("[Breaking] storm ahead\nmore rain\n")  # opens with "[" but is no JSON: text lines
    assert read_inputs(str(text))[0] == [{"text": "[Breaking] storm ahead"}, {"text": "more rain"}]
    for content, says in (('{"text": "a"}', "expected a JSON list of records"), ('[{"text": "a"}, 3]', "record 2: expected a JSON object"),
                          ('[{"text": "a", "text": "b"}]', "twice"), ('[{"text": "a"', "line 1: not valid JSON")):
        records.write_text(content)
        with pytest.raises(DataError, match=says):
            read_inputs(str(records))


def test_input_formats_and_where_each_row_came_from(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}, {"text": "bad"}])
    rows, where = read_inputs(str(jsonl))
    assert rows == [{"text": "good"}, {"text": "bad"}] and where == [f"{jsonl}: line 1", f"{jsonl}: line 2"]
    lines = tmp_path / "a.txt"
    lines.write_text("good film\n\n{not json}\n")
    assert read_inputs(str(lines))[0] == [{"text": "good film"}, {"text": "{not json}"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "good"}\n{"text": \n')
    with pytest.raises(DataError, match=r"b\.jsonl: line 2: not valid JSON"):
        read_inputs(str(bad))
    with pytest.raises(DataError, match="input file not found"):
        read_inputs(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("name, content, message", [
    ("stray.csv", 'text,id\n"Hello," he said,1\nok,2\n', r"stray\.csv: line 2: a quoted field has text after its closing quote"),
    ("unclosed.csv", 'a,b,id\nx,"y,r1\nc,d,r2\n', r"unclosed\.csv: lines 2-3: 2 field\(s\) where the header has 3; a quote opened"),
    ("extra.csv", "a,b\nx,y,z\n", r"extra\.csv: line 2: more fields than the header's 2"),
    ("twice.csv", "text,text\na,b\n", r"twice\.csv: line 1: the header names column\(s\) 'text' more than once"),
    ("quotes.tsv", 'text\tid\n"quoted\t3\nberlin\t4\n', r"quotes\.tsv: .*a quote opened"),
    ("dup.jsonl", '{"text": "a", "text": "b"}\n', r"dup\.jsonl: line 1: the key 'text' appears twice in one object"),
    ("nan.jsonl", '{"text": "a", "id": NaN}\n', r"nan\.jsonl: line 1: NaN is not a JSON value"),
    ("inf.jsonl", '{"text": "a", "id": -1e400}\n', r"inf\.jsonl: line 1: the number -1e400 is out of the range of a float"),
    ("lone.jsonl", '{"text": "a"}\n{"text": "b", "id": "x\\udc00"}\n', r"lone\.jsonl: line 2: field 'id': character 1 is a lone UTF-16 surrogate"),
])
def test_input_rows_that_would_be_lost_or_changed_are_refused_naming_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_inputs(str(path))


@pytest.mark.parametrize("name, content, hint", [
    ("lines.json", '{"text": "a"}\n{"text": "b"}\n', "one JSON object per line is JSONL: pass --format jsonl"),
    ("list.jsonl", '[{"text": "a"}]\n', "it holds a JSON list: pass --format json"),
    ("notes.txt", "{draft}\nhello\n", "read as JSONL as its first line opens with '{': pass --format text"),
    ("texts.json", '["a", "b"]', "a list of plain texts: give objects"),
])
def test_a_format_mistake_says_how_the_format_was_chosen_and_what_to_pass(tmp_path, name, content, hint):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as refused:
        read_inputs(str(path))
    assert str(refused.value).startswith(f"{path}: ") and hint in str(refused.value), str(refused.value)


def test_a_named_pipe_is_read_as_a_file(tmp_path):
    """`predict <(zcat rows.jsonl.gz)` gives a pipe's path: it was refused as "a folder or a device"."""
    import os
    import threading

    fifo = tmp_path / "rows"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text('{"text": "good"}\n{"text": "bad"}\n'))
    writer.start()
    rows, where = read_inputs(str(fifo))
    writer.join()
    assert rows == [{"text": "good"}, {"text": "bad"}] and where == [f"{fifo}: line 1", f"{fifo}: line 2"]


def test_output_onto_the_input_file_is_refused_and_the_input_kept(runs, tmp_path, capsys):
    """`--output rows.jsonl rows.jsonl` exited 0 with the rows replaced by their answers."""
    from peft_ft.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "good"}\n')
    assert main(["predict", "--adapter", f"pos={runs['pos']}", str(rows), "--output", str(rows)]) == 2
    assert "is the input file" in capsys.readouterr().err and rows.read_text() == '{"text": "good"}\n'


def test_inputs_split_at_newlines_only_and_stdin_is_read_as_files_are(tmp_path, monkeypatch):
    texts = ["john lives\u2028in paris", "mary\x0cworks", "a\x85b"]
    jsonl = write_jsonl(tmp_path / "u.jsonl", [{"text": t} for t in texts])  # json.dumps escapes them: write them raw
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    assert read_inputs(str(jsonl))[0] == [{"text": t} for t in texts]
    lines = tmp_path / "u.txt"
    lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert read_inputs(str(lines))[0] == [{"text": t} for t in texts]
    big = tmp_path / "big.csv"
    big.write_text('text\n"' + "john lives in paris . " * 7000 + '"\nmary\n', encoding="utf-8")
    assert len(read_inputs(str(big))[0]) == 2  # a field over csv's default 128 KiB limit
    # stdin with Excel's byte-order mark and CRLF: still JSON rows, and no mark inside the first word
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO('\ufeff{"text": "john lives"}\r\n{"text": "mary"}\r\n'.encode())))
    assert read_inputs("-") == ([{"text": "john lives"}, {"text": "mary"}], ["<stdin>: line 1", "<stdin>: line 2"])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"good\nbad \xff film\n")))
    with pytest.raises(DataError, match=r"<stdin>: line 2: not UTF-8"):
        read_inputs("-")
    with pytest.raises(DataError, match="not a file"):
        read_inputs(str(tmp_path))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    assert read_inputs(str(tmp_path / "blank.jsonl")) == ([], [])  # predict then answers nothing and says why


def test_routing_errors_name_the_row_and_the_choices():
    rows, where = [{"text": "a", "m": "x"}, {"text": "b", "m": "z"}], ["in.jsonl: line 1", "in.jsonl: line 2"]
    with pytest.raises(DataError, match=r"in\.jsonl: line 2: field 'm' is 'z'; expected one of the adapters: x, y"):
        route(rows, where, ["x", "y"], None, "m")
    with pytest.raises(PeftFtError, match="2 adapters loaded .*--use NAME.*--adapter-field"):
        route(rows, where, ["x", "y"], None, None)
    with pytest.raises(PeftFtError, match="--use q: no adapter of that name"):
        route(rows, where, ["x", "y"], "q", None)
    with pytest.raises(DataError, match=r"in\.jsonl: line 1: no field 'q' \(--adapter-field\) to pick the adapter by"):
        route(rows, where, ["x", "y"], None, "q")  # was "field 'q' is None"
    assert route(rows, where, ["x"], None, None) == ["x", "x"]
    assert route(rows, where, ["x", "y"], "y", None) == ["y", "y"]


def test_unknown_adapter_and_missing_text_are_clear_errors(runs):
    adapters = AdapterSet({"pos": runs["pos"]})
    with pytest.raises(PeftFtError, match="unknown adapter 'nope'; loaded: pos"):
        adapters.answer("nope", [{"text": "good"}])
    with pytest.raises(DataError, match=r"row 1: expected a text field 'text'; got fields 'sentence'"):
        adapters.answer("pos", [{"sentence": "good"}])


def test_not_a_run_folder_is_named(tmp_path):
    from peft_ft.serving.predict import parse_adapter_args

    with pytest.raises(PeftFtError, match="not a peft-ft run folder.*no peft_ft.json"):
        AdapterSet({"x": tmp_path})
    with pytest.raises(PeftFtError, match="name 'a.b' may use only"):
        parse_adapter_args([f"a.b={tmp_path}"])
    with pytest.raises(PeftFtError, match="--adapter g=: no run folder after '='"):
        parse_adapter_args(["g="])
