"""Answering new inputs with a trained run: the per-family answer table and `peft_ft.pipeline(RUN_DIR)`.

One table, `ANSWERS`, keyed by `Task.pipeline_task`, says for each family how to build the callable
that answers (a stock transformers pipeline where transformers 5 still has one), how a request row
becomes that callable's input, and how its output becomes our JSON answer. `peft-ft predict`,
`peft-ft serve` and `peft_ft.pipeline` all go through it, so a new family is one entry.

transformers 5 removed the `question-answering` and `text2text-generation` pipelines (asking for
them raises KeyError "has been removed from transformers"). Those two families are answered by the
small callables below, which run the family's own `encode` / `predict` and take and return what
the 4.x pipelines did.

Using `transformers.pipeline(task, model=RUN_DIR)` directly on a run folder: it works for LoRA-type
adapters (transformers reads `adapter_config.json`, loads the base from `base_model_name_or_path`
and the trained head from the adapter file, and finds the base's tokenizer), but the label names
come from the *base* config, so answers say `LABEL_0`, `LABEL_1`..., and a label count that differs
from the base config's fails with a size mismatch. We keep label names in `peft_ft.json`, never in a
`config.json` inside the adapter folder (that would make transformers treat the folder as a full
model). Pass them yourself: `transformers.pipeline(task, model=RUN_DIR, model_kwargs=label_kwargs(RUN_DIR))`,
or use `peft_ft.pipeline(RUN_DIR)`, which does that and more (the embedded base, full runs, QA, seq2seq).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peft_ft.errors import DataError, PeftFtError
from peft_ft.schema import Recipe


def read_info(run_dir: str | Path) -> dict:
    """`peft_ft.json` of a run folder, with a clear error when the folder is not one."""
    path = Path(run_dir) / "peft_ft.json"
    if not path.is_file():
        what = "has adapter_config.json but" if (Path(run_dir) / "adapter_config.json").is_file() else "has"
        raise PeftFtError(
            f"{run_dir}: not a peft-ft run folder: it {what} no peft_ft.json (the task, base model and label names "
            f"are read from it). Point at a folder written by `peft-ft run` or `peft-ft merge`."
        )
    from peft_ft.integrity import check_info, read_json_object

    return check_info(path, read_json_object(path, "a run folder holds peft_ft.json"))


def label_kwargs(run_dir: str | Path) -> dict:
    """`from_pretrained` arguments that give a run's head its real label names (`num_labels`, `id2label`,
    `label2id`; nothing for families without labels). For `transformers.pipeline(..., model_kwargs=...)`."""
    from peft_ft.tasks import TASKS, TaskData

    info = read_info(run_dir)
    return TASKS[info["task"]].model_kwargs(TaskData(splits={}, labels=info["labels"]))


def pipeline(run_dir: str | Path, device: str = "cpu", **kwargs):
    """The answering callable of a run folder (adapter, full or merged run), with real label names.

    `text-classification` and `token-classification` (aggregation_strategy="simple") runs get a stock
    transformers pipeline; QA and seq2seq runs get `QuestionAnswerer` / `Generator`, because transformers
    5 no longer has those pipelines. `kwargs` go to `transformers.pipeline` (stock pipelines only), except
    `allow_pickle=True`, which lets a folder holding pickle files load, and `trust_remote_code=True`, which lets
the base model's own Python code run (the run's recipe.toml cannot: see peft_ft.safety).
    """
    from peft_ft.run import load_run
    from peft_ft.schema import load_recipe
    from peft_ft.tasks import TASKS

    model, tokenizer, info = load_run(run_dir, device, allow_pickle=kwargs.pop("allow_pickle", False),
                                      trust_remote_code=kwargs.pop("trust_remote_code", False))
    task = TASKS[info["task"]]
    return ANSWERS[task.pipeline_task].build(model, tokenizer, load_recipe(Path(run_dir) / "recipe.toml"), **kwargs)


def _stock(task: str, options: Callable[[Recipe], dict]) -> Callable:
    """A builder of the stock pipeline `task` over a loaded model, with options taken from the run's recipe."""

    def build(model, tokenizer, recipe: Recipe, **kwargs):
        import transformers

        return transformers.pipeline(task, model=model, tokenizer=tokenizer, **{**options(recipe), **kwargs})

    return build


class _FamilyAnswerer:
    """Answers through the family's own code (`encode`, `predict`), with the run's recipe settings:
    the same windows, generation settings and post-processing as evaluation."""

    task_name: str

    def __init__(self, model, tokenizer, recipe: Recipe):
        from peft_ft.tasks import TASKS

        self.model, self.tokenizer, self.recipe, self.task = model, tokenizer, recipe, TASKS[self.task_name]

    def _outputs(self, examples: list[dict], batch_size: int) -> tuple[list[dict], list]:
        from peft_ft.tasks import Split, TaskData

        features = self.task.encode(Split("predict", "<request>", examples), self.tokenizer, self.recipe, TaskData({}, []))
        device = next(self.model.parameters()).device
        return features, self.task.predict(self.model, features, self.tokenizer.pad_token_id or 0, batch_size, device)


class QuestionAnswerer(_FamilyAnswerer):
    """Extractive QA, in place of the removed `question-answering` pipeline: `{"question", "context"}`
    in, `{"answer", "score", "start", "end"}` out (character offsets into the context). Windows and
    span choice are the QA family's (`task.doc_stride`, `task.n_best`, `task.max_answer_length`); the
    score is the answer's softmax weight among every candidate span of its question."""

    task_name = "qa"

    def __call__(self, inputs: dict | list[dict], batch_size: int = 32) -> dict | list[dict]:
        import math

        from peft_ft.tasks.qa import window_candidates

        rows = [inputs] if isinstance(inputs, dict) else inputs
        examples = [{"id": str(i), "question": r["question"], "context": r["context"]} for i, r in enumerate(rows)]
        features, outputs = self._outputs(examples, batch_size)
        t = self.recipe.task
        candidates: list[list] = [[] for _ in rows]
        for feature, (start_logits, end_logits) in zip(features, outputs):
            candidates[feature["_example"]] += window_candidates(start_logits, end_logits, feature["_offsets"], t.n_best, t.max_answer_length)
        answers = []
        for row, found in zip(rows, candidates):
            if not found:
                answers.append({"answer": "", "score": 0.0, "start": 0, "end": 0})
                continue
            best, start, end = max(found)
            score = 1.0 / sum(math.exp(c[0] - best) for c in found)
            answers.append({"answer": row["context"][start:end], "score": score, "start": start, "end": end})
        return answers[0] if isinstance(inputs, dict) else answers


class Generator(_FamilyAnswerer):
    """Seq2seq generation, in place of the removed `text2text-generation` pipeline: text in,
    `[{"generated_text": ...}]` out, with the run's `eval.num_beams` and `eval.max_new_tokens`."""

    task_name = "seq2seq"

    def __call__(self, inputs: str | list[str], batch_size: int = 32) -> list[dict] | list[list[dict]]:
        texts = [inputs] if isinstance(inputs, str) else inputs
        _, generated = self._outputs([{"input": text} for text in texts], batch_size)
        answers = [[{"generated_text": g}] for g in generated]
        return answers[0] if isinstance(inputs, str) else answers


# Turning one request row into a pipeline input. `where` names the row for error messages.

def _field(row: dict, names: list[str], where: str) -> str:
    for name in names:
        if name and isinstance(row.get(name), str):
            return row[name]
    raise DataError(f"{where}: expected a text field {' or '.join(repr(n) for n in dict.fromkeys(names) if n)}; got fields {', '.join(map(repr, row)) or 'none'}")


def _classification_input(row: dict, recipe: Recipe, where: str):
    d = recipe.data
    text = _field(row, ["text", d.text_column], where)
    if not d.text_pair_column:
        return text
    # A pair model answers single texts too, but badly: ask for the second text instead.
    return {"text": text, "text_pair": _field(row, ["text_pair", d.text_pair_column], where)}


def _text_input(row: dict, recipe: Recipe, where: str) -> str:
    if "text" not in row and isinstance(row.get(recipe.data.tokens_field), list):
        return " ".join(map(str, row[recipe.data.tokens_field]))  # a pre-tokenized NER row; offsets refer to this join
    return _field(row, ["text", recipe.data.text_column], where)


def _qa_input(row: dict, recipe: Recipe, where: str) -> dict:
    return {"question": _field(row, ["question"], where), "context": _field(row, ["context"], where)}


def _seq2seq_input(row: dict, recipe: Recipe, where: str) -> str:
    """The row's `text` as it is, else built as in training: the run's `task.input_template` filled
    from the row's fields (SQuAD-style runs, or a changed template), or its `data.text_column`."""
    from peft_ft.tasks.seq2seq import render, uses_template

    if isinstance(row.get("text"), str):
        return row["text"]
    if recipe.data.target_column and not uses_template(recipe):
        return _field(row, [recipe.data.text_column], where)
    return render(recipe.task.input_template, row, where)


def _token_classification(model, tokenizer, recipe: Recipe, **kwargs):
    """The stock token-classification pipeline, cut at the run's `model.max_length` as in training.

    The pipeline takes no truncation option: it truncates at `tokenizer.model_max_length`, which a
    tokenizer saved without one sets to ~1e30, so a long text overflowed the position embeddings (500).
    A shallow copy gets the run's length; the (Rust) tokenizer underneath stays shared."""
    import copy

    import transformers

    tokenizer = copy.copy(tokenizer)
    tokenizer.model_max_length = recipe.model.max_length
    return transformers.pipeline("token-classification", model=model, tokenizer=tokenizer, **{"aggregation_strategy": "simple", **kwargs})


def truncated(tokenizer, item, max_length: int) -> bool:
    """Whether the model sees only the start of this pipeline input (over `max_length` tokens with its
    special tokens). QA inputs never are: their windows cover the whole context."""
    if isinstance(item, str):
        return len(tokenizer(item, truncation=False)["input_ids"]) > max_length
    if isinstance(item, dict) and "text" in item:
        return len(tokenizer(item["text"], item.get("text_pair"), truncation=False)["input_ids"]) > max_length
    return False


def _entities(output: list[dict]) -> dict:
    keys = ("entity_group", "word", "start", "end")
    return {"entities": [{**{k: e[k] for k in keys}, "score": round(float(e["score"]), 6)} for e in output]}


@dataclass(frozen=True)
class Answers:
    build: Callable[..., Any]  # (model, tokenizer, recipe, **kwargs) -> callable(list of inputs, batch_size=)
    to_input: Callable[[dict, Recipe, str], Any]  # (request row, the run's recipe, where) -> one input
    to_answer: Callable[[Any], dict]  # the callable's output for one input -> our JSON answer


ANSWERS: dict[str, Answers] = {
    "text-classification": Answers(
        # Truncate as in training: the pipeline does not by default, and a long text then fails.
        _stock("text-classification", lambda r: {"truncation": True, "max_length": r.model.max_length}), _classification_input, lambda o: {"label": o["label"], "score": round(float(o["score"]), 6)}
    ),
    "token-classification": Answers(_token_classification, _text_input, _entities),
    "question-answering": Answers(QuestionAnswerer, _qa_input, lambda o: {**o, "score": round(o["score"], 6)}),
    "text2text-generation": Answers(Generator, _seq2seq_input, lambda o: {"generated_text": o[0]["generated_text"]}),
}
