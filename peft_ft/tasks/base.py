"""The interface every task family implements, and the registry families add themselves to.

A family knows how to read its data into examples, which transformers head it needs, how to turn examples into
token-id features, how to cut a batch's model outputs into per-row outputs, how to score them and write
predictions, and how to answer a request once trained (its `Answers`). The runner (`peft_ft.engine.run`) and
the serving layer know nothing else about tasks. Light at import: torch and transformers load in functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peft_ft.data.batching import eval_batches, pad_batch
from peft_ft.data.files import Split, TaskData, unicode_text
from peft_ft.errors import DataError
from peft_ft.recipe.schema import Recipe
from peft_ft.storage import write_atomic


def _plain_example(recipe: Recipe) -> str:
    return '"This is great."'


@dataclass(frozen=True)
class Card:
    """What a family's model card says (peft_ft.rundir.card): each metric with its scorer, and how to load and answer
    with stock transformers + peft, no peft-ft import. The defaults suit a family transformers has no pipeline for."""

    # metrics.json key -> (model-index metric type, the metric and its scorer); {seqeval}, {present} and {all} are
    # filled in from the split's metrics. Keys not listed here stay out of the card.
    metrics: dict = field(default_factory=dict)
    pipeline: str = ""  # stock pipeline code over `model` and `tokenizer`, {TEXT} the example; empty: no pipeline
    example: Callable[[Recipe], str] = _plain_example  # the example input of `pipeline`, as Python source
    full_pipeline_options: str = ""  # extra arguments of pipeline(...) over a complete (full or merged) model folder
    full_call_options: str = ""  # extra arguments of that pipeline's call on the example
    peft_auto_class: str = ""  # peft's AutoPeftModel class; empty: AutoPeftModelFor... after the family's auto_class
    peft_auto_comment: str = ""  # a remark on that line of the snippet
    answer: str = ""  # without a pipeline: code answering one example with `model`, `tokenizer` (torch imported)
    note: str = ""  # a closing remark under the snippets
    # An ONNX export's answering code (`peft-ft export --onnx`): over `session` (onnxruntime), `tokenizer` (the
    # folder's, cutting at the run's max_length), `labels` and INPUTS (the graph's input names); numpy as np.
    # (info, recipe) -> code, as it may differ by the run (a regression head has one output). None: not exportable.
    onnx: Callable[[dict, Recipe], str] | None = None
    # Code and notes may name the run's settings, filled in by peft_ft.rundir.card.snippet_settings: {MAX_LENGTH}
    # (model.max_length), {STRIDE} (a window overlap for stock pipelines), {DOC_STRIDE}, {N_BEST}, {MAX_ANSWER_LENGTH},
    # {NUM_BEAMS}, {MAX_NEW_TOKENS} (eval.*), {TEXT} (`example`, as Python source).


class Task:
    """The interface every family implements (this base only documents it and holds defaults)."""

    name: str
    auto_class: str  # transformers Auto class of the model with the right head
    peft_task_type: str | None  # peft TaskType for the adapter config
    default_metric: str  # validation metric that picks the best checkpoint (higher is better)
    metrics: tuple[str, ...]  # scalar metrics `score` reports, any of which may pick the best checkpoint
    formats: tuple[str, ...]  # data.format values this family reads
    pipeline_task: str  # the transformers pipeline that serves this family's models
    answers: Answers  # how a trained model answers requests
    card: Card = Card()  # what its model card says
    onnx_outputs: tuple[str, ...] = ()  # the model's outputs `peft-ft export` checks; empty: not exportable
    onnx_pairs: bool = False  # export traces text pairs (question, context) rather than single texts
    # Generic recipe keys this family never reads: set in a recipe they would be ignored in silence, so they are
    # refused (keys of one family alone say so in the schema, `only=`).
    unread_keys: tuple[str, ...] = ()

    def validate(self, recipe: Recipe) -> list[str]:
        """Recipe checks specific to this family, without reading data (runs in `validate`)."""
        return []

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        raise NotImplementedError

    def check_tokens(self, data: TaskData, location: str, recipe: Recipe) -> None:
        """Data checks that need the tokenizer, before a run folder is made (`validate` runs them too);
        `location` is the model folder or hub id. The default has none."""

    def model_kwargs(self, data: TaskData) -> dict:
        """Extra `from_pretrained` arguments: label count and names for the head."""
        return {}

    def prepare_training(self, model, recipe: Recipe, data: TaskData) -> None:
        """Adjust the built model before training (e.g. the loss); the default leaves it as it is."""

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        """Token-id features, one dict per model row, each with a `length`."""
        raise NotImplementedError

    def predict(self, model, features: list[dict], pad_id: int, batch_size: int, device, adapter_names: list[str] | None = None) -> list[Any]:
        """Per-row outputs for a split, in feature order. The default runs the model forward on
        length-sorted batches and cuts the outputs with `unpack`; generative tasks override it.
        `adapter_names` (one per feature): each row's adapter, for peft's per-row LoRA (serving)."""
        return predict(model, self, features, pad_id, batch_size, device, adapter_names)

    def unpack(self, outputs, batch) -> list[Any]:
        """Cut a batch's model outputs into one numpy output per row."""
        raise NotImplementedError

    def score(self, split: Split, features: list[dict], outputs: list[Any], data: TaskData) -> tuple[dict, list[dict]]:
        """Metrics and per-row prediction records from the per-row outputs."""
        raise NotImplementedError

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
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


def replace_loss(model, loss: Callable[[dict, Any], Any], training_only: bool = False) -> None:
    """Recompute the loss of `model`'s forwards as `loss(kwargs, output)`; None from it keeps the model's own.

    transformers' heads build their loss inside `forward` (unweighted, over every position), so a forward hook is
    the one place a family can change it: one small extra computation per batch, no change to the model or what
    it saves. `training_only`: evaluation (model.eval()) keeps the model's loss."""

    def hook(module, args, kwargs, output):
        if training_only and not module.training:
            return output
        value = loss(kwargs, output)
        if value is not None:
            output["loss"] = value
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def predict(model, task: Task, features: list[dict], pad_id: int, batch_size: int, device,
            adapter_names: list[str] | None = None) -> list:
    """Per-row outputs in the features' order; batches sorted by length, no gradients. With `adapter_names` (one per
    feature) each forward gets its rows' names: peft picks every row's LoRA weights and head."""
    import torch  # the registry is read by `validate`, which must not wait for torch

    model.eval()
    outputs: list = [None] * len(features)
    with torch.inference_mode():
        for indices in eval_batches([f["length"] for f in features], batch_size):
            batch = pad_batch([features[i] for i in indices], pad_id)
            batch.pop("labels", None)
            per_row = {"adapter_names": [adapter_names[i] for i in indices]} if adapter_names else {}
            result = model(**{k: v.to(device) for k, v in batch.items()}, **per_row)
            for i, row in zip(indices, task.unpack(result, batch)):
                outputs[i] = row
    return outputs


# --- answering requests: what `peft-ft predict`, `peft-ft serve` and `peft_ft.pipeline` ask of a family --------


def _never_cut(tokenizer, item, max_length: int) -> bool:
    return False


@dataclass(frozen=True)
class Answers:
    """How a trained model of a family answers requests. The serving layer knows nothing else about families."""

    build: Callable[..., Any]  # (model, tokenizer, recipe, **kwargs) -> callable(list of inputs, batch_size=)
    to_input: Callable[[dict, Recipe, str], Any]  # (request row, the run's recipe, where) -> one input
    to_answer: Callable[[Any], dict]  # the callable's output for one input -> our JSON answer
    cost: Callable[[Any, Recipe, Any], int]  # (tokenizer, recipe, input) -> tokens the model reads for it (serve's bound)
    # (tokenizer, input, max_length) -> whether the model reads only the start of the input
    truncated: Callable[[Any, Any, int], bool] = _never_cut
    # Inputs of several adapters may share a forward pass: "rows" when the callable makes one forward row per input
    # (the serving layer then adds each row's adapter to the forward), "argument" when it takes `adapter_names=` (one
    # per input) and gives each of its forward rows (windows, say) its input's adapter; "" when they may not.
    mixes: str = ""


def stock_pipeline(task: str, options: Callable[[Recipe], dict]) -> Callable:
    """A builder of the stock pipeline `task` over a loaded model, with options taken from the run's recipe."""

    def build(model, tokenizer, recipe: Recipe, **kwargs):
        import transformers

        return transformers.pipeline(task, model=model, tokenizer=tokenizer, **{**options(recipe), **kwargs})

    return build


class FamilyAnswerer:
    """Answers through the family's own code (`encode`, `predict`), with the run's recipe settings: the same windows,
    generation settings and post-processing as evaluation. A subclass names its family (`task_name`) and writes
    `__call__(inputs, batch_size=32)`, usually around `run_examples`; the class itself is the `Answers.build`."""

    task_name: str

    def __init__(self, model, tokenizer, recipe: Recipe):
        self.model, self.tokenizer, self.recipe, self.task = model, tokenizer, recipe, TASKS[self.task_name]

    def run_examples(self, examples: list[dict], batch_size: int, labels: list[str] = (),
                     adapter_names: list[str] | None = None) -> tuple[list[dict], list]:
        """Request rows as the family's examples (no gold labels: `labels` are the head's names) -> (features, per-row
        outputs of `Task.predict`). `adapter_names` (one per example) reach every feature made from that example
        (its `_example`), for families whose `Answers.mixes` is "argument"."""
        features = self.task.encode(Split("predict", "<request>", examples), self.tokenizer, self.recipe, TaskData({}, list(labels)))
        device = next(self.model.parameters()).device
        per_feature = {"adapter_names": [adapter_names[f["_example"]] for f in features]} if adapter_names else {}
        return features, self.task.predict(self.model, features, self.tokenizer.pad_token_id or 0, batch_size, device, **per_feature)


def request_text(row: dict, names: list[str], where: str) -> str:
    """The first of the fields `names` that holds a text; a DataError naming the row (`where`) when none does."""
    names = [n for n in dict.fromkeys(names) if n]
    for name in names:
        if isinstance(row.get(name), str):
            return unicode_text(row[name], f"{where}: field {name!r}")
    wrong = [f"{n!r} is {type(row[n]).__name__} {str(row[n])[:40]!r}" for n in names if n in row]
    if wrong:
        raise DataError(f"{where}: field {wrong[0]}; expected text")
    raise DataError(f"{where}: expected a text field {' or '.join(map(repr, names))}; got fields {', '.join(map(repr, row)) or 'none'}")


def token_count(tokenizer, text: str, pair: str | None = None) -> int:
    """Tokens of a text (or pair) with the special tokens, untruncated."""
    return len(tokenizer(text, pair, truncation=False)["input_ids"])


def longer_than(tokenizer, item, max_length: int) -> bool:
    """`Answers.truncated` of families that cut their input at `max_length`: a text, or a {"text", "text_pair"} pair,
    longer than that with its special tokens (the model sees only its start)."""
    if isinstance(item, dict):
        return token_count(tokenizer, item["text"], item.get("text_pair")) > max_length
    return token_count(tokenizer, item) > max_length
