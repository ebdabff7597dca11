"""Single-text and text-pair classification and regression: grading (SciEntsBank), NLI, sentiment, GLUE.

A GLUE preset (`task.glue`, table in `peft_ft.data.formats.glue`) supplies the columns, label names and official
metrics of a GLUE task; a column the recipe sets to other than its default wins over the preset. With `task.regression`
(or `task.glue = "stsb"`) the label is a number: a one-output head trained with mean squared error.
Files listed in `data.predict` need no label column: they get predictions only (GLUE: a submission file).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from peft_ft.data.files import (Split, TaskData, cap_splits, carve_splits, read_split_rows, require_columns, split_sources,
                                unicode_text)
from peft_ft.data.formats import glue
from peft_ft.data.formats.label_studio import read_classification
from peft_ft.errors import DataError
from peft_ft.recipe.schema import DataSection, Recipe
from peft_ft.storage import write_atomic
from peft_ft.tasks.base import (
    Answers,
    Card,
    Task,
    longer_than,
    register_task,
    replace_loss,
    request_text,
    stock_pipeline,
    token_count,
)

log = logging.getLogger("peft_ft")
# A regression head has one output; its one "label" names it. One label <=> regression (a
# classifier needs two classes), which is all a saved run needs to rebuild its head.
REGRESSION_LABELS = ["score"]
REGRESSION_METRICS = ("pearson", "spearman")
CLASS_METRICS = ("accuracy", "macro_f1", "macro_f1_all_classes", "weighted_f1", "matthews", "f1")


@dataclass(frozen=True)
class Settings:
    """What a recipe reads and predicts once its GLUE preset is applied."""

    text: str
    text_pair: str
    label: str
    labels: tuple[str, ...]  # () = read from the training data
    regression: bool
    preset: glue.Preset | None


def settings(recipe: Recipe) -> Settings:
    d, preset = recipe.data, glue.PRESETS.get(recipe.task.glue)
    if preset is None:
        return Settings(d.text_column, d.text_pair_column, d.label_column, tuple(recipe.task.labels), recipe.task.regression, None)

    def pick(key: str, value: str) -> str:
        # A column the recipe changed from the default wins. Not `recipe.explicit`: a run folder's
        # resolved recipe.toml writes every key, defaults included.
        given = recipe.get(key)
        return given if given != getattr(DataSection(), key.split(".")[1]) else value

    return Settings(pick("data.text_column", preset.text), pick("data.text_pair_column", preset.text_pair),
                    pick("data.label_column", "label"), preset.labels, preset.regression, preset)


def is_regression(labels: list[str]) -> bool:
    return len(labels) == 1


@dataclass
class PredictSplit(Split):
    """An unlabelled split (`data.predict`): predictions only, no metrics."""

    capped = False  # never cut by max_eval_samples: a GLUE submission must answer every test row
    glue: str = ""  # the GLUE task whose submission file this split gets ("" = none)
    submission: str = ""  # that file's name (CoLA.tsv, MNLI-m.tsv, ...)


_NUMBER = re.compile(r"[+-]?\d+(\.\d*)?")


def _as_index(value) -> int | None:
    """An integer label id, however the file wrote it: 2 (JSON), 2.0 (parquet or pandas floats), "2" or " 2.0"
    (CSV/TSV). A bool, a fraction or a word is no id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def label_key(value, where: str) -> int | str:
    """A labelled cell as its class: an integer id, else the name without surrounding spaces ("a, neg" in a CSV)."""
    index = _as_index(value)
    if index is not None:
        return index
    if isinstance(value, float) or (isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise DataError(f"{where}: label {value!r} is a fraction, not a class; for a numeric target set task.regression = true")
    if isinstance(value, str) and "\n" in value:
        raise DataError(f"{where}: label {value!r} spans several lines; an unclosed quote in the file joins lines into it")
    if not isinstance(value, (str, bool)):
        raise DataError(f"{where}: label {value!r} is a {type(value).__name__}; a label is a name or an integer id")
    return str(value).strip()


def label_names(recipe: Recipe, train_values: list, source: str) -> list[str]:
    """Names in id order: the recipe's, else the classes the training data holds, sorted (integers by
    value: labels 1-5 are five classes "1".."5", never a sixth, phantom class 0)."""
    if recipe.task.labels:
        return list(recipe.task.labels)
    keys = {label_key(v, f"{source}: row {row}") for row, v in train_values}
    ids, words = sorted(k for k in keys if isinstance(k, int)), sorted(k for k in keys if isinstance(k, str))
    if ids and words:
        raise DataError(f"{source}: the training labels mix integer ids ({', '.join(map(str, ids[:5]))}) and names "
                        f"({', '.join(words[:5])}); use one or the other, or list the names in id order in task.labels")
    folded = {}
    for word in words:
        folded.setdefault(word.casefold(), []).append(word)
    clash = [names for names in folded.values() if len(names) > 1]
    if clash:
        raise DataError(f"{source}: training labels {' and '.join(map(repr, clash[0]))} differ only in case; make the rows "
                        f"agree, or list every label in task.labels if they are different classes")
    return [str(i) for i in ids] or words


def label_id(value, names: list[str], explicit: bool, where: str) -> int | None:
    """The id of a label value: its name, or, when the recipe gave the names (task.labels, a GLUE preset), an
    integer id within range (task.labels = ["neg", "pos"] with 0/1 in the data). None if neither: ids never
    index names read from the training data, whose order (sorted) the user did not choose."""
    key = label_key(value, where)
    if str(key) in names:
        return names.index(str(key))
    if isinstance(key, int) and explicit and 0 <= key < len(names) and not all(_as_index(n) is not None for n in names):
        return key
    return None


def _is_unlabeled(value, regression: bool = False) -> bool:
    # MNLI's test rows and GLUE's hub splits mark "no label" with -1; a score of -1 is a real score.
    # An empty cell (CSV/TSV ""), a JSON null or a parquet NaN is no label in every format; so is a CSV's "NaN".
    if value is None or (isinstance(value, str) and value.strip().casefold() in ("", "nan")):
        return True
    if isinstance(value, float) and value != value:
        return True
    return not regression and _as_index(value) == -1


# --- answering requests --------------------------------------------------------------------------------


def _classification_input(row: dict, recipe: Recipe, where: str):
    s = settings(recipe)  # a GLUE preset's columns (sentence1/sentence2, ...): the recipe's own keys keep their defaults
    text = request_text(row, ["text", s.text], where)
    if not s.text_pair:
        return text
    # A pair model answers single texts too, but badly: ask for the second text instead.
    return {"text": text, "text_pair": request_text(row, ["text_pair", s.text_pair], where)}


def _cost(tokenizer, recipe: Recipe, item) -> int:
    text, pair = (item.get("text", ""), item.get("text_pair")) if isinstance(item, dict) else (item, None)
    return min(token_count(tokenizer, text, pair), recipe.model.max_length)


ANSWERS = Answers(
    # Truncate as in training: the stock pipeline does not by default, and a long text then fails.
    build=stock_pipeline("text-classification", lambda r: {"truncation": True, "max_length": r.model.max_length}),
    to_input=_classification_input,
    to_answer=lambda o: {"label": o["label"], "score": round(float(o["score"]), 6)},
    cost=_cost, truncated=longer_than, mixes="rows",
)


def _card_example(recipe: Recipe) -> str:
    if settings(recipe).text_pair:
        return '{"text": "Plants need water to grow.", "text_pair": "Plants need water and light."}'
    return '"This is great."'


def _onnx_answer(info: dict, recipe: Recipe) -> str:
    """Text (or pair) in, label and probability out; a regression head's one output as it is."""
    inputs = ("example = {TEXT}\nenc = tokenizer(example[\"text\"], example[\"text_pair\"]"
              if settings(recipe).text_pair else "enc = tokenizer({TEXT}")
    code = (f"{inputs}, truncation=True, return_tensors=\"np\")  # cut at the run's max_length, as in training\n"
            "[logits] = session.run([\"logits\"], {name: enc[name] for name in INPUTS})\n")
    if len(info["labels"]) == 1:  # regression: one number
        return code + f"print({{{info['labels'][0]!r}: float(logits[0, 0])}})\n"
    return code + ("probs = np.exp(logits[0] - logits[0].max())\nprobs /= probs.sum()\n"
                   "print({\"label\": labels[int(probs.argmax())], \"score\": float(probs.max())})\n")


CARD = Card(
    metrics={
        "accuracy": ("accuracy", "accuracy"),
        "macro_f1": ("f1", "macro-F1 over the classes present in the split ({present})"),
        "macro_f1_all_classes": ("f1", "macro-F1 over all {all} classes"),
        "weighted_f1": ("f1", "support-weighted F1"),
        "matthews": ("matthews_correlation", "Matthews correlation"),
        "f1": ("f1", "F1 of the positive class"),
        "pearson": ("pearsonr", "Pearson correlation"),
        "spearman": ("spearmanr", "Spearman correlation"),
    },
    # Cut as in training: the stock pipeline does not cut by itself, and a long text then fails or reads past max_length.
    pipeline='pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)\n'
             'print(pipe({TEXT}, truncation=True, max_length={MAX_LENGTH}))',
    example=_card_example,
    full_call_options=", truncation=True",  # a complete folder's tokenizer holds the run's max_length
    onnx=_onnx_answer,
)


@register_task
class Classification(Task):
    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    default_metric = "macro_f1"
    metrics = CLASS_METRICS + REGRESSION_METRICS  # mse is reported too, but lower is better: it cannot pick
    formats = ("csv", "tsv", "jsonl", "json", "parquet", "glue", "label_studio")
    pipeline_task = "text-classification"
    answers = ANSWERS
    card = CARD
    onnx_outputs = ("logits",)
    predicts_unlabelled = True  # reads data.predict

    def validate(self, recipe: Recipe) -> list[str]:
        s, t, metric = settings(recipe), recipe.task, recipe.eval.metric
        problems = []
        if s.preset:
            # Checked by value, not by `recipe.explicit`: a run's resolved recipe.toml writes every key.
            if t.labels and tuple(t.labels) != s.preset.labels:
                problems.append(f"task.labels: task.glue = {t.glue!r} fixes the labels to {list(s.preset.labels)}; remove task.labels")
            if t.regression and not s.preset.regression:
                problems.append(f"task.regression: task.glue = {t.glue!r} is a classification task; remove task.regression")
            if recipe.data.hub and not recipe.data.hub_config:
                problems.append(f"data.hub_config: set it to the GLUE task's configuration, e.g. hub_config = {t.glue!r}")
        elif recipe.data.format == "glue":
            problems.append("data.format: \"glue\" reads GLUE's TSV files and needs task.glue (cola, sst2, ...)")
        if s.regression:
            if recipe.train.class_weights != "none":
                problems.append("train.class_weights: a regression task has no classes to weight; remove train.class_weights")
            if t.labels and not s.preset:
                problems.append("task.labels: a regression task predicts a number and has no label names; remove task.labels")
            if metric not in REGRESSION_METRICS:
                problems.append(f"eval.metric: a regression task is scored by {' or '.join(REGRESSION_METRICS)}; set eval.metric = \"pearson\"")
        elif metric in REGRESSION_METRICS:
            problems.append(f"eval.metric: {metric!r} scores regression (task.regression = true); choose one of {', '.join(CLASS_METRICS)}")
        elif metric == "f1" and s.labels and len(s.labels) != 2:
            problems.append("eval.metric: \"f1\" is the F1 of the positive class (id 1) of a two-label task; use macro_f1")
        return problems

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        s = settings(recipe)
        raw, notes = {}, []
        for name, key, location in split_sources(recipe, data_dir):
            predict = key.startswith("data.predict")
            rows = _read_rows(recipe, s, name, location, predict, notes)
            columns = {"data.text_column": s.text, "data.text_pair_column": s.text_pair}
            require_columns(rows, columns if predict else {**columns, "data.label_column": s.label}, location)
            raw[name] = (location, rows, predict)
        train_values = [(row, r[s.label]) for row, r in enumerate(raw["train"][1], 1) if not _is_unlabeled(r[s.label], s.regression)]
        if not train_values:
            raise DataError(f"{raw['train'][0]}: no labelled rows in the training split")
        names = REGRESSION_LABELS if s.regression else list(s.labels) or label_names(recipe, train_values, raw["train"][0])
        if not s.regression and len(names) < 2:
            raise DataError(f"{raw['train'][0]}: only one label ({names[0]!r}) in the training split; a classifier needs two "
                            f"(for a numeric target set task.regression = true)")
        if recipe.eval.metric == "f1" and len(names) != 2:
            raise DataError(f"{recipe.source}: eval.metric: \"f1\" needs two labels, the data has {len(names)}; use macro_f1")
        splits = {}
        for name, (location, rows, predict) in raw.items():
            if predict:
                splits[name] = _predict_split(name, location, rows, s)
                continue
            examples, dropped = _examples(rows, names, location, s, explicit=bool(s.labels))
            if dropped:
                notes.append(f"{name}: dropped {dropped} unlabelled rows (label -1 or empty) from {location}")
            splits[name] = Split(name, location, examples)
        # A float score is no class to stratify by.
        splits, carved = carve_splits(splits, recipe, None if s.regression else "label", "rows")
        notes += carved
        _check_submissions(splits)
        cap_splits(splits, recipe)
        return TaskData(splits, names, notes)

    def model_kwargs(self, data: TaskData) -> dict:
        kwargs = {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {n: i for i, n in enumerate(data.labels)},
        }
        # transformers trains a one-output head with MSELoss for this problem type, and its
        # text-classification pipeline then returns the raw score instead of a sigmoid.
        return {**kwargs, "problem_type": "regression"} if is_regression(data.labels) else kwargs

    def prepare_training(self, model, recipe: Recipe, data: TaskData) -> None:
        if recipe.train.class_weights == "balanced" and not is_regression(data.labels):
            weights = balanced_weights([e["label"] for e in data.splits["train"].examples], len(data.labels))
            log.info("class weights (balanced): %s", ", ".join(f"{n} {w:.3f}" for n, w in zip(data.labels, weights)))
            use_weighted_loss(model, weights)

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        texts = [e["text"] for e in split.examples]
        pairs = [e["text_pair"] for e in split.examples] if "text_pair" in split.examples[0] else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=recipe.model.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        features = [{**{k: enc[k][i] for k in keys}, "length": len(enc["input_ids"][i])} for i in range(len(texts))]
        for feature, e in zip(features, split.examples):
            if "label" in e:  # unlabelled (predict) splits have none
                feature["labels"] = e["label"]
        return features

    def unpack(self, outputs, batch) -> list:
        return list(outputs.logits.float().cpu().numpy())

    def score(self, split: Split, features: list[dict], outputs: list, data: TaskData) -> tuple[dict, list[dict]]:
        import numpy as np

        logits = np.stack(outputs)
        labelled = not isinstance(split, PredictSplit)
        if is_regression(data.labels):
            predicted = logits[:, 0]  # unrounded: the metrics recompute exactly from the predictions file
            records = [{**_record(e), **({"gold": e["label"]} if labelled else {}), "predicted": float(p)}
                       for e, p in zip(split.examples, predicted)]
            if not labelled:
                return {}, records
            gold = np.array([e["label"] for e in split.examples])
            return {**glue.regression_metrics(gold, predicted), "n": int(len(gold))}, records
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        predicted = probs.argmax(axis=1)
        records = [
            {
                **_record(e),
                **({"gold": data.labels[e["label"]]} if labelled else {}),
                "predicted": data.labels[p],
                "probabilities": {n: round(float(q), 6) for n, q in zip(data.labels, row)},
            }
            for e, p, row in zip(split.examples, predicted, probs)
        ]
        if not labelled:
            return {}, records
        gold = np.array([e["label"] for e in split.examples])
        return classification_metrics(gold, predicted, data.labels), records

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
        paths = super().write_predictions(run_dir, split, records)
        if isinstance(split, PredictSplit) and split.glue:
            preset = glue.PRESETS[split.glue]
            values = [r["predicted"] if preset.regression else preset.labels.index(r["predicted"]) for r in records]
            text = glue.submission_text(preset, [r["index"] for r in records], values)
            paths.append(run_dir / split.submission)
            write_atomic(paths[-1], text)
        return paths


def balanced_weights(labels: list[int], n_classes: int) -> list[float]:
    """scikit-learn's "balanced": rows / (classes x rows of the class). A class absent from training
    never is a target, so its weight (1.0) never counts."""
    counts = [labels.count(c) for c in range(n_classes)]
    return [len(labels) / (n_classes * n) if n else 1.0 for n in counts]


def use_weighted_loss(model, weights: list[float]) -> None:
    """Class-weighted cross-entropy as the loss of training forwards (transformers' sequence-classification heads,
    BERT, RoBERTa and DeBERTa alike, build an unweighted `CrossEntropyLoss`). Evaluation keeps the model's own
    loss; nothing reads it there."""
    import torch
    import torch.nn.functional as F

    weight = torch.tensor(weights, dtype=torch.float32)

    def weighted(kwargs, output):
        labels = kwargs.get("labels")
        if labels is None:
            return None
        logits = output["logits"]
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), weight=weight.to(logits.device))

    replace_loss(model, weighted, training_only=True)


def _read_rows(recipe: Recipe, s: Settings, name: str, location: str, predict: bool, notes: list[str]) -> list[dict]:
    """A split's rows; GLUE's own TSV files through the GLUE reader, with the rows read (and skipped) noted."""
    if recipe.data.format == "label_studio":
        rows, read = read_classification(recipe, Path(location), s.label, unlabelled=predict)
        notes.extend(f"{name}: {note}" for note in read)
        return rows
    if not (s.preset and not recipe.data.hub and glue.reads_glue_tsv(location, recipe.data.format)):
        return read_split_rows(recipe, location)
    # A submission must answer every test row: a malformed line in a predict file is an error even for QQP.
    rows, skipped = glue.read_glue_tsv(Path(location), s.preset, skip_malformed=s.preset.skip_malformed and not predict)
    notes.append(f"{name}: read {len(rows)} rows from {location} (GLUE {s.preset.folder} TSV)")
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        notes.append(f"{name}: skipped {len(skipped)} malformed lines (wrong field count) of {location}: lines {shown}")
    return rows


def _examples(rows: list[dict], names: list[str], location: str, s: Settings, explicit: bool) -> tuple[list[dict], int]:
    examples, dropped = [], 0
    for number, row in enumerate(rows, 1):
        value = row[s.label]
        if _is_unlabeled(value, s.regression):
            dropped += 1
            continue
        where = f"{location}: row {number}"
        label = _score_value(value) if s.regression else label_id(value, names, explicit, where)
        if label is None:
            if s.regression:
                raise DataError(f"{where}: label {value!r} is not a finite number; a regression label is a score such as 3.8")
            ids = ("; integer ids stand for names only when task.labels lists the names in id order"
                   if _as_index(value) is not None and not explicit else "")
            raise DataError(f"{where}: label {value!r} is not among the "
                            f"{'labels of task.labels' if explicit else 'training labels'} ({', '.join(names)}); "
                            f"fix the row or list every label in task.labels{ids}")
        examples.append({**_text_fields(row, number, location, s), "label": label, "row": number})
    if not examples:
        raise DataError(f"{location}: no labelled rows; check data.label_column ({s.label!r})")
    return examples, dropped


def _predict_split(name: str, location: str, rows: list[dict], s: Settings) -> PredictSplit:
    """Unlabelled rows; `index` is GLUE's test-row id (the `idx`/index column), else the row number from 0."""
    examples = [{**_text_fields(row, number, location, s), "row": number, "index": row.get("idx", number - 1)}
                for number, row in enumerate(rows, 1)]
    if not s.preset:
        return PredictSplit(name, location, examples)
    return PredictSplit(name, location, examples, glue=s.preset.name, submission=glue.submission_name(s.preset, name))


def _check_submissions(splits: dict[str, Split]) -> None:
    files = [s.submission for s in splits.values() if isinstance(s, PredictSplit) and s.submission]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise DataError(f"data.predict: several splits would write the submission file {', '.join(twice)}; list each GLUE test file once")


def _text_fields(row: dict, number: int, location: str, s: Settings) -> dict:
    fields = {"text": s.text, **({"text_pair": s.text_pair} if s.text_pair else {})}
    for column in fields.values():
        if not isinstance(row[column], str):
            raise DataError(f"{location}: row {number}: column {column!r} is {row[column]!r}, expected text")
    return {field: unicode_text(row[column], f"{location}: row {number}: column {column!r}") for field, column in fields.items()}


def _record(example: dict) -> dict:
    keys = ("row", "index", "text", "text_pair")
    return {k: example[k] for k in keys if k in example}


def _score_value(value) -> float | None:
    """A regression label as a number; None when it is none (inf and NaN too: one such row makes every loss inf)."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return score if math.isfinite(score) else None


def classification_metrics(gold, predicted, names: list[str]) -> dict:
    """Accuracy, macro/weighted F1, Matthews correlation, the positive class's F1 (two labels:
    GLUE's F1 for MRPC and QQP) and a per-class report.

    Macro-F1 comes twice, each named: `macro_f1` averages over the classes present in the gold or
    predicted labels (scikit-learn's default; a class absent from both has no defined F1), listed in
    `classes_present`; `macro_f1_all_classes` averages over every class, an absent one counting 0.
    They differ when a split lacks a class (SciEntsBank's test_uq has no non_domain answer).
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    present = sorted({int(i) for i in gold} | {int(i) for i in predicted})
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "macro_f1_all_classes": float(f.mean()),
        "classes_present": [names[i] for i in present],
        "weighted_f1": float(f1_score(gold, predicted, average="weighted", zero_division=0)),
        "matthews": glue.matthews(gold, predicted),
        **({"f1": glue.positive_f1(gold, predicted)} if len(names) == 2 else {}),
        "n": int(len(gold)),
        "scorers": {"macro_f1": f"mean F1 over the {len(present)} classes present in gold or predicted labels",
                    "macro_f1_all_classes": f"mean F1 over all {len(names)} classes"},
        "per_class": {
            n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, n in enumerate(names)
        },
    }
