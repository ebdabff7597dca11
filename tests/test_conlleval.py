"""peft_ft.tasks.conlleval scores as the CoNLL `conlleval` perl script does (cases worked out by hand from
its startOfChunk / endOfChunk rules; the module was also checked against the script on 1,000 random
tag sequences while it was written)."""

from __future__ import annotations

import pytest

from peft_ft.tasks.conlleval import chunks, read_conll_columns, score


def test_an_entity_opening_with_i_is_an_entity():
    gold = [["O", "B-PER", "I-PER", "O"]]
    predicted = [["O", "I-PER", "I-PER", "O"]]  # seqeval strict drops this one; conlleval reads PER [1, 3)
    assert chunks(predicted[0]) == [("PER", 1, 3)]
    result = score(gold, predicted)
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert result["accuracy"] == 0.75


def test_chunks_break_at_type_changes_and_b_tags():
    assert chunks(["B-PER", "I-LOC", "I-LOC", "B-LOC", "O", "I-ORG"]) == [("PER", 0, 1), ("LOC", 1, 3), ("LOC", 3, 4), ("ORG", 5, 6)]
    assert chunks(["O", "O"]) == []
    assert chunks(["I-MISC"]) == [("MISC", 0, 1)]


def test_partial_matches_count_as_wrong_and_per_type_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    result = score(gold, predicted)
    # gold chunks: PER, LOC, ORG; predicted: PER (too short), LOC, ORG, MISC; correct: LOC, ORG
    assert result["entities"] == 3 and result["predicted_entities"] == 4
    assert result["precision"] == pytest.approx(2 / 4) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert result["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_type"]["MISC"]["support"] == 0 and result["per_type"]["LOC"]["f1"] == 1.0
    assert result["accuracy"] == pytest.approx(4 / 6)


def test_sentences_do_not_run_into_each_other():
    # the same I-PER at the end of one sentence and the start of the next are two entities
    result = score([["I-PER"], ["I-PER"]], [["I-PER"], ["I-PER"]])
    assert result["entities"] == 2 and result["f1"] == 1.0


def test_types_with_hyphens_split_at_the_first_one():
    assert chunks(["B-MISC-X", "I-MISC-X"]) == [("MISC-X", 0, 2)]


def test_reading_token_gold_predicted_lines():
    text = "John B-PER B-PER\nSmith I-PER O\n\n-X- O O\nParis B-LOC I-LOC\n"
    gold, predicted = read_conll_columns(text)
    assert gold == [["B-PER", "I-PER"], ["B-LOC"]] and predicted == [["B-PER", "O"], ["I-LOC"]]
    with pytest.raises(ValueError, match="expected `token gold predicted`"):
        read_conll_columns("John B-PER\n")


def test_mismatched_sentence_lengths_are_refused():
    with pytest.raises(ValueError, match="2 gold tags and 1 predicted"):
        score([["O", "O"]], [["O"]])
