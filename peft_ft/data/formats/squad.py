"""SQuAD v1.1: readers for the official JSON and the flat `datasets` layout, and the official EM/F1.

Pure Python (no torch, no numpy): `peft-ft validate` may use it, and the metric functions are the
official evaluate-v1.1.py logic, written out as small functions so tests can pin them down.

An example is a dict `{"id", "title", "question", "context", "answers": {"text": [...], "answer_start": [...]}}`,
the layout of the Hugging Face `squad` dataset, whichever file it came from.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

from peft_ft.data.files import read_split_rows, read_table, read_text, table_format, unicode_text
from peft_ft.errors import DataError

FLAT_COLUMNS = ("id", "question", "context", "answers")
FLAT_FORMATS = ("jsonl", "parquet")


def read_squad_split(recipe, location: str) -> list[dict]:
    """Examples of one split: official SQuAD JSON (`.json`, or data.format = "squad"), flat JSONL or
    parquet in the `datasets` layout, or a hub split."""
    if recipe.data.hub:
        return examples_from_rows(read_split_rows(recipe, location), location)
    path, fmt = Path(location), recipe.data.format
    if fmt == "squad" or (fmt == "auto" and path.suffix.lower() == ".json"):
        return read_squad_json(path)
    fmt = table_format(path, fmt)
    if fmt not in FLAT_FORMATS:
        raise DataError(f"{path}: SQuAD-style data is read from official .json, or flat .jsonl / .parquet; "
                        f"set data.format to squad, jsonl or parquet")
    return examples_from_rows(read_table(path, fmt), path)


def read_squad_json(path: Path) -> list[dict]:
    """Examples of an official SQuAD file: `{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`."""
    try:
        document = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise DataError(
            f"{path}: not an official SQuAD file (expected {{\"data\": [{{\"paragraphs\": [...]}}]}}); "
            f"for one record per line with id, question, context, answers use .jsonl (data.format = \"jsonl\")"
        )
    examples = []
    for a, article in enumerate(document["data"]):
        where = f"data[{a}]"
        _require(path, where, article, dict, '{"title": ..., "paragraphs": [...]}')
        title = str(article.get("title") or "")
        _require(path, f"{where}.paragraphs", article.get("paragraphs"), list, "a list of {\"context\", \"qas\"}")
        for p, paragraph in enumerate(article["paragraphs"]):
            here = f"{where}.paragraphs[{p}]"
            _require(path, here, paragraph, dict, '{"context": ..., "qas": [...]}')
            _require(path, f"{here}.qas", paragraph.get("qas"), list, "a list of questions")
            context = paragraph.get("context")
            for q, qa in enumerate(paragraph["qas"]):
                _require(path, f"{here}.qas[{q}]", qa, dict, '{"id", "question", "answers": [...]}')
                examples.append({
                    "id": str(qa.get("id", "")),
                    "title": title,
                    "question": qa.get("question"),
                    "context": context,
                    "answers": _official_answers(path, qa.get("id", f"{here}.qas[{q}]"), qa.get("answers", [])),
                })
    return check_examples(examples, path)


def _require(path, where: str, value, kind: type, shape: str) -> None:
    if not isinstance(value, kind):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{path}: {where} is {got}; expected {shape} (the official SQuAD layout)")


def _official_answers(path, qid, answers) -> dict:
    """The official nesting, a list of {"text", "answer_start"}, in the `datasets` layout."""
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        raise DataError(f"{path}: question {qid}: answers is {str(answers)[:80]!r}; expected a list of "
                        f"{{\"text\": ..., \"answer_start\": ...}} records")
    return {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}


def examples_from_rows(rows: list[dict], path) -> list[dict]:
    """Examples from flat rows (JSONL, parquet, a hub split) with id, question, context, answers columns.

    `answers` is `{"text": [...], "answer_start": [...]}` as in `datasets`; a list of
    `{"text", "answer_start"}` records (the official nesting) is accepted too.
    """
    if not rows:
        raise DataError(f"{path}: the split is empty; check the file or the split name")
    missing = [c for c in FLAT_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; a flat SQuAD file needs {', '.join(FLAT_COLUMNS)} "
            f"(answers = {{\"text\": [...], \"answer_start\": [...]}}); the file has: {', '.join(map(str, rows[0]))}"
        )
    examples = []
    for number, row in enumerate(rows, 1):
        lacking = [c for c in FLAT_COLUMNS if c not in row]
        if lacking:
            raise DataError(f"{path}: record {number}: no {', '.join(lacking)}; every record needs {', '.join(FLAT_COLUMNS)}")
        answers = row["answers"]
        if isinstance(answers, list):
            answers = _official_answers(path, row["id"], answers)
        if not isinstance(answers, dict) or not all(isinstance(answers.get(k, []), list) for k in ("text", "answer_start")):
            raise DataError(f"{path}: question {row['id']}: answers is {str(answers)[:80]!r}; expected "
                            f"{{\"text\": [...], \"answer_start\": [...]}}")
        examples.append({
            "id": str(row["id"]),
            "title": str(row.get("title") or ""),
            "question": row["question"],
            "context": row["context"],
            "answers": {"text": list(answers.get("text") or []), "answer_start": list(answers.get("answer_start") or [])},
        })
    return check_examples(examples, path)


def check_examples(examples: list[dict], path) -> list[dict]:
    """Every example has text, at least one answer, each found at its answer_start; ids are unique."""
    seen = set()
    for ex in examples:
        qid = ex["id"]
        if not qid:
            raise DataError(f"{path}: a question has no id; every question needs a unique id (predictions are keyed by it)")
        if qid in seen:
            raise DataError(f"{path}: question id {qid!r} occurs twice; ids must be unique (predictions are keyed by them)")
        seen.add(qid)
        for key in ("question", "context"):
            if not isinstance(ex[key], str) or not ex[key].strip():
                raise DataError(f"{path}: question {qid}: {key} is {ex[key]!r}, expected text")
            unicode_text(ex[key], f"{path}: question {qid}: {key}")
        texts, starts = ex["answers"]["text"], ex["answers"]["answer_start"]
        if not texts:
            raise DataError(f"{path}: question {qid}: no answers; unanswerable (SQuAD v2) questions are not supported")
        if len(texts) != len(starts):
            raise DataError(f"{path}: question {qid}: {len(texts)} answer texts but {len(starts)} answer_start values")
        for text, start in zip(texts, starts):
            check_answer(ex["context"], text, start, qid, path)
    if not examples:
        raise DataError(f"{path}: no questions found")
    return examples


def check_answer(context: str, text, start, qid: str, path) -> None:
    if not isinstance(text, str) or not text.strip() or isinstance(start, bool) or not isinstance(start, int):
        raise DataError(f"{path}: question {qid}: answer {text!r} at {start!r}: expected a non-blank text and an integer answer_start")
    found = context[start : start + len(text)]
    if found != text:
        where = context.find(text)
        hint = f"; the text occurs at {where}" if where >= 0 else "; the text does not occur in the context"
        raise DataError(
            f"{path}: question {qid}: answer_start {start} does not match the answer text {text!r} "
            f"(the context has {found!r} there{hint}); fix answer_start (a character offset into the context)"
        )


# --- the official SQuAD v1.1 metric (evaluate-v1.1.py) ------------------------------------------

_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalized texts (0 when either is empty after normalizing)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(wanted)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    return max(metric(prediction, g) for g in golds)


def squad_metrics(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict:
    """EM and F1 in percent (as the official script prints them), each the max over the gold answers,
    averaged over every question in `golds`; a question without a prediction counts as 0."""
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid in predictions:
            em += best_over_golds(exact_match_score, predictions[qid], answers)
            f1 += best_over_golds(f1_score, predictions[qid], answers)
    n = len(golds)
    return {"exact_match": 100.0 * em / n if n else 0.0, "f1": 100.0 * f1 / n if n else 0.0, "n": n}
