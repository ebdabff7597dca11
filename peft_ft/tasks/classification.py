"""Single-text and text-pair classification: grading (SciEntsBank), NLI, sentiment, GLUE-style tasks."""

from __future__ import annotations

from pathlib import Path

from peft_ft.data import carve_validation, read_split_rows, require_columns, split_sources
from peft_ft.errors import DataError
from peft_ft.schema import Recipe
from peft_ft.tasks import Split, Task, TaskData, register_task


def _as_index(value) -> int | None:
    """Integer label ids arrive as ints (parquet, JSON) or digit strings (CSV/TSV)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def label_names(recipe: Recipe, train_values: list) -> list[str]:
    """Names in id order: the recipe's, else the training data's (sorted; integer ids keep their value)."""
    if recipe.task.labels:
        return list(recipe.task.labels)
    ids = [_as_index(v) for v in train_values]
    if all(i is not None for i in ids):
        return [str(i) for i in range(max(ids) + 1)]
    return sorted({str(v) for v in train_values})


def label_id(value, names: list[str]) -> int | None:
    """The id of a label value: its name, or an integer id within range. None if neither."""
    if str(value) in names:
        return names.index(str(value))
    index = _as_index(value)
    if index is not None and 0 <= index < len(names):
        return index
    return None


def _is_unlabeled(value) -> bool:
    # MNLI's test rows and GLUE's hub splits mark "no label" with -1.
    return value is None or _as_index(value) == -1


@register_task
class Classification(Task):
    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    default_metric = "macro_f1"
    metrics = ("accuracy", "macro_f1", "weighted_f1")
    formats = ("csv", "tsv", "jsonl", "json", "parquet")
    pipeline_task = "text-classification"

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        d = recipe.data
        columns = {"data.text_column": d.text_column, "data.text_pair_column": d.text_pair_column, "data.label_column": d.label_column}
        raw = {}
        for name, _key, location in split_sources(recipe, data_dir):
            rows = read_split_rows(recipe, location)
            require_columns(rows, columns, location)
            raw[name] = (location, rows)
        train_values = [r[d.label_column] for r in raw["train"][1] if not _is_unlabeled(r[d.label_column])]
        if not train_values:
            raise DataError(f"{raw['train'][0]}: no labelled rows in the training split")
        names = label_names(recipe, train_values)
        notes, splits = [], {}
        for name, (location, rows) in raw.items():
            examples, dropped = self._examples(rows, names, location, recipe)
            if dropped:
                notes.append(f"{name}: dropped {dropped} unlabelled rows (label -1 or empty) from {location}")
            splits[name] = Split(name, location, examples)
        if d.validation_fraction:
            keep, held = carve_validation(splits["train"].examples, d.validation_fraction, recipe.train.seed, "label")
            source = f"{d.validation_fraction:.0%} of {splits['train'].source}"
            splits["train"] = Split("train", splits["train"].source, keep)
            splits = {"train": splits["train"], "validation": Split("validation", source, held), **{k: v for k, v in splits.items() if k != "train"}}
            notes.append(f"validation: held out {len(held)} of {len(held) + len(keep)} training rows, stratified by label (seed {recipe.train.seed})")
        return TaskData(self._cap(splits, recipe), names, notes)

    @staticmethod
    def _examples(rows: list[dict], names: list[str], location: str, recipe: Recipe) -> tuple[list[dict], int]:
        d = recipe.data
        examples, dropped = [], 0
        for number, row in enumerate(rows, 1):
            value = row[d.label_column]
            if _is_unlabeled(value):
                dropped += 1
                continue
            label = label_id(value, names)
            if label is None:
                raise DataError(
                    f"{location}: row {number}: label {value!r} is not among the training labels ({', '.join(names)}); "
                    f"fix the row or list every label in task.labels"
                )
            text = row[d.text_column]
            if not isinstance(text, str):
                raise DataError(f"{location}: row {number}: column {d.text_column!r} is {text!r}, expected text")
            example = {"text": text, "label": label, "row": number}
            if d.text_pair_column:
                example["text_pair"] = str(row[d.text_pair_column] or "")
            examples.append(example)
        if not examples:
            raise DataError(f"{location}: no labelled rows; check data.label_column ({d.label_column!r})")
        return examples, dropped

    @staticmethod
    def _cap(splits: dict[str, Split], recipe: Recipe) -> dict[str, Split]:
        d = recipe.data
        for name, split in splits.items():
            cap = d.max_train_samples if name == "train" else d.max_eval_samples
            if cap:
                split.examples = split.examples[:cap]
        return splits

    def model_kwargs(self, data: TaskData) -> dict:
        return {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {n: i for i, n in enumerate(data.labels)},
        }

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        texts = [e["text"] for e in split.examples]
        pairs = [e["text_pair"] for e in split.examples] if recipe.data.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=recipe.model.max_length)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [
            {**{k: enc[k][i] for k in keys}, "labels": e["label"], "length": len(enc["input_ids"][i])}
            for i, e in enumerate(split.examples)
        ]

    def unpack(self, outputs, batch) -> list:
        return list(outputs.logits.float().cpu().numpy())

    def score(self, split: Split, features: list[dict], outputs: list, data: TaskData) -> tuple[dict, list[dict]]:
        import numpy as np

        logits = np.stack(outputs)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        predicted = probs.argmax(axis=1)
        gold = np.array([e["label"] for e in split.examples])
        metrics = classification_metrics(gold, predicted, data.labels)
        records = [
            {
                "row": e["row"],
                "text": e["text"],
                **({"text_pair": e["text_pair"]} if "text_pair" in e else {}),
                "gold": data.labels[e["label"]],
                "predicted": data.labels[p],
                "probabilities": {n: round(float(q), 6) for n, q in zip(data.labels, row)},
            }
            for e, p, row in zip(split.examples, predicted, probs)
        ]
        return metrics, records


def classification_metrics(gold, predicted, names: list[str]) -> dict:
    """Accuracy, macro/weighted F1 and a per-class report.

    Macro-F1 averages over the classes that occur in the gold or predicted labels (scikit-learn's
    default): a class absent from both has no defined F1 and would only drag the mean to 0.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, predicted, average="weighted", zero_division=0)),
        "n": int(len(gold)),
        "per_class": {
            n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, n in enumerate(names)
        },
    }
