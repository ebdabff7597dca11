"""Answering new inputs with a trained run: the per-family answer table and `peft_ft.pipeline(RUN_DIR)`.

One table, `ANSWERS`, keyed by `Task.pipeline_task`, says for each family how to build the callable
that answers (a stock transformers pipeline where transformers 5 still has one), how a request row
becomes that callable's input, and how its output becomes our JSON answer. `peft-ft predict`,
`peft-ft serve` and `peft_ft.pipeline` all go through it, so a new family is one entry.

transformers 5 removed the `question-answering` and `text2text-generation` pipelines (asking for
them raises KeyError "has been removed from transformers"). Those two families are answered by the
small callables below, which run the family's own `encode` / `predict` and take and return what
the 4.x pipelines did.

NER answers are `WordTagger`'s: whole words (a request's `tokens`, or a text's whitespace-separated
words), each with the label of its first subword, every word of a long text (windows at word
boundaries), grouped into entities by conlleval's chunk rules: the decisions the evaluation scores.

Using `transformers.pipeline(task, model=RUN_DIR)` directly on an adapter folder: transformers reads
`adapter_config.json`, loads the base it names (a hub id: peft_ft.rundir.portable) and the trained head from
the adapter file, and finds the base's tokenizer, but the label names come from the *base* config
(`LABEL_0`...), and a label count that differs from it fails with a size mismatch. The names are in
`labels.json` (a list in id order), never in a `config.json` inside the adapter folder (that would
make transformers treat the folder as a full model): pass `model_kwargs=label_kwargs(RUN_DIR)`, or
`id2label=dict(enumerate(labels))` as the run's model card shows, or use `peft_ft.pipeline(RUN_DIR)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peft_ft.errors import DataError, PeftFtError
from peft_ft.recipe.schema import Recipe


def read_info(run_dir: str | Path) -> dict:
    """`peft_ft.json` of a run folder, with a clear error when the folder is not one."""
    path = Path(run_dir) / "peft_ft.json"
    if not path.is_file():
        what = "has adapter_config.json but" if (Path(run_dir) / "adapter_config.json").is_file() else "has"
        raise PeftFtError(
            f"{run_dir}: not a peft-ft run folder: it {what} no peft_ft.json (the task, base model and label names "
            f"are read from it). Point at a folder written by `peft-ft run` or `peft-ft merge`."
        )
    from peft_ft.models.integrity import check_info, read_json_object
    from peft_ft.rundir.portable import resolve_base

    return resolve_base(check_info(path, read_json_object(path, "a run folder holds peft_ft.json")), Path(run_dir))


def label_kwargs(run_dir: str | Path) -> dict:
    """`from_pretrained` arguments that give a run's head its real label names (`num_labels`, `id2label`,
    `label2id`; nothing for families without labels). For `transformers.pipeline(..., model_kwargs=...)`."""
    from peft_ft.tasks import TASKS, TaskData

    info = read_info(run_dir)
    return TASKS[info["task"]].model_kwargs(TaskData(splits={}, labels=info["labels"]))


def pipeline(run_dir: str | Path, device: str = "cpu", **kwargs):
    """The answering callable of a run folder (adapter, full or merged run), with real label names.

    `text-classification` runs get a stock transformers pipeline; NER runs get `WordTagger` (whole
    words, every word of a long text, as the evaluation decides them); QA and seq2seq runs get
    `QuestionAnswerer` / `Generator`, because transformers 5 no longer has those pipelines. `kwargs` go
    to `transformers.pipeline` (stock pipelines only), except `allow_pickle=True`, which lets a folder
    holding pickle files load (see peft_ft.models.safety), and `trust_remote_code=True`, which lets the base
    model's own Python code run (the run's recipe.toml cannot).
    """
    from peft_ft.engine.run import load_run
    from peft_ft.recipe.schema import load_recipe
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

    def _outputs(self, examples: list[dict], batch_size: int, labels: list[str] = ()) -> tuple[list[dict], list]:
        from peft_ft.tasks import Split, TaskData

        features = self.task.encode(Split("predict", "<request>", examples), self.tokenizer, self.recipe, TaskData({}, list(labels)))
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


@dataclass(frozen=True)
class Words:
    """A text to tag, as words with their character spans (a request row's `tokens`, or the text's
    whitespace-separated words)."""

    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of_text(cls, text: str) -> "Words":
        import re

        found = [(m.group(0), m.span()) for m in re.finditer(r"\S+", text)]
        return cls(text, tuple(w for w, _ in found), tuple(s for _, s in found))

    @classmethod
    def of_tokens(cls, tokens: list[str]) -> "Words":
        """The words joined by single spaces: answer offsets refer to that text."""
        spans, at = [], 0
        for token in tokens:
            spans.append((at, at + len(token)))
            at += len(token) + 1
        return cls(" ".join(tokens), tuple(tokens), tuple(spans))


class WordTagger(_FamilyAnswerer):
    """NER answers per word, in place of the stock pipeline's subword groups: each word gets the label
    of its first subword, a long text is cut into windows at word boundaries (`model.max_length`), so
    every word is tagged, exactly as the evaluation decides and scores; consecutive tags become
    entities under conlleval's chunk rules (an entity may open with I-). Text in (or `Words`),
    `[{"entity_group", "word", "start", "end", "score"}]` out, `score` the mean probability of the
    entity's words' tags."""

    task_name = "ner"

    def __call__(self, inputs, batch_size: int = 32):
        from peft_ft.tasks.ner import word_predictions

        single = isinstance(inputs, (str, Words))
        items = [_as_words(i) for i in ([inputs] if single else inputs)]
        names = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        tagged = [i for i, item in enumerate(items) if item.words]  # an empty text has no word to tag
        examples = [{"tokens": list(items[i].words), "tags": [0] * len(items[i].words), "line": i} for i in tagged]
        answers: list[list[dict]] = [[] for _ in items]
        if examples:
            features, outputs = self._outputs(examples, batch_size, names)
            tags, probs = word_predictions(examples, features, outputs)
            for i, row, row_probs in zip(tagged, tags, probs):
                answers[i] = entities(items[i], [names[t] for t in row], row_probs)
        return answers[0] if single else answers


def _as_words(item) -> Words:
    return item if isinstance(item, Words) else Words.of_text(item)


def entities(item: Words, tags: list[str], probs: list[float]) -> list[dict]:
    """Word tags -> entities (conlleval's chunks), with character offsets into the text."""
    from peft_ft.tasks.conlleval import chunks

    found = []
    for kind, first, end in chunks(tags):
        start, stop = item.spans[first][0], item.spans[end - 1][1]
        found.append({"entity_group": kind, "word": item.text[start:stop], "start": start, "end": stop,
                      "score": sum(probs[first:end]) / (end - first)})
    return found


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


def _words_input(row: dict, recipe: Recipe, where: str) -> Words:
    """A NER row: its `tokens` (the run's `data.tokens_field`) as the words, else its text split at whitespace."""
    if "text" not in row and isinstance(row.get(recipe.data.tokens_field), list):
        return Words.of_tokens([str(t) for t in row[recipe.data.tokens_field]])  # offsets refer to the tokens joined by spaces
    return Words.of_text(_field(row, ["text", recipe.data.text_column], where))


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


def truncated(tokenizer, item, max_length: int) -> bool:
    """Whether the model sees only the start of this pipeline input (over `max_length` tokens with its
    special tokens). QA and NER inputs never are: their windows cover the whole text."""
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
    "token-classification": Answers(WordTagger, _words_input, _entities),
    "question-answering": Answers(QuestionAnswerer, _qa_input, lambda o: {**o, "score": round(o["score"], 6)}),
    "text2text-generation": Answers(Generator, _seq2seq_input, lambda o: {"generated_text": o[0]["generated_text"]}),
}
