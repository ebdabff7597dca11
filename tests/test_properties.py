"""Property-based: arbitrary recipes and arbitrary tagged files give a result or our clear error
(`PeftFtError`), never another exception."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_ft.data.formats.conll import SEPARATORS, check_bio_tags, fix_iob1, read_conll, read_jsonl
from peft_ft.errors import PeftFtError
from peft_ft.recipe.load import build_recipe
from peft_ft.recipe.schema import Recipe, section_types

SECTIONS = section_types()
KNOWN_KEYS = sorted({f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)})

# TOML values: what tomllib hands back (floats with inf/nan, strings, arrays, tables). Integers are kept
# to 64 bits as TOML specifies, although tomllib reads longer ones: see the test below.
scalars = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["lora", "ia3", "full", "ner", "qa", "seq2seq", "classification", "cuda", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10)
sections = st.dictionaries(keys, values, max_size=6)
raw_recipes = st.dictionaries(st.sampled_from(list(SECTIONS)) | st.text(max_size=8), sections | values, max_size=7)
overrides = st.lists(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(SECTIONS)), keys, st.text(max_size=10))
    | st.text(max_size=20),
    max_size=3,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_recipes, sets=overrides)
def test_build_recipe_returns_a_recipe_or_a_recipe_error(raw, sets):
    try:
        recipe = build_recipe(raw, "fuzz.toml", sets)
    except PeftFtError as e:
        assert str(e).strip()  # a message, naming the recipe
        assert "fuzz.toml" in str(e) or "--set" in str(e)
        return
    assert isinstance(recipe, Recipe)
    for name, cls in SECTIONS.items():  # every accepted value has its declared type
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(recipe, name), f.name)
            declared = hints[f.name]
            if declared in (int, float, str, bool):
                assert type(value) is declared, (name, f.name, value)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.lists(
        st.dictionaries(st.sampled_from(["lr", "epochs", "r", "batch_size", "warmup", "dropout"]),
                        st.integers(-5, 5) | st.floats(-2, 2), max_size=3),
        min_size=1, max_size=1,
    )
)
def test_numbers_out_of_range_are_always_refused_with_their_key(fields):
    section = {k: v for k, v in fields[0].items() if k in ("lr", "epochs", "batch_size", "warmup")}
    adapter = {k: v for k, v in fields[0].items() if k in ("r", "dropout")}
    raw = {"data": {"train": "t.jsonl"}, "train": section, "adapter": adapter}
    try:
        recipe = build_recipe(raw, "fuzz.toml")
    except PeftFtError as e:
        assert any(f"{s}.{k}" in str(e) for s, d in (("train", section), ("adapter", adapter)) for k in d)
        return
    assert recipe.train.lr >= 0 and recipe.train.epochs >= 1 and recipe.train.batch_size >= 1
    assert 0 <= recipe.train.warmup < 1 and recipe.adapter.r >= 1 and 0 <= recipe.adapter.dropout < 1


@pytest.mark.parametrize("value", [float("nan"), 10**400])
def test_nan_and_huge_numbers_are_refused_with_their_key(value):
    try:
        build_recipe({"data": {"train": "t.jsonl"}, "train": {"lr": value}}, "fuzz.toml")
    except PeftFtError as e:
        assert "train.lr" in str(e)
    else:
        raise AssertionError("accepted")


# --- BIO / CoNLL reader ------------------------------------------------------------------------

tokens = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
tags = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-", "X", "-DOCSTART-", ""]) | st.text(max_size=4)
line = st.lists(tokens | tags, max_size=4).map(lambda cols: " ".join(cols)) | st.sampled_from(["", "-DOCSTART- -X- O O", "# c"])
files = st.lists(line, max_size=12).map("\n".join) | st.binary(max_size=60).map(lambda b: b.decode("latin-1"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=files, raw=st.booleans(), token_column=st.integers(-3, 3), tag_column=st.integers(-3, 3),
       separator=st.sampled_from(list(SEPARATORS)), comment=st.sampled_from(["", "#"]), convert=st.booleans())
def test_conll_reader_returns_sentences_or_a_data_error(tmp_path, text, raw, token_column, tag_column, separator, comment, convert):
    path = tmp_path / "fuzz.txt"
    # raw: write the text's code points as bytes (often not UTF-8), else as UTF-8
    path.write_bytes(text.encode("latin-1", "replace") if raw else text.encode("utf-8", "surrogatepass"))
    try:
        sentences = read_conll(path, token_column=token_column, tag_column=tag_column, separator=separator, comment_prefix=comment)
        check_bio_tags(sentences, str(path))
        fix_iob1(sentences, str(path), convert)
    except PeftFtError as e:
        assert str(path) in str(e)
        return
    for s in sentences:
        assert s["tokens"] and len(s["tokens"]) == len(s["tags"]) == len(s["lines"])
        assert all(t == "O" or t[:2] in ("B-", "I-") for t in s["tags"])
        if convert:  # after conversion no I- opens an entity
            assert all(not (t.startswith("I-") and (i == 0 or s["tags"][i - 1][2:] != t[2:])) for i, t in enumerate(s["tags"]))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["tokens", "tags", "x"]), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, max_size=5), labels=st.lists(st.sampled_from(["O", "B-PER", "I-PER"]), max_size=3))
def test_jsonl_tag_reader_returns_sentences_or_a_data_error(tmp_path, rows, labels):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        sentences, empty = read_jsonl(path, labels=labels)
    except PeftFtError as e:
        assert str(path) in str(e)
        return
    assert len(sentences) + empty == len(rows)
    assert all(isinstance(t, str) for s in sentences for t in s["tokens"] + s["tags"])
