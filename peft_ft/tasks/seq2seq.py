"""Text-to-text with an encoder-decoder (T5, Flan-T5): generative QA on SQuAD-style data, or any
input/target pairs from a table file.

Generative QA reads the same files as extractive QA; the input is `task.input_template` filled from
each question's fields and the target its first gold answer. With `data.target_column` set, rows
of any table give the target and the input: `data.text_column`, or the template over the row's
columns when it was changed from its default (which names SQuAD fields). Evaluation generates
(`eval.num_beams`, `eval.max_new_tokens`) and scores with SQuAD's EM/F1 over every gold answer.
"""

from __future__ import annotations

import string
from pathlib import Path

from peft_ft.data.batching import eval_batches, pad_batch
from peft_ft.data.files import Split, TaskData, carve_validation, read_split_rows, require_columns, split_sources
from peft_ft.data.formats.squad import squad_metrics
from peft_ft.errors import DataError
from peft_ft.recipe.schema import Recipe, TaskSection
from peft_ft.tasks.base import Answers, Card, FamilyAnswerer, Task, longer_than, register_task, request_text, token_count
from peft_ft.tasks.qa import cap_examples, load_squad_splits, write_official_predictions

# Fields of a SQuAD question that task.input_template may name.
QA_FIELDS = ("id", "title", "question", "context")


def template_fields(template: str) -> list[str]:
    """The `{names}` in a template; ValueError for unbalanced braces."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def render(template: str, row: dict, where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise DataError(
            f"{where}: task.input_template names {{{e.args[0]}}}, which the data lacks; it has: {', '.join(map(str, row))}"
        ) from None


def qa_examples(questions: list[dict], template: str, source: str) -> list[dict]:
    """SQuAD questions as text-to-text examples: input from the template, all gold answers kept for scoring."""
    return [
        {"id": q["id"], "question": q["question"], "input": render(template, q, source), "golds": q["answers"]["text"]}
        for q in questions
    ]


def uses_template(recipe: Recipe) -> bool:
    """Text-to-text rows take their input from the template only when it was changed: the default names
    SQuAD fields. (Not `recipe.explicit`: a run folder's resolved recipe.toml writes every key out.)"""
    return recipe.task.input_template != TaskSection().input_template


def pair_examples(rows: list[dict], recipe: Recipe, source: str) -> list[dict]:
    """Table rows as examples: input from data.text_column (or task.input_template), target from data.target_column."""
    d, templated = recipe.data, uses_template(recipe)
    examples = []
    for number, row in enumerate(rows, 1):
        target = row[d.target_column]
        text = render(recipe.task.input_template, row, f"{source}: row {number}") if templated else row[d.text_column]
        for key, value in (("data.target_column", target), ("data.text_column", text)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source}: row {number}: {key} gives {value!r}, expected text")
        examples.append({"id": str(number), "input": text, "target": target, "golds": [target]})
    return examples


def load_pair_splits(recipe: Recipe, data_dir: Path | None) -> tuple[dict[str, Split], list[str]]:
    d = recipe.data
    columns = {"data.target_column": d.target_column}
    if not uses_template(recipe):
        columns["data.text_column"] = d.text_column
    splits, notes = {}, []
    for name, _, location in split_sources(recipe, data_dir):
        rows = read_split_rows(recipe, location)
        require_columns(rows, columns, location)
        splits[name] = Split(name, location, pair_examples(rows, recipe, location))
    if d.validation_fraction:
        train = splits.pop("train")
        keep, held = carve_validation(train.examples, d.validation_fraction, recipe.train.seed, None)
        held_split = Split("validation", f"{d.validation_fraction:.0%} of {train.source}", held)
        splits = {"train": Split("train", train.source, keep), "validation": held_split, **splits}
        notes.append(f"validation: held out {len(held)} of {len(held) + len(keep)} training rows (seed {recipe.train.seed})")
    return cap_examples(splits, recipe), notes


def generate_texts(model, features: list[dict], pad_id: int, batch_size: int, device) -> list[str]:
    """Generated text per feature, in feature order; batches sorted by length. `labels` never reach
    the model here: with them it would score the gold answer instead of generating."""
    import torch

    settings = features[0]["_generate"]
    tokenizer = settings["tokenizer"]
    model.eval()
    texts: list = [None] * len(features)
    with torch.inference_mode():
        for indices in eval_batches([f["length"] for f in features], batch_size):
            batch = pad_batch([{k: v for k, v in features[i].items() if k != "labels"} for i in indices], pad_id)
            generated = model.generate(
                **{k: v.to(device) for k, v in batch.items()},
                num_beams=settings["num_beams"], max_new_tokens=settings["max_new_tokens"],
            )
            for i, text in zip(indices, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                texts[i] = text.strip()
    return texts


# --- answering requests ----------------------------------------------------------------------------------


class Generator(FamilyAnswerer):
    """Seq2seq generation, in place of the removed `text2text-generation` pipeline: text in,
    `[{"generated_text": ...}]` out, with the run's `eval.num_beams` and `eval.max_new_tokens`."""

    task_name = "seq2seq"

    def __call__(self, inputs: str | list[str], batch_size: int = 32) -> list[dict] | list[list[dict]]:
        texts = [inputs] if isinstance(inputs, str) else inputs
        _, generated = self.run_examples([{"input": text} for text in texts], batch_size)
        answers = [[{"generated_text": g}] for g in generated]
        return answers[0] if isinstance(inputs, str) else answers


def _seq2seq_input(row: dict, recipe: Recipe, where: str) -> str:
    """The row's `text` as it is, else built as in training: the run's `task.input_template` filled
    from the row's fields (SQuAD-style runs, or a changed template), or its `data.text_column`. Every field
    read must hold text: a number or null would be rendered into the prompt as "5" or "None"."""
    if "text" in row:
        return request_text(row, ["text"], where)
    if recipe.data.target_column and not uses_template(recipe):
        return request_text(row, [recipe.data.text_column], where)
    template = recipe.task.input_template
    named = [n for n in dict.fromkeys(template_fields(template)) if n in row]
    return render(template, {**row, **{n: request_text(row, [n], where) for n in named}}, where)


def _cost(tokenizer, recipe: Recipe, item: str) -> int:
    """The input up to model.max_length, plus every token it may generate."""
    return min(token_count(tokenizer, item), recipe.model.max_length) + recipe.eval.max_new_tokens


ANSWERS = Answers(build=Generator, to_input=_seq2seq_input, to_answer=lambda o: {"generated_text": o[0]["generated_text"]},
                  cost=_cost, truncated=longer_than)  # encoding cuts the input to model.max_length


def _card_example(recipe: Recipe) -> str:
    """The card's example input, as Python source, built as this run builds its inputs (`_seq2seq_input`): its
    task.input_template filled in, or a text of its own for a run on a text column."""
    if recipe.data.target_column and not uses_template(recipe):
        return repr("Your input text, as in the training column " + recipe.data.text_column)
    values = {"question": "Where does the Eiffel Tower stand?", "context": "The Eiffel Tower stands in Paris, the capital of France.",
              "title": "Eiffel Tower", "id": "1"}
    fields = [f for f in dict.fromkeys(template_fields(recipe.task.input_template)) if f]
    filled = ", ".join(f"{f}={values.get(f, '...')!r}" for f in fields)
    return f"{recipe.task.input_template!r}.format({filled})"


# Without the text2text-generation pipeline (transformers 5 removed it): the input built, cut and generated from as
# peft-ft does, with the run's own settings filled in by the card.
CARD_ANSWER = """text = {TEXT}
# As peft-ft answers: the input cut to {MAX_LENGTH} tokens, {NUM_BEAMS} beam(s), at most {MAX_NEW_TOKENS} new tokens
inputs = tokenizer(text, truncation=True, max_length={MAX_LENGTH}, return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**inputs, num_beams={NUM_BEAMS}, max_new_tokens={MAX_NEW_TOKENS})
print(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
"""

CARD = Card(
    metrics={"exact_match": ("exact_match", "exact match, SQuAD v1.1 script rules (percent)"),
             "f1": ("f1", "token F1, SQuAD v1.1 script rules (percent)")},
    example=_card_example,
    answer=CARD_ANSWER,
)


@register_task
class Seq2Seq(Task):
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    default_metric = "f1"
    metrics = ("exact_match", "f1")
    formats = ("squad", "jsonl", "parquet", "json", "csv", "tsv")
    pipeline_task = "text2text-generation"
    answers = ANSWERS
    card = CARD
    unread_keys = ("task.labels", "data.text_pair_column", "data.label_column")

    def validate(self, recipe: Recipe) -> list[str]:
        problems = []
        try:
            fields = template_fields(recipe.task.input_template)
        except ValueError as e:
            return [f"task.input_template: {e}; write fields as {{question}} and a literal brace as {{{{ or }}}}"]
        if any(not f or f.isdigit() for f in fields):
            problems.append("task.input_template: name every field, e.g. {question}; positional {} fields have nothing to fill them")
        if not recipe.data.target_column:
            unknown = [f for f in fields if f and not f.isdigit() and f not in QA_FIELDS]
            if unknown:
                problems.append(f"task.input_template: {', '.join(unknown)} not among the SQuAD fields {', '.join(QA_FIELDS)}; "
                                f"for other columns set data.target_column (text-to-text rows)")
        elif recipe.data.format == "squad":
            problems.append("data.format: \"squad\" files hold questions, not input/target rows; "
                            "remove data.target_column or pick a table format")
        return problems

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        if recipe.data.target_column:
            splits, notes = load_pair_splits(recipe, data_dir)
            return TaskData(splits, labels=[], notes=notes)
        splits, notes = load_squad_splits(recipe, data_dir)
        for split in splits.values():
            split.examples = qa_examples(split.examples, recipe.task.input_template, split.source)
        return TaskData(splits, labels=[], notes=notes)

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        enc = tokenizer([e["input"] for e in split.examples], truncation=True, max_length=recipe.model.max_length)
        # `predict` gets neither the recipe nor the tokenizer: they travel with the features.
        settings = {"tokenizer": tokenizer, "num_beams": recipe.eval.num_beams, "max_new_tokens": recipe.eval.max_new_tokens}
        features = [{"input_ids": ids, "length": len(ids), "_generate": settings} for ids in enc["input_ids"]]
        if split.name == "train":
            first_golds = [e["golds"][0] for e in split.examples]
            targets = tokenizer(text_target=first_golds, truncation=True, max_length=recipe.task.max_target_length)
            for feature, labels in zip(features, targets["input_ids"]):
                feature["labels"] = labels
        return features

    def predict(self, model, features: list[dict], pad_id: int, batch_size: int, device) -> list[str]:
        return generate_texts(model, features, pad_id, batch_size, device)

    def score(self, split: Split, features: list[dict], outputs: list[str], data: TaskData) -> tuple[dict, list[dict]]:
        metrics = squad_metrics({e["id"]: p for e, p in zip(split.examples, outputs)}, {e["id"]: e["golds"] for e in split.examples})
        pairs = list(zip(split.examples, outputs))
        if "question" in split.examples[0]:
            records = [{"id": e["id"], "question": e["question"], "predicted": p, "gold": e["golds"]} for e, p in pairs]
        else:
            records = [{"row": int(e["id"]), "input": e["input"], "target": e["target"], "predicted": p} for e, p in pairs]
        return metrics, records

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
        """SQuAD questions: the official {id: answer} JSON; text-to-text rows: one JSON record per line."""
        if records and "question" in records[0]:
            return write_official_predictions(run_dir, split, records)
        return super().write_predictions(run_dir, split, records)
