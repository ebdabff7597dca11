"""Readers and BIO rules of peft_ft.data.formats.conll, on a few hand-written lines."""

from __future__ import annotations

import json

import pytest

from peft_ft.data.formats.conll import (
    check_bio_tags,
    check_known_tags,
    fix_iob1,
    iob1_positions,
    label_list,
    read_conll,
    read_jsonl,
    to_bio2,
)
from peft_ft.errors import DataError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def write(tmp_path, text: str, name: str = "data.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_docstart_and_blank_lines(tmp_path):
    sentences = read_conll(write(tmp_path, CONLL))
    assert [s["tokens"] for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s["tags"] for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
    assert sentences[0]["line"] == 3 and sentences[1]["lines"] == [7, 8]


def test_conll_extra_blank_lines_make_no_empty_sentence(tmp_path):
    text = "\n\n-DOCSTART- O\n\n\n\na O\n\n\n\nb B-X\n\n-DOCSTART- O\n\n"
    assert [s["tokens"] for s in read_conll(write(tmp_path, text))] == [["a"], ["b"]]


def test_conll_no_final_newline_and_trailing_whitespace(tmp_path):
    text = "John B-PER  \t\nlives O \r\nin O\nParis B-LOC"
    sentences = read_conll(write(tmp_path, text))
    assert sentences == [{"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"], "line": 1, "lines": [1, 2, 3, 4]}]


def test_tag_first_tab_separated_with_comments(tmp_path):
    # MIT-restaurant style: tag first, a tab, then the token (which may hold a space in tab mode).
    text = "# a comment\nB-Rating\t2\nI-Rating\tstar\nO\tnew york\n\n# another\nB-Cuisine\tthai\n"
    sentences = read_conll(write(tmp_path, text), token_column=1, tag_column=0, separator="tab", comment_prefix="#")
    assert [s["tokens"] for s in sentences] == [["2", "star", "new york"], ["thai"]]
    assert [s["tags"] for s in sentences] == [["B-Rating", "I-Rating", "O"], ["B-Cuisine"]]
    assert sentences[1]["lines"] == [7]


def test_a_token_line_that_opens_with_the_comment_prefix_is_a_token(tmp_path):
    """A tweet's `#NBA B-ORG` was skipped as a comment: its token left training and its entity left the scores."""
    text = "# sent 1\nLoving\tO\nthe\tO\n#NBA\tB-ORG\nfinals\tO\n\n# sent 2: two words\n#1\tO\n"
    sentences = read_conll(write(tmp_path, text), separator="tab", comment_prefix="#")
    assert [s["tokens"] for s in sentences] == [["Loving", "the", "#NBA", "finals"], ["#1"]]
    assert [s["tags"] for s in sentences] == [["O", "O", "B-ORG", "O"], ["O"]]
    text = "# newdoc id = 3\nJohn B-PER\n# O\n# a comment here\n"  # whitespace columns: "# O" is a token, "# a ..." is not
    (sentence,) = read_conll(write(tmp_path, text), comment_prefix="#")
    assert sentence["tokens"] == ["John", "#"] and sentence["tags"] == ["B-PER", "O"]


def test_space_separator(tmp_path):
    sentences = read_conll(write(tmp_path, "a NN O\nb NN B-X\n"), separator="space")
    assert sentences[0]["tags"] == ["O", "B-X"]


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = write(tmp_path, "EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(DataError, match=r"data\.txt: line 2: 3 column\(s\) where the file's first line has 4"):
        read_conll(path)


def test_single_column_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="line 1: one column"):
        read_conll(write(tmp_path, "word\n"))


def test_tab_separator_on_space_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="check data.separator"):
        read_conll(write(tmp_path, "EU NNP B-NP B-ORG\n"), separator="tab")


def test_jsonl_tokens_tags_and_empty_sentence(tmp_path):
    rows = [{"tokens": ["John", "lives"], "tags": ["B-PER", "O"]}, {"tokens": [], "tags": []}, {"tokens": ["Paris"], "tags": ["B-LOC"]}]
    path = write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows) + "\n", "data.jsonl")
    sentences, empty = read_jsonl(path)
    assert empty == 1
    assert [s["tokens"] for s in sentences] == [["John", "lives"], ["Paris"]]
    assert [s["line"] for s in sentences] == [1, 3]


def test_jsonl_custom_fields_integer_tags_and_errors(tmp_path):
    path = write(tmp_path, json.dumps({"words": ["a", "b"], "ner_tags": [1, 0]}) + "\n", "d.jsonl")
    sentences, _ = read_jsonl(path, tokens_field="words", tags_field="ner_tags", labels=["O", "B-X"])
    assert sentences[0]["tags"] == ["B-X", "O"]
    with pytest.raises(DataError, match="integer tag 1; list the tag names"):
        read_jsonl(path, tokens_field="words", tags_field="ner_tags")
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: no field 'tokens'"):
        read_jsonl(path)
    bad = write(tmp_path, json.dumps({"tokens": ["a"], "tags": []}) + "\n", "bad.jsonl")
    with pytest.raises(DataError, match="line 1: 1 tokens but 0 tags"):
        read_jsonl(bad)


def test_iob1_detected_and_converted():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]
    assert iob1_positions(tags) == [0, 3, 6]
    assert to_bio2(tags) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]
    assert iob1_positions(["B-PER", "I-PER", "O"]) == []


def test_fix_iob1_converts_or_reports(tmp_path):
    sentences = [{"tokens": ["a", "b"], "tags": ["I-X", "I-X"], "line": 5, "lines": [5, 6]}]
    with pytest.raises(DataError, match="f.txt: line 5: tag 'I-X' opens an entity"):
        fix_iob1([dict(s) for s in sentences], "f.txt", convert=False)
    assert fix_iob1(sentences, "f.txt", convert=True) == 1
    assert sentences[0]["tags"] == ["B-X", "I-X"]


def test_non_bio_tags_and_unknown_tags_are_errors():
    sentence = {"tokens": ["a"], "tags": ["S-PER"], "line": 4, "lines": [4]}
    with pytest.raises(DataError, match="line 4: tag 'S-PER' is not BIO"):
        check_bio_tags([sentence], "f.txt")
    sentence["tags"] = ["B-GPE"]
    with pytest.raises(DataError, match="test.txt: line 4: tag 'B-GPE' never occurs"):
        check_known_tags([sentence], ["O", "B-PER", "I-PER"], "test.txt", "never occurs in training")


def test_label_list_is_stable_and_pairs_b_with_i():
    assert label_list({"I-PER", "O", "B-LOC", "B-PER"}) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
