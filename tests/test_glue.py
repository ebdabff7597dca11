"""GLUE: presets on tiny files in GLUE's exact TSV layout, the official metrics, submission files,
regression end to end (LoRA and full) with save -> reload -> same scores. Nothing downloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import recipe_text, write_jsonl, write_recipe
from peft_ft.data.formats import glue
from peft_ft.engine.run import run
from peft_ft.errors import DataError, RecipeError
from peft_ft.recipe.load import load_recipe
from peft_ft.rundir.load import load_run
from peft_ft.tasks import TASKS
from peft_ft.tasks.classification import PredictSplit

CLS = TASKS["classification"]
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "glue"

# Real headers of GLUE's files (glue_data/ as download_glue_data.py writes it).
MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
STSB_COLUMNS = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
SENTENCES = ["the movie was good", "the film is bad", "john lives in paris", "mary works at acme corp",
             "plants need water", "the plot was awful", "what is the answer ?", "who lives in london ?"]


def _tsv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pairs(n: int, offset: int = 0) -> list[tuple[str, str, int]]:
    return [(SENTENCES[(i + offset) % 8], SENTENCES[(i + offset + i % 3) % 8], i % 2) for i in range(n)]


def write_glue(root: Path, task: str, n: int = 6) -> Path:
    """GLUE's folder for `task` under root: train, dev and unlabelled test files in GLUE's layout."""
    p = glue.PRESETS[task]
    d = root / p.folder
    single = [(SENTENCES[i % 8], i % 2) for i in range(n)]
    if task == "cola":  # no header: source, label, original label ("*" = unacceptable), sentence
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", None, [["gj04", y, "" if y else "*", s] for s, y in single])
        _tsv(d / "test.tsv", ["index", "sentence"], [[i, s] for i, (s, _) in enumerate(single)])
    elif task == "sst2":
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", ["sentence", "label"], [[s, y] for s, y in single])
        _tsv(d / "test.tsv", ["index", "sentence"], [[i, s] for i, (s, _) in enumerate(single)])
    elif task == "mrpc":
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                 [[y, 100 + i, 200 + i, a, b] for i, (a, b, y) in enumerate(_pairs(n))])
        (d / "train.tsv").write_text("\ufeff" + (d / "train.tsv").read_text(encoding="utf-8"), encoding="utf-8")  # MSR's BOM
        _tsv(d / "test.tsv", ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [[i, 1, 2, a, b] for i, (a, b, _) in enumerate(_pairs(n))])
    elif task == "qqp":
        header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", header, [[i, 2 * i, 2 * i + 1, a, b, y] for i, (a, b, y) in enumerate(_pairs(n))])
        _tsv(d / "test.tsv", ["id", "question1", "question2"], [[i, a, b] for i, (a, b, _) in enumerate(_pairs(n))])
    elif task == "stsb":
        meta = ["main-captions", "MSRvid", "2012test", "0001", "none", "none"]
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", STSB_COLUMNS + ["score"],
                 [[i, *meta, a, b, f"{(i * 0.7) % 5:.3f}"] for i, (a, b, _) in enumerate(_pairs(n))])
        _tsv(d / "test.tsv", STSB_COLUMNS, [[i, *meta, a, b] for i, (a, b, _) in enumerate(_pairs(n))])
    elif task == "mnli":
        labels = p.labels
        parses = ["( a )", "( b )", "(ROOT a)", "(ROOT b)"]
        _tsv(d / "train.tsv", MNLI_COLUMNS + ["label1", "gold_label"],
             [[i, i, f"{i}e", "fiction", *parses, a, b, labels[i % 3], labels[i % 3]] for i, (a, b, _) in enumerate(_pairs(n))])
        for kind, offset in (("matched", 0), ("mismatched", 3)):
            rows = [[i, i, f"{i}n", "slate", *parses, a, b, *[labels[i % 3]] * 5, labels[i % 3]]
                    for i, (a, b, _) in enumerate(_pairs(n, offset))]
            _tsv(d / f"dev_{kind}.tsv", MNLI_COLUMNS + [f"label{k}" for k in range(1, 6)] + ["gold_label"], rows)
            _tsv(d / f"test_{kind}.tsv", MNLI_COLUMNS, [r[:10] for r in rows])
    else:  # qnli, rte, wnli: header rows; QNLI/RTE string labels, WNLI 0/1
        cols = ["question", "sentence"] if task == "qnli" else ["sentence1", "sentence2"]
        value = (lambda y: y) if task == "wnli" else (lambda y: p.labels[y])
        for name in ("train", "dev"):
            _tsv(d / f"{name}.tsv", ["index", *cols, "label"], [[i, a, b, value(y)] for i, (a, b, y) in enumerate(_pairs(n))])
        _tsv(d / "test.tsv", ["index", *cols], [[i, a, b] for i, (a, b, _) in enumerate(_pairs(n))])
    return root


def glue_recipe(tmp_path: Path, task: str, data: Path, adapter: dict | None = None, model: str = "") -> Path:
    folder = glue.PRESETS[task].folder
    tests = [f"{folder}/dev_matched.tsv", f"{folder}/dev_mismatched.tsv"] if task == "mnli" else [f"{folder}/dev.tsv"]
    predict = [f"{folder}/test_matched.tsv", f"{folder}/test_mismatched.tsv"] if task == "mnli" else [f"{folder}/test.tsv"]
    metric = "pearson" if task == "stsb" else "accuracy"
    return write_recipe(tmp_path / f"{task}.toml", recipe_text(
        model, data, train=f"{folder}/train.tsv", model_opts={"max_length": 32}, task={"glue": task},
        data={"test": tests, "predict": predict}, adapter=adapter, train_opts={"batch_size": 4}, eval={"metric": metric},
        output={"dir": tmp_path / "runs"}))


# --- the preset table ---------------------------------------------------------------------------


def test_preset_table_has_the_official_metrics():
    official = {p.name: p.metrics for p in glue.PRESETS.values()}
    assert official == {
        "cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
        "stsb": ("pearson", "spearman"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
        "wnli": ("accuracy",),
    }
    assert [p.name for p in glue.PRESETS.values() if p.regression] == ["stsb"]
    # Every official metric is one the classification family reports and may select by.
    assert {m for p in glue.PRESETS.values() for m in p.metrics} <= set(CLS.metrics)


@pytest.mark.parametrize("task", list(glue.PRESETS))
def test_each_preset_reads_glue_layout(tmp_path, task):
    root = write_glue(tmp_path / "glue_data", task)
    recipe = load_recipe(glue_recipe(tmp_path, task, root))
    data = CLS.load(recipe, root)
    preset = glue.PRESETS[task]
    tests = ["dev_matched", "dev_mismatched"] if task == "mnli" else ["dev"]
    predicts = ["test_matched", "test_mismatched"] if task == "mnli" else ["test"]
    assert list(data.splits) == ["train", *tests, *predicts]
    assert data.labels == (["score"] if preset.regression else list(preset.labels))
    for name, split in data.splits.items():
        assert len(split.examples) == 6, name  # every line read, CoLA's first line (no header) included
        assert any(f"{name}: read 6 rows" in note for note in data.notes)
    train = data.splits["train"].examples
    assert train[0]["text"] == "the movie was good"
    assert ("text_pair" in train[0]) == bool(preset.text_pair)
    if preset.regression:
        assert [e["label"] for e in train[:3]] == pytest.approx([0.0, 0.7, 1.4])
    elif task == "mnli":
        assert [e["label"] for e in train[:3]] == [0, 1, 2]
    elif task in ("qnli", "rte"):  # string labels in the file, hub ids: entailment = 0
        assert [data.labels[e["label"]] for e in train[:2]] == [preset.labels[0], preset.labels[1]]
    else:  # 0 / 1 in the file are the hub's ids
        assert [e["label"] for e in train[:2]] == [0, 1]
    for name in predicts:
        split = data.splits[name]
        assert isinstance(split, PredictSplit) and "label" not in split.examples[0]
        assert [e["index"] for e in split.examples][:2] == ["0", "1"]
    submissions = [data.splits[n].submission for n in predicts]
    assert submissions == (["MNLI-m.tsv", "MNLI-mm.tsv"] if task == "mnli" else [preset.submission])


def test_quotes_and_unicode_line_separators_never_merge_or_split_rows(tmp_path):
    root = tmp_path / "glue_data"
    rows = [['" the movie was good', 1], ['the "plot" was "awful', 0], ["john\u2028lives\x85in paris", 1], ["bad", 0]]
    _tsv(root / "SST-2" / "train.tsv", ["sentence", "label"], rows)
    read, skipped = glue.read_glue_tsv(root / "SST-2" / "train.tsv", glue.PRESETS["sst2"], skip_malformed=False)
    assert [r["sentence"] for r in read] == [r[0] for r in rows] and skipped == []
    assert [r["label"] for r in read] == ["1", "0", "1", "0"]


def test_cola_without_header_keeps_its_first_row(tmp_path):
    path = _tsv(tmp_path / "CoLA" / "dev.tsv", None, [["gj04", 1, "", "the film is good"], ["gj04", 0, "*", "film the good is"]])
    rows, _ = glue.read_glue_tsv(path, glue.PRESETS["cola"], skip_malformed=False)
    assert rows == [{"label": "1", "sentence": "the film is good"}, {"label": "0", "sentence": "film the good is"}]


def test_qqp_malformed_rows_are_skipped_and_reported_with_line_numbers(tmp_path):
    root = write_glue(tmp_path / "glue_data", "qqp")
    train = root / "QQP" / "train.tsv"
    lines = train.read_text().splitlines()
    # A question broken by a newline, as in the real file: two lines with too few fields.
    lines[3:3] = ["7\t14\t15\twhat is the", "answer ?\twho is john ?\t0"]
    train.write_text("\n".join(lines) + "\n")
    data = CLS.load(load_recipe(glue_recipe(tmp_path, "qqp", root)), root)
    assert len(data.splits["train"].examples) == 6
    assert any("train: skipped 2 malformed lines (wrong field count)" in n and "lines 4, 5" in n for n in data.notes)
    # In a test file a skipped row would leave a hole in the submission: an error instead.
    test = root / "QQP" / "test.tsv"
    test.write_text(test.read_text() + "9\tonly one question\n")
    with pytest.raises(DataError, match=r"QQP/test.tsv: line 8: 2 tab-separated fields, the header has 3"):
        CLS.load(load_recipe(glue_recipe(tmp_path, "qqp", root)), root)


def test_a_malformed_row_elsewhere_is_an_error_naming_file_and_line(tmp_path):
    root = write_glue(tmp_path / "glue_data", "rte")
    dev = root / "RTE" / "dev.tsv"
    dev.write_text(dev.read_text() + "6\tjohn lives in paris\tentailment\n")
    with pytest.raises(DataError, match=r"RTE/dev.tsv: line 8: 3 tab-separated fields, the header has 4"):
        CLS.load(load_recipe(glue_recipe(tmp_path, "rte", root)), root)


def test_wrong_layout_and_missing_files_are_clear(tmp_path):
    root = write_glue(tmp_path / "glue_data", "rte")
    _tsv(root / "RTE" / "train.tsv", ["premise", "hypothesis", "label"], [["a", "b", "entailment"]])
    with pytest.raises(DataError, match=r"RTE/train.tsv: line 1: not GLUE's RTE layout: expected a header with 'sentence1'"):
        CLS.load(load_recipe(glue_recipe(tmp_path, "rte", root)), root)
    with pytest.raises(DataError, match=r"data.train: file not found: .*CoLA/train.tsv"):
        CLS.load(load_recipe(glue_recipe(tmp_path, "cola", root)), root)


# --- metrics and submissions ----------------------------------------------------------------------


def test_metric_functions_on_hand_made_predictions():
    gold, predicted = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]  # TP 2, TN 2, FP 1, FN 1
    assert glue.matthews(gold, predicted) == pytest.approx((2 * 2 - 1 * 1) / 3**2)
    assert glue.positive_f1(gold, predicted) == pytest.approx(2 / 3)
    assert glue.positive_f1([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    m = glue.regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])
    assert m == pytest.approx({"pearson": 0.8, "spearman": 0.8, "mse": 0.5})
    m = glue.regression_metrics([1, 2, 3, 4], [1, 4, 9, 16])  # monotone but not linear
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(0.984374, abs=1e-6)
    # A constant prediction has no defined correlation: 0, never NaN (NaN would never lose a comparison... or win one).
    assert glue.regression_metrics([1, 2, 3], [2, 2, 2]) == pytest.approx({"pearson": 0.0, "spearman": 0.0, "mse": 2 / 3})


def test_submission_files_in_glue_format():
    assert glue.submission_text(glue.PRESETS["cola"], ["0", "1"], [1, 0]) == "index\tprediction\n0\t1\n1\t0\n"
    assert glue.submission_text(glue.PRESETS["rte"], [0, 1], [1, 0]) == "index\tprediction\n0\tnot_entailment\n1\tentailment\n"
    assert glue.submission_text(glue.PRESETS["stsb"], [0], [3.14159]) == "index\tprediction\n0\t3.142\n"
    assert [glue.submission_name(glue.PRESETS["mnli"], s) for s in ("test_matched", "test_mismatched")] == ["MNLI-m.tsv", "MNLI-mm.tsv"]
    with pytest.raises(DataError, match="test_matched and test_mismatched"):
        glue.submission_name(glue.PRESETS["mnli"], "test")


# --- recipe checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, problem", [
    ({"task": {"labels": ["a", "b"]}}, "task.labels: task.glue = 'sst2' fixes the labels"),
    ({"task": {"regression": True}}, "task.regression: task.glue = 'sst2' is a classification task"),
    ({"eval": {"metric": "pearson"}}, "eval.metric: 'pearson' scores regression"),
    ({"data": {"hub": "nyu-mll/glue"}}, "data.hub_config: set it to the GLUE task's configuration"),
])
def test_recipe_checks_on_presets(tmp_path, extra, problem):
    text = recipe_text(train="SST-2/train.tsv", task={"glue": "sst2", **extra.get("task", {})}, data=extra.get("data"),
                       eval=extra.get("eval"), defaults=False)
    with pytest.raises(RecipeError, match=problem):
        load_recipe(write_recipe(tmp_path / "r.toml", text))


def test_regression_needs_a_correlation_metric_and_predict_needs_a_family_that_reads_it(tmp_path):
    with pytest.raises(RecipeError, match='eval.metric: a regression task is scored by pearson or spearman'):
        load_recipe(write_recipe(tmp_path / "r.toml", '[task]\nglue = "stsb"\n[data]\ntrain = "STS-B/train.tsv"\n'))
    with pytest.raises(RecipeError, match="data.predict: the ner family does not read unlabelled splits"):
        load_recipe(write_recipe(tmp_path / "n.toml", '[task]\ntype = "ner"\n[data]\ntrain = "a.conll"\npredict = ["b.conll"]\n'))


def test_shipped_glue_recipes_read_glue_layout(tmp_path):
    """Each recipes/glue/<task>_lora.toml names GLUE's own files: with data.dir on a fixture, they load."""
    paths = sorted(RECIPES.glob("*_lora.toml"))
    assert [p.name for p in paths] == sorted(f"{t}_lora.toml" for t in glue.PRESETS)
    for path in paths:
        recipe = load_recipe(path, [f'data.dir="{tmp_path / "glue_data"}"'])
        write_glue(tmp_path / "glue_data", recipe.task.glue, n=40)
        data = CLS.load(recipe, tmp_path / "glue_data")
        assert data.splits["train"].examples and any(isinstance(s, PredictSplit) for s in data.splits.values()), path.name


# --- end to end -------------------------------------------------------------------------------------


def test_mnli_matched_and_mismatched_reported_separately_with_submissions(tmp_path, tiny_bert):
    root = write_glue(tmp_path / "glue_data", "mnli", n=12)
    run_dir = run(load_recipe(glue_recipe(tmp_path, "mnli", root, model=str(tiny_bert))))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"dev_matched", "dev_mismatched"} <= set(metrics) and "test_matched" not in metrics
    assert metrics["dev_matched"]["n"] == metrics["dev_mismatched"]["n"] == 12
    lines = (run_dir / "MNLI-mm.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 13
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(12)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "neutral", "contradiction"}
    rows = [json.loads(line) for line in (run_dir / "predictions_test_matched.jsonl").read_text().splitlines()]
    assert "gold" not in rows[0] and [r["predicted"] for r in rows] == [
        line.split("\t")[1] for line in (run_dir / "MNLI-m.tsv").read_text().splitlines()[1:]]


def sts_rows(n: int, seed: int) -> list[list]:
    """A learnable score: 4.5 when the second sentence says good/great/fine, else 0.5, plus noise."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        high = i % 2 == 0
        word = rng.choice(["good", "great", "fine"] if high else ["bad", "awful", "terrible"])
        filler = " ".join(rng.choice(["the", "movie", "film", "plot", "was"]) for _ in range(rng.randint(1, 4)))
        rows.append([i, "main-captions", "MSRvid", "2012test", "0001", "none", "none", "the movie",
                     f"{filler} {word}", f"{(4.5 if high else 0.5) + rng.uniform(-0.3, 0.3):.3f}"])
    return rows


@pytest.fixture(scope="module", params=["lora", "full"])
def sts_run(request, tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp(f"stsb-{request.param}")
    root = tmp / "glue_data"
    _tsv(root / "STS-B" / "train.tsv", STSB_COLUMNS + ["score"], sts_rows(64, 1))
    _tsv(root / "STS-B" / "dev.tsv", STSB_COLUMNS + ["score"], sts_rows(16, 2))
    _tsv(root / "STS-B" / "test.tsv", STSB_COLUMNS, [r[:9] for r in sts_rows(8, 3)])
    lr = 1e-2 if request.param == "lora" else 2e-3
    recipe = load_recipe(glue_recipe(tmp, "stsb", root, {"method": request.param}, str(tiny_bert)),
                         ["train.epochs=6", "train.batch_size=8", f"train.lr={lr}", "data.validation_fraction=0.25"])
    return request.param, run(recipe)


def test_regression_trains_a_one_output_head_and_scores_correlations(sts_run):
    _, run_dir = sts_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = [e["train_loss"] for e in metrics["train"]["history"]]
    # The tiny model first fits the scores' mean (a loss near their variance, 4): the loss moves a lot
    # before the good/bad words matter, so correlations are only checked against the predictions.
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(metrics["dev"]) == {"pearson", "spearman", "mse", "n"} and metrics["dev"]["n"] == 16
    rows = [json.loads(line) for line in (run_dir / "predictions_dev.jsonl").read_text().splitlines()]
    again = glue.regression_metrics([r["gold"] for r in rows], [r["predicted"] for r in rows])
    assert again == pytest.approx({k: metrics["dev"][k] for k in again}, abs=1e-5)
    assert metrics["train"]["best_metric"] == "pearson"
    submission = (run_dir / "STS-B.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 9
    assert all(0 <= float(line.split("\t")[1]) < 10 for line in submission[1:])
    info = json.loads((run_dir / "peft_ft.json").read_text())
    assert info["labels"] == ["score"]


def test_regression_reload_gives_the_same_scores(sts_run):
    import torch

    _, run_dir = sts_run
    model, tokenizer, _ = load_run(run_dir)
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    rows = [json.loads(line) for line in (run_dir / "predictions_dev.jsonl").read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows], padding=True, return_tensors="pt")
    with torch.inference_mode():
        scores = model(**enc).logits[:, 0].numpy()
    assert np.abs(scores - np.array([r["predicted"] for r in rows])).max() < 1e-5


def test_predict_reads_the_presets_second_sentence(sts_run, tmp_path, capsys):
    """A GLUE pair run's recipe.toml keeps data.text_pair_column at its default (""): predict and serve answered
    each pair from its first sentence alone, identical pairs and unrelated ones alike, and never asked for the second."""
    from peft_ft.cli import main

    _, run_dir = sts_run
    rows = [json.loads(line) for line in (run_dir / "predictions_dev.jsonl").read_text().splitlines()][:6]
    assert len({r["predicted"] for r in rows}) > 1
    as_sent = tmp_path / "pairs.jsonl"
    write_jsonl(as_sent, [{"text": r["text"], "text_pair": r["text_pair"]} for r in rows[:3]]
                + [{"sentence1": r["text"], "sentence2": r["text_pair"]} for r in rows[3:]])  # GLUE's own field names
    assert main(["predict", "--adapter", f"s={run_dir}", str(as_sent)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["score"] for a in answers] == pytest.approx([r["predicted"] for r in rows], abs=1e-5)
    write_jsonl(as_sent, [{"text": rows[0]["text"]}])
    assert main(["predict", "--adapter", f"s={run_dir}", str(as_sent)]) == 2
    assert "expected a text field 'text_pair' or 'sentence2'" in capsys.readouterr().err


@pytest.mark.parametrize("score", ["inf", "-Infinity", "1e999"])
def test_a_regression_label_that_is_not_finite_names_its_row(tmp_path, score):
    root = tmp_path / "glue_data"
    rows = sts_rows(8, 1)
    rows[3][-1] = score
    _tsv(root / "STS-B" / "train.tsv", STSB_COLUMNS + ["score"], rows)
    _tsv(root / "STS-B" / "dev.tsv", STSB_COLUMNS + ["score"], sts_rows(4, 2))
    _tsv(root / "STS-B" / "test.tsv", STSB_COLUMNS, [r[:9] for r in sts_rows(4, 3)])
    recipe = load_recipe(glue_recipe(tmp_path, "stsb", root))
    with pytest.raises(DataError, match=rf"STS-B/train.tsv: row 4: label '{score}' is not a finite number"):
        TASKS["classification"].load(recipe, root)


def test_regression_on_a_users_score_column(tmp_path, tiny_bert):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": s, "rating": -1 + i * 0.25} for i, s in enumerate(SENTENCES * 2)])
    write_jsonl(d / "new.jsonl", [{"text": s} for s in SENTENCES[:3]])
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", recipe_text(
        tiny_bert, d, task={"regression": True}, data={"validation_fraction": 0.25, "predict": ["new.jsonl"], "label_column": "rating"},
        eval={"metric": "spearman"}, defaults=False)))
    data = CLS.load(recipe, d)
    assert data.labels == ["score"] and CLS.model_kwargs(data)["problem_type"] == "regression"
    # A score of -1 is a score (not GLUE's "no label"); the held-out rows are not stratified by value.
    assert len(data.splits["train"].examples) + len(data.splits["validation"].examples) == 16
    assert len(data.splits["validation"].examples) == 4
    assert [e["index"] for e in data.splits["new"].examples] == [0, 1, 2] and data.splits["new"].submission == ""
    write_jsonl(d / "train.jsonl", [{"text": "good", "rating": "high"}])
    with pytest.raises(DataError, match=r"train.jsonl: row 1: label 'high' is not a finite number"):
        CLS.load(recipe, d)
