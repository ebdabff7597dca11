"""NER answers of `peft-ft predict` are the evaluation's word-level decisions: converted back to
`token gold predicted` lines, they score exactly what the run's own predictions_<split>.conll scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import recipe_text, write_recipe
from peft_ft.tasks.conlleval import chunks, read_conll_columns, score


def conll_file(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    path.write_text("-DOCSTART- O\n\n" + "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n", encoding="utf-8")
    return path


def sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Toy CoNLL sentences; some words split into several subwords of the tiny vocabulary (parisxq ->
    paris ##x ##q), some sentences long enough to be cut into windows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = []
        for _ in range(1 if i % 4 else 5):  # every fourth sentence repeats its pattern: over max_length
            person = rng.choice(["john", "mary", "johnxs"])
            place = rng.choice(["paris", "london", "berlinxq", "acme"])
            s += [(person, "B-PER"), (rng.choice(["lives", "works"]), "O"), ("in", "O"), (place, "B-LOC")]
            if rng.random() < 0.3:
                s += [("corp", "I-LOC")]
            s += [(".", "O")]
        out.append(s)
    return out


def entity_tags(words: list[str], spans: list[tuple[int, int]], answer: dict) -> list[str]:
    """An answer's entities back to one tag per word: B- on the entity's first word, I- on the rest.
    Each entity must cover whole words (no piece of a word, however many subwords it has)."""
    tags = ["O"] * len(words)
    for e in answer["entities"]:
        inside = [i for i, (start, end) in enumerate(spans) if start >= e["start"] and end <= e["end"]]
        assert inside and e["word"] == " ".join(words[i] for i in inside), e
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + e["entity_group"]
    return tags


def as_chunks(tags: list[str]) -> list[str]:
    out = ["O"] * len(tags)
    for kind, start, end in chunks(tags):
        out[start:end] = ["B-" + kind] + ["I-" + kind] * (end - start - 1)
    return out


def test_predict_answers_score_like_the_runs_own_predictions(tmp_path, tiny_bert):
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe
    from peft_ft.serving.predict import run_predict

    data = tmp_path / "data"
    data.mkdir()
    conll_file(data / "train.txt", sentences(60, 0))
    test = sentences(24, 1)
    conll_file(data / "test.txt", test)
    recipe = write_recipe(tmp_path / "ner.toml", recipe_text(
        tiny_bert, data, train="train.txt", model_opts={"max_length": 24}, task={"type": "ner"}, data={"test": ["test.txt"]},
        train_opts={"epochs": 4, "batch_size": 16, "lr": 1e-2}, output={"dir": tmp_path / "runs", "name": "ner"}))
    run_dir = run(load_recipe(recipe))
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["windowed"] > 0  # long sentences were cut
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"tokens": [w for w, _ in s]}) + "\n" for s in test), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    run_predict([f"ner={run_dir}"], str(rows), "auto", None, None, str(out), 8)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(test) and not any(a["truncated"] for a in answers)
    lines = []
    for s, a in zip(test, answers):
        spans, at = [], 0
        for w, _ in s:
            spans.append((at, at + len(w)))
            at += len(w) + 1
        lines += [f"{w} {g} {p}" for (w, g), p in zip(s, entity_tags([w for w, _ in s], spans, a))] + [""]
    ours = score(*read_conll_columns("\n".join(lines)))
    gold, predicted = read_conll_columns((run_dir / "predictions_test.conll").read_text())
    runs_own = score(gold, predicted)
    # Entities (precision, recall, F1, per type, counts) are exactly the run's. conlleval's token accuracy
    # compares raw tags, and an answer gives entities, not tags: an entity the model opened with I- comes
    # back as B-. With the run's tags written the same way, the accuracy is the same too.
    assert {k: v for k, v in ours.items() if k != "accuracy"} == {k: v for k, v in runs_own.items() if k != "accuracy"}
    assert ours["accuracy"] == score(gold, [as_chunks(p) for p in predicted])["accuracy"]
    # Each answer's `tags` are the run's own word tags: from them, conlleval's every line is the run's, accuracy too.
    assert [a["tags"] for a in answers] == predicted
    assert score(gold, [a["tags"] for a in answers]) == runs_own
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert ours["f1"] == metrics["conlleval_f1"] and ours["precision"] == metrics["conlleval_precision"]
