"""Label Studio exports as training data: the JSON export and JSON-MIN, for NER and classification.

Pure Python, so every rule is testable on a few hand-written tasks. `data.format = "label_studio"`
reads both export shapes and tells them apart by their records: the JSON export is a list of tasks,
each with `data` and `annotations` (a list, possibly empty); JSON-MIN is a list of flat records (the
task's data fields, the control's name holding its value, and `id`, `annotator`, `annotation_id`,
`created_at`, `updated_at`, `lead_time`), one record per annotation.

What is read, and what is counted and left out (the run log says how many of each):
- the text is `data[<data.text_column>]`; the labels come from `annotations` only (`predictions`,
  i.e. pre-annotations, are ignored), from results of type `labels` (NER) or `choices`
  (classification) of the control `data.label_studio_control`, or of the only such control;
- a task without annotations, a cancelled annotation (`was_cancelled: true`), an annotation with an
  empty result for the control, and a task left with no usable annotation are counted and left out;
- several usable annotations on a task: `data.annotation_choice` keeps the first (earliest
  `created_at`; export order when timestamps are missing), the latest (`updated_at`, else
  `created_at`, else export order), or with `skip_conflicting` keeps the task only when every
  annotation says the same (same spans and labels, or same choices) and counts it otherwise.

NER: the text is split into words by `pre_tokenize` (whitespace separates words; every punctuation
or symbol character is a word of its own, as BERT's basic tokenizer does) and each span's words get
B-/I- tags. A span boundary inside a word, overlapping spans, a span whose `text` does not match its
offsets, or a span with other than one label is an error naming the task id and the offsets: never
silently shifted. Offsets are Python code points; an export that counted UTF-16 code units
(JavaScript) before an emoji is recognised by the span's `text` and read correctly.

Classification: the one choice of the control is the label; several choices is an error naming
the task. With `task.labels` set, a label outside it is an error naming the task.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from peft_ft.data.files import read_text
from peft_ft.errors import DataError
from peft_ft.recipe.schema import Recipe

KINDS = {"ner": "labels", "classification": "choices"}  # task family -> Label Studio result type
# Fields JSON-MIN adds beside the task's data (never text or labels).
MIN_META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement", "was_cancelled"}
SHOWN = 10  # problems listed in one error message


# --- words and tags -----------------------------------------------------------------------------


def is_separate_character(ch: str) -> bool:
    """Punctuation (Unicode P*) and symbols (S*: $ + = ^ | ~ © €, emoji) are words of their own."""
    return unicodedata.category(ch)[0] in "PS"


def pre_tokenize(text: str) -> list[tuple[int, int]]:
    """Word offsets [start, end): runs of characters that are neither whitespace nor punctuation or
    symbols, and each punctuation or symbol character alone. `"Mr. O'Neil (Zürich)"` ->
    Mr . O ' Neil ( Zürich )."""
    words, start = [], None
    for i, ch in enumerate(text):
        if ch.isspace() or is_separate_character(ch):
            if start is not None:
                words.append((start, i))
                start = None
            if not ch.isspace():
                words.append((i, i + 1))
        elif start is None:
            start = i
    if start is not None:
        words.append((start, len(text)))
    return words


def _utf16_offsets(text: str, start: int, end: int) -> tuple[int | None, int | None]:
    """Code-point offsets of UTF-16 code-unit offsets (None where one falls inside a character)."""
    index, units = {}, 0
    for i, ch in enumerate(text):
        index[units] = i
        units += 2 if ord(ch) > 0xFFFF else 1
    index[units] = len(text)
    return index.get(start), index.get(end)


def span_offsets(text: str, value: dict) -> tuple[int, int] | str:
    """A span's [start, end) in code points, or the problem with it."""
    start, end = value.get("start"), value.get("end")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        return f"start/end {start!r}/{end!r} are not character offsets (only <Labels> on <Text> is read)"
    quoted = value.get("text")
    if isinstance(quoted, str) and text[start:end] != quoted:
        s16, e16 = _utf16_offsets(text, start, end)
        if s16 is None or e16 is None or text[s16:e16] != quoted:
            return f"its text {quoted!r} is not the task text at those offsets ({text[start:end]!r}); re-export the task"
        start, end = s16, e16
    if start == end:
        return "an empty span (start = end); remove it or select its text again"
    if start > end:
        return "start after end; re-export the task"
    if not 0 <= start < end <= len(text):
        return f"outside the text (length {len(text)})"
    return start, end


def spans_to_bio(text: str, spans: list[dict], task) -> tuple[list[str], list[str], list[str]]:
    """Words of `text`, their BIO tags from Label Studio `labels` values, and the problems found
    (each naming the task and the span's offsets). Words outside every span are O."""
    words = pre_tokenize(text)
    tags, owner, problems = ["O"] * len(words), [None] * len(words), []
    placed = []
    for value in spans:
        where = f"task {task}: span [{value.get('start')}, {value.get('end')}) {value.get('text', '')!r}"
        labels = value.get("labels")
        if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str) and labels[0]):
            problems.append(f"{where}: labels {labels!r}; a span needs exactly one label")
            continue
        offsets = span_offsets(text, value)
        if isinstance(offsets, str):
            problems.append(f"{where}: {offsets}")
            continue
        placed.append((offsets, labels[0], where))
    for (start, end), label, where in sorted(placed, key=lambda p: p[0]):
        cut = [(s, e) for s, e in words if s < start < e or s < end < e]
        if cut:
            s, e = cut[0]
            problems.append(f"{where}: {'starts' if s < start < e else 'ends'} inside the word {text[s:e]!r} "
                            f"[{s}, {e}); move the boundary to the word's edge in Label Studio")
            continue
        covered = [i for i, (s, e) in enumerate(words) if start <= s and e <= end]
        if not covered:
            problems.append(f"{where}: covers no word (only whitespace)")
            continue
        clash = next((owner[i] for i in covered if owner[i] is not None), None)
        if clash is not None:
            problems.append(f"{where}: overlaps {clash.split(': ', 1)[1]}; BIO tags cannot nest or overlap entities")
            continue
        for n, i in enumerate(covered):
            tags[i], owner[i] = ("B-" if n == 0 else "I-") + label, where
    return [text[s:e] for s, e in words], tags, problems


# --- reading an export --------------------------------------------------------------------------


@dataclass
class Counts:
    tasks: int = 0
    no_annotation: int = 0  # tasks with no annotation at all
    cancelled: int = 0  # annotations
    empty: int = 0  # annotations with an empty result for the control
    unusable: int = 0  # tasks whose annotations were all cancelled or empty
    several: int = 0  # tasks with several usable annotations, one kept
    conflicting: int = 0  # tasks skipped by skip_conflicting
    empty_text: int = 0  # NER tasks whose text has no word
    problems: list[str] = field(default_factory=list)

    def notes(self, kept: int, path: Path, shape: str, choice: str) -> list[str]:
        parts = [(self.no_annotation, "task(s) without annotations"), (self.unusable, "task(s) whose annotations were all cancelled or empty"),
                 (self.conflicting, "task(s) with conflicting annotations (annotation_choice = skip_conflicting)"),
                 (self.empty_text, "task(s) with empty text")]
        dropped = [(self.cancelled, "cancelled annotation(s)"), (self.empty, "annotation(s) with an empty result")]
        notes = [f"read {self.tasks} Label Studio task(s) from {path} ({shape}); kept {kept}"]
        if any(n for n, _ in parts):
            notes.append("left out " + ", ".join(f"{n} {what}" for n, what in parts if n))
        if any(n for n, _ in dropped):
            notes.append("dropped " + ", ".join(f"{n} {what}" for n, what in dropped if n))
        if self.several:
            notes.append(f"{self.several} task(s) had several annotations; kept the {choice} of each")
        return notes


def load_export(path: Path) -> tuple[list[dict], bool]:
    """The export's records and whether it is JSON-MIN (flat records) rather than the JSON export."""
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); export the project as JSON or JSON-MIN") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of tasks (Label Studio's JSON or JSON-MIN export), got a JSON {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: the export holds no task; export the project again after labelling")
    bad = next((i for i, r in enumerate(records, 1) if not isinstance(r, dict)), None)
    if bad:
        raise DataError(f"{path}: record {bad} is not a JSON object; expected Label Studio tasks")
    # `completions`: Label Studio before 1.0; a task with its `data` and nothing else: Label Studio's import format
    # (tasks not yet labelled), not JSON-MIN's flat records
    full = [("annotations" in r or "completions" in r or isinstance(r.get("data"), dict)) for r in records]
    if any(full) and not all(full):
        raise DataError(f"{path}: record {full.index(False) + 1} has no `annotations` while others have; "
                        f"export the whole project in one format (JSON or JSON-MIN)")
    return records, not full[0]


def _result_type(result: dict) -> str:
    return str(result.get("type", "")).lower()


def find_control(tasks: list[dict], kind: str, control: str, path: Path) -> str:
    """The from_name to read: data.label_studio_control, or the only control of this kind."""
    names = sorted({str(r.get("from_name")) for t in tasks for a in _annotations(t) for r in a.get("result") or []
                    if isinstance(r, dict) and _result_type(r) == kind})
    tag = "<Labels>" if kind == "labels" else "<Choices>"
    if control:
        if names and control not in names:
            raise DataError(f"{path}: data.label_studio_control = {control!r}: no {kind!r} results from that control; "
                            f"the export has: {', '.join(names)}")
        return control
    if len(names) > 1:
        raise DataError(f"{path}: results from several {tag} controls ({', '.join(names)}); "
                        f"set data.label_studio_control to the one to read")
    return names[0] if names else ""


def _annotations(task: dict) -> list:
    found = task.get("annotations", task.get("completions")) or []
    return [a for a in found if isinstance(a, dict)] if isinstance(found, list) else []


def _essence(value: dict, kind: str) -> str:
    """What two annotations must share to agree: spans and their labels, or the choices."""
    keys = ("start", "end", "labels") if kind == "labels" else ("choices",)
    return json.dumps({k: value.get(k) for k in keys}, sort_keys=True, ensure_ascii=False)


def _pick(usable: list[tuple[dict, list]], choice: str, kind: str):
    """One (annotation, values) of several, or None when skip_conflicting finds disagreement."""
    if choice == "skip_conflicting":
        views = {tuple(sorted(_essence(v, kind) for v in values)) for _, values in usable}
        return usable[0] if len(views) == 1 else None
    if choice == "first":
        stamps = [a.get("created_at") for a, _ in usable]
        best = min if all(stamps) else None
    else:
        stamps = [a.get("updated_at") or a.get("created_at") for a, _ in usable]
        best = max if all(stamps) else None
    if best is None:  # no timestamps: export order
        return usable[0] if choice == "first" else usable[-1]
    order = range(len(usable))
    # Ties keep export order: the earliest index for `first`, the latest for `latest`.
    return usable[best(order, key=lambda i: (str(stamps[i]), i))]


def annotated_tasks(tasks: list[dict], kind: str, control: str, choice: str, counts: Counts) -> list[tuple]:
    """(task id, task data, values of the kept annotation) for every task that has one."""
    kept = []
    for position, task in enumerate(tasks, 1):
        counts.tasks += 1
        found = _annotations(task)
        if not found:
            counts.no_annotation += 1
            continue
        usable = []
        for annotation in found:
            if annotation.get("was_cancelled"):
                counts.cancelled += 1
                continue
            values = [r.get("value") or {} for r in annotation.get("result") or []
                      if isinstance(r, dict) and _result_type(r) == kind and str(r.get("from_name")) == control]
            if not values:
                counts.empty += 1
                continue
            usable.append((annotation, values))
        if not usable:
            counts.unusable += 1
            continue
        picked = _pick(usable, choice, kind)
        if picked is None:
            counts.conflicting += 1
            continue
        counts.several += len(usable) > 1 and choice != "skip_conflicting"
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        kept.append((task.get("id", position), data, picked[1]))
    return kept


def min_to_tasks(records: list[dict], kind: str, control: str, text_field: str, path: Path) -> tuple[list[dict], str]:
    """JSON-MIN records grouped by task id into the JSON export's shape, and the control read."""
    control = control or _min_control(records, kind, text_field, path)
    tasks: dict = {}
    for position, record in enumerate(records, 1):
        task_id = record.get("id", f"#{position}")
        data = {k: v for k, v in record.items() if k not in MIN_META and k != control}
        task = tasks.setdefault(task_id, {"id": record.get("id", position), "data": data, "annotations": []})
        if control not in record:
            continue  # a task exported without annotation
        result = _min_result(record[control], kind, control, task["id"], path)
        task["annotations"].append({"id": record.get("annotation_id"), "created_at": record.get("created_at"),
                                    "updated_at": record.get("updated_at"), "was_cancelled": bool(record.get("was_cancelled")),
                                    "result": result})
    return list(tasks.values()), control


def _is_span_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "start" in v for v in value)


def _is_choice(value) -> bool:
    return (isinstance(value, str) or (isinstance(value, dict) and "choices" in value)
            or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)))


def _min_control(records: list[dict], kind: str, text_field: str, path: Path) -> str:
    """The one JSON-MIN field holding spans (NER) or choices (classification)."""
    test = _is_span_list if kind == "labels" else _is_choice
    keys = sorted({k for r in records for k in r if k not in MIN_META and k != text_field})
    # A field is the control when every non-empty value of it looks like one.
    found = [k for k in keys if any(r.get(k) not in (None, "", []) for r in records)
             and all(test(r[k]) for r in records if r.get(k) not in (None, "", []))]
    what = "a list of {start, end, text, labels} spans" if kind == "labels" else "the choice (a string)"
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{path}: JSON-MIN export: no field holds {what} (fields: {', '.join(keys)}); "
                        f"set data.label_studio_control to the control's name, or check data.text_column")
    raise DataError(f"{path}: JSON-MIN export: several fields could hold {what} ({', '.join(found)}); "
                    f"set data.label_studio_control to the control's name")


def _min_result(value, kind: str, control: str, task_id, path: Path) -> list[dict]:
    """A JSON-MIN value as the JSON export's result list (empty for an empty value)."""
    if value in (None, "", []):
        return []
    if kind == "labels":
        if not _is_span_list(value):
            raise DataError(f"{path}: task {task_id}: field {control!r} is {value!r}; expected a list of {{start, end, text, labels}} spans")
        return [{"type": "labels", "from_name": control, "value": v} for v in value]
    if isinstance(value, str):
        value = {"choices": [value]}
    elif isinstance(value, list):
        value = {"choices": value}
    if not _is_choice(value):
        raise DataError(f"{path}: task {task_id}: field {control!r} is {value!r}; expected a choice (a string)")
    return [{"type": "choices", "from_name": control, "value": value}]


def read_annotated(recipe: Recipe, path: Path, kind: str) -> tuple[list[tuple], Counts, str]:
    """The kept (task id, data, values) of an export, the counts, and the shape read."""
    d = recipe.data
    records, is_min = load_export(path)
    if is_min:
        tasks, control = min_to_tasks(records, kind, d.label_studio_control, d.text_column, path)
    else:
        tasks, control = records, find_control(records, kind, d.label_studio_control, path)
    counts = Counts()
    kept = annotated_tasks(tasks, kind, control, d.annotation_choice, counts)
    return kept, counts, "JSON-MIN export" if is_min else "JSON export"


def _text(data: dict, field_name: str, task, path: Path) -> str:
    if field_name not in data:
        raise DataError(f"{path}: task {task}: no data field {field_name!r} (it has: {', '.join(map(str, data)) or 'none'}); "
                        f"set data.text_column to the field your labelling config reads ($name in <Text value=\"$name\">)")
    if not isinstance(data[field_name], str):
        raise DataError(f"{path}: task {task}: data field {field_name!r} is {data[field_name]!r}, expected text")
    return data[field_name]


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{path}: {len(problems)} problem(s) in the Label Studio export:\n  " + "\n  ".join(problems[:SHOWN]) + more)


def _no_tasks(path: Path, notes: list[str]) -> DataError:
    return DataError(f"{path}: no task with a usable annotation ({'; '.join(notes)}); check data.label_studio_control and the export")


def read_ner(recipe: Recipe, path: Path) -> tuple[list[dict], list[str]]:
    """Sentences (`tokens`, `tags`, `line` = the task id, `lines`) and notes on what was left out."""
    kept, counts, shape = read_annotated(recipe, path, KINDS["ner"])
    labels = set(recipe.task.labels)
    sentences, problems = [], []
    for task, data, values in kept:
        tokens, tags, found = spans_to_bio(_text(data, recipe.data.text_column, task, path), values, task)
        problems += found
        if not tokens:
            counts.empty_text += 1
            continue
        for tag in sorted({t for t in tags if labels and t not in labels}):
            problems.append(f"task {task}: tag {tag} (label {tag[2:]!r}) is not in task.labels; add {tag} there "
                            f"(task.labels lists NER tags: O, B-TYPE, I-TYPE)")
        sentences.append({"tokens": tokens, "tags": tags, "line": task, "lines": [task] * len(tokens)})
    _raise_problems(path, problems)
    notes = counts.notes(len(sentences), path, shape, recipe.data.annotation_choice)
    if not sentences:
        raise _no_tasks(path, notes)
    return sentences, notes


def read_classification(recipe: Recipe, path: Path, label_column: str, unlabelled: bool = False) -> tuple[list[dict], list[str]]:
    """Rows: the task's data fields plus `label_column` holding the chosen label (with
    `unlabelled`, every task's data fields, annotated or not), and notes on what was left out."""
    if unlabelled:
        records, is_min = load_export(path)
        if is_min:
            records, _ = min_to_tasks(records, "choices", recipe.data.label_studio_control, recipe.data.text_column, path)
        rows = [dict(t.get("data") or {}) for t in records]
        return rows, [f"read {len(rows)} Label Studio task(s) from {path} for prediction"]
    kept, counts, shape = read_annotated(recipe, path, KINDS["classification"])
    labels = recipe.task.labels
    rows, problems = [], []
    for task, data, values in kept:
        _text(data, recipe.data.text_column, task, path)
        choices = [c for v in values for c in (v.get("choices") or [])]
        if len(choices) != 1:
            problems.append(f"task {task}: {len(choices)} choices {choices!r} on a single-label task; keep one choice per task "
                            f"(<Choices choice=\"single\">)")
        elif labels and choices[0] not in labels:
            problems.append(f"task {task}: label {choices[0]!r} is not in task.labels ({', '.join(labels)}); add it there")
        else:
            rows.append({**data, label_column: choices[0]})
    _raise_problems(path, problems)
    notes = counts.notes(len(rows), path, shape, recipe.data.annotation_choice)
    if not rows:
        raise _no_tasks(path, notes)
    return rows, notes


# --- the other way: tagged words to Label Studio spans ------------------------------------------


def bio_to_spans(tokens: list[str], tags: list[str]) -> tuple[str, list[dict]]:
    """The text (words joined by single spaces) and its entity spans as Label Studio `labels`
    values ({start, end, text, labels}). An I- that does not continue its type opens an entity (IOB1)."""
    text, spans, offset, previous = " ".join(tokens), [], 0, "O"
    for token, tag in zip(tokens, tags):
        start, end = offset, offset + len(token)
        offset = end + 1
        kind = tag[2:] if tag != "O" else ""
        if kind and (tag.startswith("B-") or previous[2:] != kind):
            spans.append({"start": start, "end": end, "text": "", "labels": [kind]})
        elif kind:
            spans[-1]["end"] = end
        previous = tag
    for span in spans:
        span["text"] = text[span["start"]:span["end"]]
    return text, spans
