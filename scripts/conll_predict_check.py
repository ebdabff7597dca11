"""Score `peft-ft predict`'s NER answers on a run's test sentences against the run's own predictions file.

    python scripts/conll_predict_check.py RUN_DIR/predictions_test.conll ADAPTER_DIR

Reads the sentences (word, gold, predicted) from the run's file, asks `peft-ft predict` (a subprocess, as a
user would) to tag each sentence's words (`tokens` rows), writes `word gold answer-tag` lines from each
answer's `tags`, and scores both files under conlleval rules (peft_ft.tasks.conlleval). Also scores the
entities turned back into tags (B- on each entity's first word), which loses only where the model opened an
entity with I-: the entity scores stay equal, the token accuracy may not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from peft_ft.tasks.conlleval import score


def read_columns(text: str) -> list[list[list[str]]]:
    return [[line.split() for line in block.splitlines()] for block in text.split("\n\n") if block.strip()]


def entity_tags(words: list[str], answer: dict) -> list[str]:
    starts, at = [], 0
    for word in words:
        starts.append(at)
        at += len(word) + 1
    tags = ["O"] * len(words)
    for entity in answer["entities"]:
        inside = [i for i, start in enumerate(starts) if entity["start"] <= start < entity["end"]]
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + entity["entity_group"]
    return tags


def read_run_file(run_file: str) -> list[list[list[str]]]:
    """The run's sentences; a file that is missing, unreadable or not `word gold predicted` lines is the
    user's to fix: one message naming it, exit 2 (not a traceback)."""
    try:
        sentences = read_columns(Path(run_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        fail(f"{run_file}: cannot read it ({reason}); give a run's predictions_test.conll")
    short = next((line for s in sentences for line in s if len(line) < 3), None)
    if not sentences or short is not None:
        found = f"a line {' '.join(short)!r}" if short else "no sentences"
        fail(f"{run_file}: expected 'word gold predicted' lines (a run's predictions_test.conll), found {found}")
    return sentences


def fail(message: str) -> None:
    print(f"conll_predict_check.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", metavar="RUN_FILE", help="a run's predictions_test.conll (word, gold, predicted columns)")
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="the run folder (or adapter folder) peft-ft predict loads")
    args = parser.parse_args(argv)
    if not Path(args.adapter).is_dir():
        fail(f"ADAPTER_DIR {args.adapter}: not a folder; give the run folder of the adapter to check")
    sentences = read_run_file(args.run_file)
    words = [[w[0] for w in s] for s in sentences]
    gold, runs_own = [[w[1] for w in s] for s in sentences], [[w[2] for w in s] for s in sentences]
    with tempfile.TemporaryDirectory() as tmp:
        rows, out = Path(tmp) / "rows.jsonl", Path(tmp) / "answers.jsonl"
        rows.write_text("".join(json.dumps({"tokens": w}) + "\n" for w in words), encoding="utf-8")
        predict = subprocess.run([sys.executable, "-m", "peft_ft", "predict", "--adapter", f"ner={args.adapter}", str(rows),
                                  "--output", str(out)])
        if predict.returncode != 0:  # predict has printed why; its status is ours
            print(f"conll_predict_check.py: peft-ft predict failed (exit {predict.returncode}; its message is above)", file=sys.stderr)
            return predict.returncode
        answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    tags = [a["tags"] for a in answers]
    results = {"run's file": score(gold, runs_own), "predict (tags)": score(gold, tags),
               "predict (entities as tags)": score(gold, [entity_tags(w, a) for w, a in zip(words, answers)])}
    for name, result in results.items():
        print(f"{name:28s}", {k: round(v, 6) for k, v in result.items() if isinstance(v, float)})
    same = tags == runs_own and results["predict (tags)"] == results["run's file"]
    print(f"predict's tags are the run's, word for word, and every score is equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
