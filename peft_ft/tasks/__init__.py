"""Task families behind one small interface, registered by name (`task.type` in a recipe).

A family knows how to read its data into examples, which transformers head it needs, how to turn
examples into token-id features, how to cut a batch's model outputs into per-row outputs, and how
to score per-row outputs and write predictions. The runner (`peft_ft.engine.run`) knows nothing else
about tasks. Modules here stay light at import: torch and transformers are imported in functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_ft.recipe.schema import Recipe


@dataclass
class Split:
    name: str  # "train", "validation", "test_ua", ...
    source: str  # the file (or hub split) it came from, for messages and the model card
    examples: list[dict]


def cap_splits(splits: dict[str, "Split"], recipe: Recipe) -> None:
    """data.max_train_samples / max_eval_samples: keep the first N examples of each split.
    Splits marked `capped = False` (unlabelled predict splits: a submission answers every row) stay whole."""
    for name, split in splits.items():
        cap = recipe.data.max_train_samples if name == "train" else recipe.data.max_eval_samples
        if cap and getattr(split, "capped", True):
            split.examples = split.examples[:cap]


@dataclass
class TaskData:
    splits: dict[str, Split]  # train first, then validation, then the test splits
    labels: list[str]
    notes: list[str] = field(default_factory=list)  # what the reader dropped or converted, for the log

    @property
    def eval_names(self) -> list[str]:
        return [n for n in self.splits if n != "train"]


class Task:
    """The interface every family implements (this base only documents it and holds defaults)."""

    name: str
    auto_class: str  # transformers Auto class of the model with the right head
    peft_task_type: str | None  # peft TaskType for the adapter config
    default_metric: str  # validation metric that picks the best checkpoint (higher is better)
    metrics: tuple[str, ...]  # scalar metrics `score` reports, any of which may pick the best checkpoint
    formats: tuple[str, ...]  # data.format values this family reads
    pipeline_task: str  # the transformers pipeline that serves this family's models

    def validate(self, recipe: Recipe) -> list[str]:
        """Recipe checks specific to this family, without reading data (runs in `validate`)."""
        return []

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        raise NotImplementedError

    def model_kwargs(self, data: TaskData) -> dict:
        """Extra `from_pretrained` arguments: label count and names for the head."""
        return {}

    def prepare_training(self, model, recipe: Recipe, data: TaskData) -> None:
        """Adjust the built model before training (e.g. the loss); the default leaves it as it is."""

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        """Token-id features, one dict per model row, each with a `length`."""
        raise NotImplementedError

    def predict(self, model, features: list[dict], pad_id: int, batch_size: int, device) -> list[Any]:
        """Per-row outputs for a split, in feature order. The default runs the model forward on
        length-sorted batches and cuts the outputs with `unpack`; generative tasks override it."""
        from peft_ft.engine.train import predict

        return predict(model, self, features, pad_id, batch_size, device)

    def unpack(self, outputs, batch) -> list[Any]:
        """Cut a batch's model outputs into one numpy output per row."""
        raise NotImplementedError

    def score(self, split: Split, features: list[dict], outputs: list[Any], data: TaskData) -> tuple[dict, list[dict]]:
        """Metrics and per-row prediction records from the per-row outputs."""
        raise NotImplementedError

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
        from peft_ft.storage import write_atomic

        path = run_dir / f"predictions_{split.name}.jsonl"
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return [path]


TASKS: dict[str, Task] = {}


def register_task(cls):
    task = cls()
    if task.name in TASKS:
        raise ValueError(f"task family {task.name!r} is already registered")
    TASKS[task.name] = task
    return cls


# Importing a family registers it. Each module is light at import time.
from peft_ft.tasks import classification  # noqa: E402,F401
from peft_ft.tasks import ner  # noqa: E402,F401
from peft_ft.tasks import qa, seq2seq  # noqa: E402,F401
