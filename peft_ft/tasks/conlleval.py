"""Entity (chunk) scores under the rules of the CoNLL shared tasks' `conlleval` perl script.

The published CoNLL-2003 numbers (and the BERT references quoted beside ours) are conlleval numbers.
conlleval reads a chunk wherever the tags say one starts, whatever came before: an entity opening
with `I-` (after `O` or after another type) is an entity, where seqeval's strict mode drops it. The
rules below are the script's `startOfChunk` / `endOfChunk` (revision of 2004, with `E-`, `[` and
`]` as it has them), applied to each sentence as the script applies them to its lines: a blank line
or the boundary token `-X-` is an `O` outside every chunk and is not counted as a token.

`chunks` is also the grouping of word tags into entities that `peft-ft predict` answers with, so an
answer converted back to tags scores exactly as the tags it came from.
"""

from __future__ import annotations

from collections import Counter


def split_tag(tag: str) -> tuple[str, str]:
    """`B-PER` -> (`B`, `PER`); `O` -> (`O`, ``). The script splits at the first hyphen."""
    prefix, sep, kind = tag.partition("-")
    return (prefix, kind) if sep else (tag, "")


def end_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether a chunk ended at the previous word (conlleval's `endOfChunk`)."""
    ends = (prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}
    if prev_tag not in ("O", ".") and prev_type != kind:
        ends = True
    return ends or prev_tag in ("[", "]")  # bracket chunks have length 1


def start_of_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether a chunk starts at this word (conlleval's `startOfChunk`)."""
    starts = (prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}
    if tag not in ("O", ".") and prev_type != kind:
        starts = True
    return starts or tag in ("[", "]")


def chunks(tags: list[str]) -> list[tuple[str, int, int]]:
    """The chunks of one sentence as conlleval reads them: (type, first word, last word + 1)."""
    found, start, kind = [], None, ""
    prev_tag, prev_type = "O", ""
    for i, tag in enumerate([*tags, "O"]):  # the sentence's blank line closes the last chunk
        t, k = split_tag(tag)
        if start is not None and end_of_chunk(prev_tag, t, prev_type, k):
            found.append((kind, start, i))
            start = None
        if i < len(tags) and start_of_chunk(prev_tag, t, prev_type, k):
            if start is not None:  # a start the script counts without an end before it (pathological tags)
                found.append((kind, start, i))
            start, kind = i, k
        prev_tag, prev_type = t, k
    return found


def score(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """conlleval's overall and per-type precision, recall and F1 (as fractions, not percent) and its
    token accuracy, for sentences of gold and predicted tags. The counting is the script's own, word by
    word: a chunk is correct when both start together with one type and both end together."""
    counts = {"correct": Counter(), "gold": Counter(), "predicted": Counter()}
    right_tags = tokens = 0
    for g_tags, p_tags in zip(gold, predicted, strict=True):
        if len(g_tags) != len(p_tags):
            raise ValueError(f"a sentence has {len(g_tags)} gold tags and {len(p_tags)} predicted tags")
        _count_sentence(g_tags, p_tags, counts)
        right_tags += sum(g == p for g, p in zip(g_tags, p_tags))
        tokens += len(g_tags)
    correct, found_gold, found_predicted = counts["correct"], counts["gold"], counts["predicted"]
    overall = _prf(sum(correct.values()), sum(found_gold.values()), sum(found_predicted.values()))
    return {
        **overall,
        "accuracy": right_tags / tokens if tokens else 0.0,
        "entities": sum(found_gold.values()),
        "predicted_entities": sum(found_predicted.values()),
        "per_type": {k: {**_prf(correct[k], found_gold[k], found_predicted[k]), "support": found_gold[k]}
                     for k in sorted(set(found_gold) | set(found_predicted)) if k},  # the script skips the empty type
    }


def _count_sentence(gold: list[str], predicted: list[str], counts: dict) -> None:
    """The script's main loop over one sentence and the blank line after it (an `O O` line)."""
    last_g, last_p = ("O", ""), ("O", "")
    in_correct = False
    for g_tag, p_tag in [*zip(gold, predicted), ("O", "O")]:
        g, p = split_tag(g_tag), split_tag(p_tag)
        if in_correct:
            g_end, p_end = end_of_chunk(last_g[0], g[0], last_g[1], g[1]), end_of_chunk(last_p[0], p[0], last_p[1], p[1])
            if g_end and p_end and last_p[1] == last_g[1]:
                in_correct = False
                counts["correct"][last_g[1]] += 1
            elif g_end != p_end or p[1] != g[1]:
                in_correct = False
        g_start, p_start = start_of_chunk(last_g[0], g[0], last_g[1], g[1]), start_of_chunk(last_p[0], p[0], last_p[1], p[1])
        if g_start and p_start and p[1] == g[1]:
            in_correct = True
        if g_start:
            counts["gold"][g[1]] += 1
        if p_start:
            counts["predicted"][p[1]] += 1
        last_g, last_p = g, p


def _prf(correct: int, gold: int, predicted: int) -> dict:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def read_conll_columns(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tag sentences from `token ... gold predicted` lines (the last two columns),
    sentences separated by blank lines or `-X-` boundary tokens, as conlleval reads its input."""
    gold, predicted, g, p = [], [], [], []
    for line in [*text.splitlines(), ""]:
        fields = line.split()
        if not fields or fields[0] == "-X-":
            if g:
                gold.append(g)
                predicted.append(p)
            g, p = [], []
            continue
        if len(fields) < 3:
            raise ValueError(f"line {line!r}: expected `token gold predicted`")
        g.append(fields[-2])
        p.append(fields[-1])
    return gold, predicted
