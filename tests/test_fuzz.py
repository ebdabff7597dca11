"""Fuzzing the readers and the recipe loader through `peft-ft validate` (in process: `cli.main`): random
bytes and random valid-looking CSV / TSV / JSONL / SQuAD / Label Studio / TOML files and run folders.
The only outcomes are success (exit 0) or the project's own error (exit 2 with an `error:` line); any
other exception escapes `main` and fails the test with its traceback. Example counts are bounded so the
whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import recipe_text
from peft_ft.cli import main
from peft_ft.errors import PeftFtError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Cells a user's export might hold: words, numbers, blanks, quotes, separators, control characters, BOMs.
cells = st.one_of(
    st.sampled_from(["pos", "neg", "", " ", "1", "5", "-1", "0", "nan", "NaN", "null", "\ufeff", '"', "a,b", "a\tb", "é", "\x00"]),
    st.text(max_size=8),
    st.integers(-3, 7),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
)
json_values = st.recursive(cells, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
raw_bytes = st.binary(max_size=200)


def validate(path: Path, capsys) -> int:
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), code
    event(f"exit {code}")  # --hypothesis-show-statistics: both outcomes occur
    if code == 2:
        assert "error: " in err and "Traceback" not in err
    return code


def recipe_file(tmp_path: Path, model: Path, train: str, task: dict | None = None, data: dict | None = None) -> Path:
    """A valid recipe on the fuzzed file `train` (the file is what is fuzzed, not the recipe)."""
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(model, tmp_path, train=train, task=task, data=data, defaults=False), encoding="utf-8")
    return path


def table_text(rows: list[dict], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    sep = "," if suffix == ".csv" else "\t"
    return "text" + sep + "label\n" + "".join(f"{r.get('text', '')}{sep}{r.get('label', '')}\n" for r in rows)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"text": cells, "label": cells}), max_size=8),
       suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]), bom=st.booleans(), junk=raw_bytes | st.just(b""))
def test_classification_tables(tmp_path, tiny_bert, capsys, rows, suffix, bom, junk):
    data = (b"\xef\xbb\xbf" if bom else b"") + table_text(rows, suffix).encode("utf-8", "surrogatepass") + junk
    (tmp_path / f"train{suffix}").write_bytes(data)
    validate(recipe_file(tmp_path, tiny_bert, f"train{suffix}"), capsys)


@FUZZ
@given(document=st.one_of(
    json_values,
    st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({"paragraphs": st.lists(st.fixed_dictionaries({
        "context": cells, "qas": st.lists(st.fixed_dictionaries({"id": cells, "question": cells, "answers": st.lists(
            st.fixed_dictionaries({"text": cells, "answer_start": cells}), max_size=2)}), max_size=2)}), max_size=2)}), max_size=2)}),
), junk=st.booleans())
def test_squad_files(tmp_path, tiny_bert, capsys, document, junk):
    text = json.dumps(document) + ("}" if junk else "")
    (tmp_path / "train.json").write_text(text, encoding="utf-8")
    validate(recipe_file(tmp_path, tiny_bert, "train.json", {"type": "qa"}), capsys)


span = st.fixed_dictionaries({"start": cells, "end": cells, "text": cells, "labels": st.lists(cells, max_size=2)})
result = st.fixed_dictionaries({"type": st.sampled_from(["labels", "choices", "x"]) | cells, "from_name": cells,
                                "value": st.fixed_dictionaries({"start": cells, "end": cells, "text": cells,
                                                                "labels": st.lists(cells, max_size=2),
                                                                "choices": st.lists(cells, max_size=2)})})
ls_task = st.fixed_dictionaries({"id": cells, "data": st.dictionaries(st.sampled_from(["text", "t"]), cells, max_size=2),
                                 "annotations": st.lists(st.fixed_dictionaries({"result": st.lists(result, max_size=3),
                                                                                "was_cancelled": cells}), max_size=2)})
ls_min = st.fixed_dictionaries({"id": cells, "text": cells, "label": st.lists(span, max_size=2) | cells, "sentiment": cells})


@FUZZ
@given(records=st.lists(ls_task, max_size=4) | st.lists(ls_min, max_size=4) | json_values, task=st.sampled_from(["ner", "classification"]))
def test_label_studio_exports(tmp_path, tiny_bert, capsys, records, task):
    (tmp_path / "export.json").write_text(json.dumps(records), encoding="utf-8")
    validate(recipe_file(tmp_path, tiny_bert, "export.json", {"type": task}, {"format": "label_studio"}), capsys)


@FUZZ
@given(lines=st.lists(st.builds(lambda w, t: f"{w} {t}", st.sampled_from(["john", "paris", "é", "the", "\ufeffx"]),
                                st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
                      | st.lists(cells.map(str), max_size=4).map(" ".join) | st.sampled_from(["", "-DOCSTART- -X- O O"]), max_size=10),
       junk=raw_bytes | st.just(b""))
def test_conll_files(tmp_path, tiny_bert, capsys, lines, junk):
    (tmp_path / "train.txt").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    validate(recipe_file(tmp_path, tiny_bert, "train.txt", {"type": "ner"}), capsys)


toml_lines = st.lists(
    st.sampled_from(["[model]", "[data]", "[train]", "[adapter]", "[task]", "[x]", 'train = "t.jsonl"', "epochs = 3", "r = 99999",
                     "max_length = 100000", 'method = "prefix_tuning"', 'type = "seq2seq"', "lr = nan", "seed = -1",
                     "trust_remote_code = true", 'target_modules = ["bogus"]', "= =", "[[data]]"])
    | st.builds(lambda k, v: f"{k} = {json.dumps(v)}", st.text(max_size=6), json_values),
    max_size=8,
)


@FUZZ
@given(body=toml_lines.map("\n".join) | raw_bytes.map(lambda b: b.decode("latin-1")), as_bytes=st.booleans())
def test_recipe_files(tmp_path, tiny_bert, capsys, body, as_bytes):
    (tmp_path / "t.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n', encoding="utf-8")
    path = tmp_path / "fuzz.toml"
    # a model and data folder that exist, so the fuzzed keys are what decides; the body's own [model] overrides
    head = f'[model]\nname = "{tiny_bert}"\n[data]\ndir = "{tmp_path}"\n' if "[model]" not in body and "[data]" not in body else ""
    text = head + body
    path.write_bytes(text.encode("latin-1", "replace") if as_bytes else text.encode("utf-8", "surrogatepass"))
    validate(path, capsys)


# --- run folders: what a loader reads before loading --------------------------------------------------


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory, tiny_bert) -> Path:
    from helpers import train_sentiment

    return train_sentiment(tmp_path_factory.mktemp("fuzz-run"), tiny_bert, "pos")


@FUZZ
@given(cut=st.integers(0, 4000), flip=st.integers(0, 4000), byte=st.integers(0, 255),
       config=st.none() | st.dictionaries(st.sampled_from(["r", "num_virtual_tokens", "rank_pattern", "peft_type"]), cells, max_size=3),
       info=st.none() | st.dictionaries(st.sampled_from(["task", "is_adapter", "base_model", "auto_class", "labels", "method"]), json_values, max_size=4))
def test_run_folder_checks(tmp_path, adapter_folder, cut, flip, byte, config, info):
    """Cut or flipped safetensors bytes, edited adapter_config.json / peft_ft.json: checked (no torch) or refused."""
    from peft_ft.rundir.load import check_run_folder

    # beside the original: the run's local base model is recorded relative to the run folder (peft_ft.rundir.portable)
    folder = shutil.copytree(adapter_folder, adapter_folder.parent / f"{tmp_path.name}-copy", dirs_exist_ok=True)
    weights = folder / "adapter_model.safetensors"
    data = bytearray((adapter_folder / "adapter_model.safetensors").read_bytes())
    if flip < len(data):
        data[flip] = byte
    weights.write_bytes(bytes(data[: max(cut, len(data) // 2)] if cut < len(data) else data))
    for name, changes in (("adapter_config.json", config), ("peft_ft.json", info)):
        if changes is not None:
            original = json.loads((adapter_folder / name).read_text())
            (folder / name).write_text(json.dumps({**original, **changes}))
    try:
        check_run_folder(folder)
    except PeftFtError as e:
        assert str(folder) in str(e) or "copy" in str(e)
