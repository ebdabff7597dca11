"""A task family added from outside the package, as README's "Adding a task family" describes: keyword spotting.

`keywords` is a multi-label family: each text carries the set of topics it mentions (cinema, nature, city; any
number of them, none included). It has its own `load` (JSONL rows with a list-valued label column), `model_kwargs`
(a multi-label head: one sigmoid output per topic), `encode` (multi-hot float targets), `unpack`, `score`
(micro-F1 and exact match over topic sets) and `answers` (a `FamilyAnswerer` that returns the topics found).

The registry is process-global, so the family is registered in a child process (FAMILY below, written to
tmp_path), which then drives peft-ft's own entry points: `load_recipe` -> `engine.run.run` on the tiny BERT
-> `rundir.load.load_run` + `TASKS["keywords"].answers`, `peft_ft.pipeline`, `serving.predict.AdapterSet`, and
`peft-ft serve`'s server on a free port. The child writes what it saw as JSON; the assertions are here. Nothing
outside the family's own code is touched: its model card, metrics and answers come from its `Task` alone.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_jsonl, write_recipe

TOPICS = {"cinema": ["movie", "film", "plot", "acting"], "nature": ["plants", "water", "light", "sun"],
          "city": ["paris", "london", "berlin"]}
FILLER = ["the", "a", "is", "was", "not", "good", "great", "fine", "what", "how"]


def keyword_rows(n: int, seed: int) -> list[dict]:
    """Texts of filler words and one word of each topic they mention; `topics` lists those topics."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = sorted(t for t in TOPICS if rng.random() < 0.5)
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))] + [rng.choice(TOPICS[t]) for t in topics]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topics": topics})
    return rows


# The family, as a user would write peft_ft/tasks/keywords.py, then the driver.
FAMILY = r'''
import json
import sys
from pathlib import Path

from peft_ft.data.files import Split, TaskData, cap_splits, carve_splits, read_split_rows, require_columns, split_sources
from peft_ft.errors import DataError
from peft_ft.tasks.base import Answers, Card, FamilyAnswerer, Task, register_task, request_text, token_count

THRESHOLD = 0.5


def topic_sets(probs, names):
    return [[n for n, p in zip(names, row) if p >= THRESHOLD] for row in probs]


class TopicFinder(FamilyAnswerer):
    """Texts in, {"topics": [...], "scores": {topic: probability}} out, through the family's encode/predict."""

    task_name = "keywords"

    def __call__(self, inputs, batch_size=32):
        import numpy as np

        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        names = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        _, outputs = self.run_examples([{"text": t} for t in texts], batch_size, names)
        probs = 1 / (1 + np.exp(-np.stack(outputs)))
        answers = [{"topics": found, "scores": {n: round(float(p), 6) for n, p in zip(names, row)}}
                   for found, row in zip(topic_sets(probs, names), probs)]
        return answers[0] if single else answers


def _cost(tokenizer, recipe, text):
    return min(token_count(tokenizer, text), recipe.model.max_length)


@register_task
class Keywords(Task):
    name = "keywords"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    default_metric = "micro_f1"
    metrics = ("micro_f1", "exact_match")
    formats = ("jsonl", "json")
    pipeline_task = "text-classification"
    card = Card(metrics={"micro_f1": ("f1", "micro-F1 over topic sets"), "exact_match": ("exact_match", "topic set exactly right")})
    answers = Answers(
        build=TopicFinder,
        to_input=lambda row, recipe, where: request_text(row, ["text", recipe.data.text_column], where),
        to_answer=lambda o: o,
        cost=_cost,
    )

    def load(self, recipe, data_dir):
        d = recipe.data
        raw = {}
        for name, key, location in split_sources(recipe, data_dir):
            rows = read_split_rows(recipe, location)
            require_columns(rows, {"data.text_column": d.text_column, "data.label_column": d.label_column}, location)
            raw[name] = (location, rows)
        names = list(recipe.task.labels) or sorted({t for r in raw["train"][1] for t in r[d.label_column]})
        splits = {}
        for name, (location, rows) in raw.items():
            examples = []
            for number, row in enumerate(rows, 1):
                topics = row[d.label_column]
                if not isinstance(topics, list) or any(t not in names for t in topics):
                    raise DataError(f"{location}: row {number}: {d.label_column!r} must be a list of {', '.join(names)}; got {topics!r}")
                examples.append({"text": row[d.text_column], "labels": sorted(names.index(t) for t in topics), "row": number})
            splits[name] = Split(name, location, examples)
        splits, notes = carve_splits(splits, recipe, None, "rows")
        cap_splits(splits, recipe)
        return TaskData(splits, names, notes)

    def model_kwargs(self, data):
        return {"num_labels": len(data.labels), "id2label": dict(enumerate(data.labels)),
                "label2id": {n: i for i, n in enumerate(data.labels)}, "problem_type": "multi_label_classification"}

    def encode(self, split, tokenizer, recipe, data):
        enc = tokenizer([e["text"] for e in split.examples], truncation=True, max_length=recipe.model.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        features = []
        for i, e in enumerate(split.examples):
            feature = {**{k: enc[k][i] for k in keys}, "length": len(enc["input_ids"][i])}
            if "labels" in e:  # requests (TopicFinder) have none
                # multi-hot floats: BCEWithLogitsLoss wants float targets
                feature["labels"] = [1.0 if j in e["labels"] else 0.0 for j in range(len(data.labels))]
            features.append(feature)
        return features

    def unpack(self, outputs, batch):
        return list(outputs.logits.float().cpu().numpy())

    def score(self, split, features, outputs, data):
        import numpy as np

        probs = 1 / (1 + np.exp(-np.stack(outputs)))
        predicted = topic_sets(probs, data.labels)
        gold = [[data.labels[j] for j in e["labels"]] for e in split.examples]
        records = [{"row": e["row"], "text": e["text"], "gold": g, "predicted": p,
                    "scores": {n: round(float(q), 6) for n, q in zip(data.labels, row)}}
                   for e, g, p, row in zip(split.examples, gold, predicted, probs)]
        return set_metrics(gold, predicted), records


def set_metrics(gold, predicted):
    hits = sum(len(set(g) & set(p)) for g, p in zip(gold, predicted))
    said, true = sum(map(len, predicted)), sum(map(len, gold))
    return {"micro_f1": 2 * hits / (said + true) if said + true else 1.0,
            "exact_match": sum(set(g) == set(p) for g, p in zip(gold, predicted)) / len(gold), "n": len(gold)}


def serve_once(adapter_set, texts):
    """`peft-ft serve` on a free port: POST /predict/kw once; (status, body)."""
    import time
    import urllib.error
    import urllib.request

    from peft_ft.serving.serve import make_server

    server = make_server(adapter_set, "127.0.0.1", 0)
    server.start()
    deadline = time.monotonic() + 10
    while not server.uvicorn.started and time.monotonic() < deadline:
        time.sleep(0.02)
    request = urllib.request.Request(server.url + "/predict/kw", data=json.dumps({"texts": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    finally:
        server.stop()


if __name__ == "__main__":
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.load import load_run
    from peft_ft.serving.predict import AdapterSet
    from peft_ft.tasks import TASKS

    recipe_path, requests_path, out_path = sys.argv[1:4]
    run_dir = run(load_recipe(recipe_path))
    rows = [json.loads(line) for line in Path(requests_path).read_text().splitlines()]

    # one run folder loaded back by the one loader, answered through the family's Answers
    model, tokenizer, info = load_run(run_dir)
    saved = load_recipe(run_dir / "recipe.toml")
    answers = TASKS["keywords"].answers
    inputs = [answers.to_input(row, saved, f"request {i}") for i, row in enumerate(rows, 1)]
    answerer = answers.build(model, tokenizer, saved)
    direct = [answers.to_answer(o) for o in answerer(inputs, batch_size=8)]
    # peft_ft.pipeline(RUN_DIR): the same builder, over its own load_run, taking the request rows as predict does
    from peft_ft.serving.pipelines import pipeline

    piped = [answers.to_answer(o) for o in pipeline(run_dir)(rows, batch_size=8)]
    # and as `peft-ft predict` / `serve` answer: an AdapterSet of named runs
    adapter_set = AdapterSet({"kw": run_dir}, batch_size=8)
    served = adapter_set.answer("kw", rows)
    seen = {"run_dir": str(run_dir), "info": info, "direct": direct, "piped": piped, "served": served,
            "cost": answers.cost(tokenizer, saved, inputs[0])}
    Path(out_path).write_text(json.dumps(seen))
    seen["http"] = serve_once(adapter_set, [row["text"] for row in rows[:3]])
    Path(out_path).write_text(json.dumps(seen))

'''

RECIPE = """
[model]
name = "{model}"
max_length = 32
[task]
type = "keywords"
[data]
dir = "{data}"
train = "train.jsonl"
validation = "valid.jsonl"
test = ["test.jsonl"]
label_column = "topics"
[adapter]
method = "lora"
[train]
epochs = {epochs}
batch_size = 16
lr = 1e-2
threads = 1
[output]
dir = "{out}"
name = "kw"
"""


def set_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    hits = sum(len(set(g) & set(p)) for g, p in zip(gold, predicted))
    said, true = sum(map(len, predicted)), sum(map(len, gold))
    return {"micro_f1": 2 * hits / (said + true) if said + true else 1.0,
            "exact_match": sum(set(g) == set(p) for g, p in zip(gold, predicted)) / len(gold)}


def run_child(root: Path, tiny_bert: Path, epochs: int) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    """Data, recipe and family script in `root`; the child registers the family, trains, loads back and answers
    the test split's texts."""
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", keyword_rows(96, seed=1))
    write_jsonl(data / "valid.jsonl", keyword_rows(24, seed=2))
    test_rows = keyword_rows(24, seed=3)
    write_jsonl(data / "test.jsonl", test_rows)
    requests = write_jsonl(root / "requests.jsonl", [{"text": r["text"]} for r in test_rows])
    recipe = write_recipe(root / "kw.toml", RECIPE.format(model=tiny_bert, data=data, out=root / "runs", epochs=epochs))
    script = root / "keywords_family.py"
    script.write_text(FAMILY, encoding="utf-8")
    out = root / "seen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.run([sys.executable, str(script), str(recipe), str(requests), str(out)], cwd=root,
                           env=env, capture_output=True, text=True, timeout=300)
    return child, out, test_rows


@pytest.fixture(scope="module")
def keywords(tmp_path_factory, tiny_bert) -> dict:
    """One run of the family (about 20 s): what the child saw, its run folder's files, the test rows."""
    child, out, test_rows = run_child(tmp_path_factory.mktemp("keywords"), tiny_bert, epochs=40)
    assert child.returncode == 0, child.stderr[-4000:]
    seen = json.loads(out.read_text())
    run_dir = Path(seen["run_dir"])
    predictions = {split: [json.loads(line) for line in (run_dir / f"predictions_{split}.jsonl").read_text().splitlines()]
                   for split in ("validation", "test")}
    return {**seen, "run_dir": run_dir, "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "predictions": predictions, "test_rows": test_rows}


def test_the_run_folder_holds_the_familys_head_metrics_and_predictions(keywords):
    run_dir, metrics, info = keywords["run_dir"], keywords["metrics"], keywords["info"]
    # the run folder says which family trained it, with the family's head and label names
    assert info["task"] == "keywords"
    assert info["labels"] == json.loads((run_dir / "labels.json").read_text()) == ["cinema", "city", "nature"]
    assert info["auto_class"] == "AutoModelForSequenceClassification"
    # metrics.json holds the family's metrics, and they are those of the predictions it wrote
    for split, records in keywords["predictions"].items():
        assert len(records) == metrics[split]["n"] == 24
        again = set_metrics([r["gold"] for r in records], [r["predicted"] for r in records])
        assert {k: metrics[split][k] for k in again} == again
    assert [r["gold"] for r in keywords["predictions"]["test"]] == [r["topics"] for r in keywords["test_rows"]]
    # the loop picked the best epoch by the family's default metric and restored it
    train = metrics["train"]
    assert train["best_metric"] == "micro_f1" and train["best_value"] == metrics["validation"]["micro_f1"]
    assert train["history"][-1]["train_loss"] < train["history"][0]["train_loss"]  # it trained
    assert "micro-F1 over topic sets" in (run_dir / "README.md").read_text()


def test_answers_through_load_run_and_adapter_set_match_the_evaluation(keywords):
    direct, served, records = keywords["direct"], keywords["served"], keywords["predictions"]["test"]
    assert len(direct) == len(served) == len(records)
    assert keywords["piped"] == direct  # peft_ft.pipeline: the same model, the same batches
    for d, a, record in zip(direct, served, records):
        # the family's answer shape; a topic is found when its probability is at least 0.5
        assert set(d) == {"topics", "scores"} and set(d["scores"]) == {"cinema", "city", "nature"}
        assert d["topics"] == [t for t, p in d["scores"].items() if p >= 0.5]
        # AdapterSet (`peft-ft predict`, `serve`) adds which adapter answered and whether the input was cut
        assert set(a) == {"adapter", "topics", "scores", "truncated"}
        assert a["adapter"] == "kw" and a["truncated"] is False and a["topics"] == d["topics"]
        assert a["scores"] == pytest.approx(d["scores"], abs=1e-5)
        # the same texts answered as the evaluation predicted them (other batches, other padding)
        assert d["topics"] == record["predicted"]
        assert d["scores"] == pytest.approx(record["scores"], abs=1e-5)
    assert 2 <= keywords["cost"] <= 32  # [CLS] + words + [SEP], within model.max_length


def test_serve_answers_the_family_over_http(keywords):
    # POST /predict/kw {"texts": [...]}: the AdapterSet's answers, as JSON. (serve returns them as they are: its
    # PredictResponse schema lists only the built-in families' answer shapes, so /docs does not describe these.)
    status, body = keywords["http"]
    assert status == 200, body
    assert body["adapter"] == "kw"
    assert len(body["predictions"]) == 3
    for answer, alone in zip(body["predictions"], keywords["served"]):
        assert {k: answer[k] for k in ("adapter", "topics", "truncated")} == {k: alone[k] for k in ("adapter", "topics", "truncated")}
        assert answer["scores"] == pytest.approx(alone["scores"], abs=1e-5)
