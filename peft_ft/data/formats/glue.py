"""GLUE: the task presets, a reader for GLUE's own TSV files, the official metrics, submission files.

One table (`PRESETS`) says, per GLUE task, which columns hold the text(s) and the label, the label
names in the ids of the hub dataset (nyu-mll/glue), and the official metric(s). The TSV reader
renames GLUE's file columns to the hub's column names, so a preset reads the same columns from
local files and from the hub. Metrics come from scikit-learn and scipy (never `evaluate.load`).

GLUE's TSV files are not standard CSV: a sentence may hold a lone `"`. They are read line by line,
split on tabs with no quote handling (what `csv.reader(quoting=csv.QUOTE_NONE, delimiter="\\t")`
does), and every line must have the header's field count. A line that does not is an error naming
the file and line, except in QQP's labelled files: the real QQP train/dev files hold a few rows
broken by a newline inside a question; those lines are skipped and counted in the run log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft_ft.data.files import read_text
from peft_ft.errors import DataError

# CoLA's train/dev files have no header row; these are their four columns.
COLA_COLUMNS = ("source", "label", "original_label", "sentence")


@dataclass(frozen=True)
class Preset:
    name: str  # task.glue value and hub configuration name
    folder: str  # GLUE's folder name (CoLA, SST-2, ...)
    text: str  # text column (hub name)
    text_pair: str  # second text column, "" for single-sentence tasks
    labels: tuple[str, ...]  # label names in the hub's id order; () for STS-B's regression score
    metrics: tuple[str, ...]  # the official metric(s), the first picks the best checkpoint in our recipes
    columns: dict[str, str] = field(default_factory=dict)  # GLUE TSV column -> hub column
    submission: str = ""  # GLUE's submission file name (MNLI: see `submission_name`)
    skip_malformed: bool = False  # QQP: skip (and count) lines with the wrong field count

    @property
    def regression(self) -> bool:
        return not self.labels


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cola", "CoLA", "sentence", "", ("unacceptable", "acceptable"), ("matthews",),
           {"sentence": "sentence", "label": "label", "index": "idx"}, "CoLA.tsv"),
    Preset("sst2", "SST-2", "sentence", "", ("negative", "positive"), ("accuracy",),
           {"sentence": "sentence", "label": "label", "index": "idx"}, "SST-2.tsv"),
    Preset("mrpc", "MRPC", "sentence1", "sentence2", ("not_equivalent", "equivalent"), ("f1", "accuracy"),
           {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label", "index": "idx"}, "MRPC.tsv"),
    Preset("qqp", "QQP", "question1", "question2", ("not_duplicate", "duplicate"), ("f1", "accuracy"),
           {"question1": "question1", "question2": "question2", "is_duplicate": "label", "id": "idx"}, "QQP.tsv",
           skip_malformed=True),
    Preset("stsb", "STS-B", "sentence1", "sentence2", (), ("pearson", "spearman"),
           {"sentence1": "sentence1", "sentence2": "sentence2", "score": "label", "index": "idx"}, "STS-B.tsv"),
    Preset("mnli", "MNLI", "premise", "hypothesis", ("entailment", "neutral", "contradiction"), ("accuracy",),
           {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label", "index": "idx"}),
    Preset("qnli", "QNLI", "question", "sentence", ("entailment", "not_entailment"), ("accuracy",),
           {"question": "question", "sentence": "sentence", "label": "label", "index": "idx"}, "QNLI.tsv"),
    Preset("rte", "RTE", "sentence1", "sentence2", ("entailment", "not_entailment"), ("accuracy",),
           {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label", "index": "idx"}, "RTE.tsv"),
    Preset("wnli", "WNLI", "sentence1", "sentence2", ("not_entailment", "entailment"), ("accuracy",),
           {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label", "index": "idx"}, "WNLI.tsv"),
)}

# Tasks whose submissions hold label names; the others hold label ids (STS-B: the score).
NAMED_PREDICTIONS = {"mnli", "qnli", "rte"}


# --- reading GLUE's TSV files -----------------------------------------------------------------


def read_glue_tsv(path: Path, preset: Preset, *, skip_malformed: bool) -> tuple[list[dict], list[int]]:
    """Rows of one GLUE TSV file under the hub's column names, and the line numbers skipped.

    The header row names the columns (CoLA's train/dev files have none: `COLA_COLUMNS`). Lines are
    split on "\\n" only: GLUE's text holds characters such as U+2028 that `str.splitlines` would
    treat as line ends, silently cutting a row in two.
    """
    lines = read_text(path).removeprefix("\ufeff").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [line.removesuffix("\r") for line in lines]
    if not lines:
        raise DataError(f"{path}: the file is empty")
    first = lines[0].split("\t")
    if preset.name == "cola" and "sentence" not in first:
        header, start = list(COLA_COLUMNS), 0
    else:
        header, start = first, 1
    if preset.text not in [preset.columns.get(c) for c in header]:
        wanted = [c for c, hub in preset.columns.items() if hub == preset.text]
        raise DataError(
            f"{path}: line 1: not GLUE's {preset.folder} layout: expected a header with {wanted[0]!r}, got "
            f"{', '.join(map(repr, first[:12]))}; check task.glue, or set data.format to read a plain table"
        )
    keep = [(i, preset.columns[c]) for i, c in enumerate(header) if c in preset.columns]
    rows, skipped = [], []
    for number, line in enumerate(lines[start:], start + 1):
        fields = line.split("\t")
        if len(fields) != len(header):
            if skip_malformed:
                skipped.append(number)
                continue
            raise DataError(
                f"{path}: line {number}: {len(fields)} tab-separated fields, the header has {len(header)} "
                f"({', '.join(header)}); fix the line (a tab or newline inside a text?)"
            )
        rows.append({hub: fields[i] for i, hub in keep})
    return rows, skipped


def reads_glue_tsv(path: str, fmt: str) -> bool:
    """With task.glue set, `.tsv` files (data.format auto) and data.format = "glue" use GLUE's layout."""
    return fmt == "glue" or (fmt == "auto" and path.lower().endswith(".tsv"))


# --- official metrics -------------------------------------------------------------------------


def matthews(gold, predicted) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, predicted))


def positive_f1(gold, predicted) -> float:
    """F1 of the positive class (id 1): GLUE's F1 for MRPC (equivalent) and QQP (duplicate)."""
    from sklearn.metrics import f1_score

    return float(f1_score(gold, predicted, pos_label=1, average="binary", zero_division=0))


def regression_metrics(gold, predicted) -> dict:
    """Pearson and Spearman correlation and mean squared error of predicted scores.

    A correlation is undefined when either side is constant (an untrained head predicts one
    value); it is reported as 0.0, like scikit-learn's Matthews correlation, rather than NaN,
    which would also make every later epoch compare as "not better" when picking the best one.
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    gold, predicted = np.asarray(gold, dtype=float), np.asarray(predicted, dtype=float)
    constant = len(gold) < 2 or np.ptp(gold) == 0 or np.ptp(predicted) == 0
    return {
        "pearson": 0.0 if constant else float(pearsonr(gold, predicted)[0]),
        "spearman": 0.0 if constant else float(spearmanr(gold, predicted)[0]),
        "mse": float(np.mean((gold - predicted) ** 2)) if len(gold) else 0.0,
    }


# --- submission files -------------------------------------------------------------------------


def submission_name(preset: Preset, split: str) -> str:
    """GLUE's file name for a test split's predictions: CoLA.tsv, MNLI-m.tsv, MNLI-mm.tsv..."""
    if preset.name != "mnli":
        return preset.submission
    if "mismatched" in split:
        return "MNLI-mm.tsv"
    if "matched" in split:
        return "MNLI-m.tsv"
    raise DataError(
        f"data.predict: MNLI has two test sets; name the files (or hub splits) test_matched and test_mismatched "
        f"so that each gets its submission file (MNLI-m.tsv, MNLI-mm.tsv), got {split!r}"
    )


def submission_text(preset: Preset, indices: list, predictions: list) -> str:
    """GLUE's submission format: a header `index<TAB>prediction`, one row per test row.

    `predictions` are label ids (STS-B: scores); MNLI, QNLI and RTE submissions hold label names.
    """
    if preset.regression:
        values = [f"{float(p):.3f}" for p in predictions]
    elif preset.name in NAMED_PREDICTIONS:
        values = [preset.labels[p] for p in predictions]
    else:
        values = [str(int(p)) for p in predictions]
    return "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in zip(indices, values))
