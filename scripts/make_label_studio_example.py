"""Write a small Label Studio NER export (JSON) from real sentences of CoNLL-2003, for
recipes/label_studio_ner_lora.toml.

    python scripts/make_label_studio_example.py /tmp/ls-example
    peft-ft run recipes/label_studio_ner_lora.toml --data-dir /tmp/ls-example

Each sentence becomes a task whose `data.text` is its words joined by spaces; its BIO tags become
character-offset spans in one annotation, as Label Studio exports a <Labels name="label"
toName="text"> project. A few tasks show what a real project holds besides: a second annotator
who agrees, one who disagrees (later), a cancelled (skipped) annotation and a task nobody
labelled; the run log counts each. The export is derived from CoNLL-2003 (research use only):
it is written outside the repository, never committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peft_ft.data.files import data_dir_candidates
from peft_ft.data.formats.conll import read_conll
from peft_ft.data.formats.label_studio import bio_to_spans
from peft_ft.recipe.schema import Recipe

EXPORT = "label_studio_example/export.json"  # relative to the data directory; the recipe's data.train
CONLL = "conll2003/train.txt"  # relative to peft-ft's data directory


def default_conll() -> Path:
    """CoNLL-2003's train.txt in the data folder peft-ft itself would use ($PEFT_FT_DATA_DIR, else
    ../shared/data), so the script finds the same data as `peft-ft run`; the first place looked when
    none holds it, for the error to name."""
    places = [folder / CONLL for folder, _ in data_dir_candidates(Recipe(source="make_label_studio_example.py"))]
    return next((p for p in places if p.is_file()), places[0])


def fail(message: str) -> None:
    print(f"make_label_studio_example.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def stamp(minute: int) -> str:
    return f"2024-05-01T{10 + minute // 60:02d}:{minute % 60:02d}:00.000000Z"


def annotation(task_id: int, number: int, spans: list[dict], annotator: int, minute: int, cancelled: bool = False) -> dict:
    result = [{"value": span, "id": f"r{task_id}-{number}-{i}", "from_name": "label", "to_name": "text",
               "type": "labels", "origin": "manual"} for i, span in enumerate(spans)]
    return {"id": number, "completed_by": annotator, "result": [] if cancelled else result, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": stamp(minute), "updated_at": stamp(minute), "lead_time": 20.0,
            "task": task_id, "project": 1}


def make_tasks(sentences: list[dict], count: int) -> list[dict]:
    """`count` annotated tasks from sentences with at least one entity, then four special ones."""
    with_entities = [s for s in sentences if any(t != "O" for t in s["tags"])]
    if len(with_entities) < count + 4:
        fail(f"--sentences {count}: the file has only {len(with_entities)} sentences with entities, and four go to the "
             f"special tasks; ask for at most {max(0, len(with_entities) - 4)}")
    tasks, number = [], 0
    for task_id, sentence in enumerate(with_entities[: count + 4], 1):
        text, spans = bio_to_spans(sentence["tokens"], sentence["tags"])
        number += 1
        annotations = [annotation(task_id, number, spans, 1, task_id % 600)]
        special = task_id - count
        if special == 1:  # a second annotator who agrees
            number += 1
            annotations.append(annotation(task_id, number, spans, 2, task_id % 600 + 1))
        elif special == 2:  # a second annotator, later, who gave the last entity another type
            number += 1
            other = {**spans[-1], "labels": ["ORG" if spans[-1]["labels"] != ["ORG"] else "MISC"]}
            annotations.append(annotation(task_id, number, [*spans[:-1], other], 2, task_id % 600 + 1))
        elif special == 3:  # an annotator who skipped the task
            annotations = [annotation(task_id, number, spans, 2, task_id % 600, cancelled=True)]
        elif special == 4:  # nobody labelled it yet
            annotations = []
        tasks.append({"id": task_id, "data": {"text": text}, "annotations": annotations, "predictions": [], "meta": {},
                      "created_at": stamp(0), "updated_at": stamp(0), "project": 1})
    return tasks


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="data directory to write label_studio_example/export.json into")
    parser.add_argument("--conll", type=Path, help=f"CoNLL-2003 file to read (default: {CONLL} in peft-ft's data folder, "
                        "$PEFT_FT_DATA_DIR, else ../shared/data)")
    parser.add_argument("--sentences", type=int, default=400, help="annotated tasks, besides four special ones (default 400)")
    args = parser.parse_args(argv)
    if args.sentences < 0:  # a negative count would slice from the end: thousands of tasks
        parser.error(f"argument --sentences: expected a whole number of 0 or more, got {args.sentences}")
    conll = args.conll or default_conll()
    if not conll.is_file():
        how = "" if args.conll else " (the default; set $PEFT_FT_DATA_DIR to the data folder)"
        fail(f"--conll {conll}: not found{how}; pass --conll PATH to CoNLL-2003's train.txt")
    tasks = make_tasks(read_conll(conll), args.sentences)
    out = args.data_dir / EXPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(tasks)} tasks to {out}")
    return out


if __name__ == "__main__":
    main()
