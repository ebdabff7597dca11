"""Named-entity recognition (token classification): CoNLL-2003 and any BIO-tagged file, scored with
seqeval and under the conlleval script's rules.

The model sees subwords; everything a user sees is per word. Each word is labelled on its first
subword (the others get -100, or with `task.label_all_subwords` the word's tag, B- turned into
I-), predicted from its first subword, and scored at entity level by seqeval. A sentence longer
than `model.max_length` is cut at word boundaries into several model rows (windows), so every
word gets exactly one prediction.

seqeval modes: `strict` (the default) counts an entity only when its tags form a valid BIO2
span, so a predicted entity that starts with I- is an error. `default` is seqeval's lenient mode,
which reads such an I- as the start of an entity exactly as the conlleval script does. Gold tags
are valid BIO2 either way (IOB1 input is converted or refused on reading), so the two modes
differ only in how ill-formed predictions count.

Every split is also scored under the rules of the CoNLL `conlleval` script (`conlleval_f1`, ...;
peft_ft.tasks.conlleval): the published CoNLL-2003 numbers are conlleval numbers, and on the same
predictions they differ from seqeval strict whenever a predicted entity opens with I-.
`scorers` in the metrics names which scorer each number comes from.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from peft_ft.data.files import Split, TaskData, cap_splits, carve_splits, read_hub_split, split_sources, unicode_text
from peft_ft.data.formats.conll import (
    check_bio_tags,
    check_known_tags,
    fix_iob1,
    label_list,
    read_conll,
    read_jsonl,
    read_tagged_rows,
)
from peft_ft.data.formats.label_studio import pre_tokenize, read_ner
from peft_ft.errors import DataError
from peft_ft.methods import virtual_positions
from peft_ft.recipe.schema import Recipe
from peft_ft.storage import write_atomic
from peft_ft.tasks.base import Answers, Card, FamilyAnswerer, Task, register_task, request_text, token_count
from peft_ft.tasks.conlleval import chunks, score

log = logging.getLogger("peft_ft")


@dataclass
class NerData(TaskData):
    seqeval_mode: str = "strict"  # task.seqeval_mode, needed by `score`, which sees no recipe


def file_format(recipe: Recipe, location: str) -> str:
    """data.format, or from the name: .jsonl is JSONL, anything else a CoNLL-style column file."""
    if recipe.data.format != "auto":
        return recipe.data.format
    return "jsonl" if location.lower().endswith(".jsonl") else "conll"


def read_sentences(recipe: Recipe, location: str) -> tuple[list[dict], int]:
    """Sentences of one split and how many empty ones were skipped."""
    d = recipe.data
    fields = {"tokens_field": d.tokens_field, "tags_field": d.tags_field, "labels": recipe.task.labels}
    if d.hub:
        return read_tagged_rows(list(enumerate(read_hub_split(recipe, location.split(":", 1)[1]), 1)), location, **fields)
    if file_format(recipe, location) == "jsonl":
        return read_jsonl(Path(location), **fields)
    sentences = read_conll(Path(location), token_column=d.token_column, tag_column=d.tag_column,
                           separator=d.separator, comment_prefix=d.comment_prefix)
    return sentences, 0


# --- subwords -----------------------------------------------------------------------------------


def tokenizable_words(tokenizer, sentences: list[list[str]]) -> tuple[list[list[str]], list[list[int]], int]:
    """The words as the model will see them, each word's subword count, and how many words were replaced.

    A word the tokenizer turns into nothing (a zero-width space, a lone control character) would
    get no prediction: it is replaced by the unknown token, which keeps one position for it.
    """
    enc = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    words_out, counts_out, replaced = [], [], 0
    for i, words in enumerate(sentences):
        counts = [0] * len(words)
        for w in enc.word_ids(i):
            if w is not None:
                counts[w] += 1
        if 0 in counts:
            replaced += counts.count(0)
            words = [w if n else tokenizer.unk_token for w, n in zip(words, counts)]
            counts = [n or len(tokenizer(tokenizer.unk_token, add_special_tokens=False)["input_ids"]) for n in counts]
        words_out.append(words)
        counts_out.append(counts)
    return words_out, counts_out, replaced


def word_windows(counts: list[int], budget: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) whose subwords fit in `budget`; a single longer word gets its own
    window (the tokenizer then truncates it, keeping its first subword, which carries its label)."""
    windows, start, used = [], 0, 0
    for i, n in enumerate(counts):
        if used and used + n > budget:
            windows.append((start, i))
            start, used = i, 0
        used += n
    windows.append((start, len(counts)))
    return windows


def align_labels(word_ids: list[int | None], tags: list[int], inside: list[int], label_all: bool) -> list[int]:
    """Subword labels: a word's tag on its first subword; on the others -100, or with `label_all`
    the tag with B- turned into I- (`inside` maps each tag id to its I- id) as run_ner.py does."""
    labels, previous = [], None
    for w in word_ids:
        if w is None:
            labels.append(-100)
        elif w != previous:
            labels.append(tags[w])
        else:
            labels.append(inside[tags[w]] if label_all else -100)
        previous = w
    return labels


def inside_ids(labels: list[str]) -> list[int]:
    index = {n: i for i, n in enumerate(labels)}
    return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(labels)]


# --- scoring ------------------------------------------------------------------------------------


def word_predictions(examples: list[dict], features: list[dict], outputs: list) -> tuple[list[list[int]], list[list[float]]]:
    """One tag id and its probability per word of every example, read at each word's first subword."""
    tags = [[None] * len(e["tokens"]) for e in examples]
    probs = [[0.0] * len(e["tokens"]) for e in examples]
    for feature, (ids, best) in zip(features, outputs):
        row, row_probs = tags[feature["_example"]], probs[feature["_example"]]
        for position, w in enumerate(feature["_word_ids"]):
            if w is not None and row[w] is None:
                row[w], row_probs[w] = int(ids[position]), float(best[position])
    for e, row in zip(examples, tags):
        if None in row:  # encode gives every word a first subword; a gap here is a bug, not bad data
            raise RuntimeError(f"line {e['line']}: word {row.index(None)} got no prediction")
    return tags, probs


def entity_metrics(gold: list[list[str]], predicted: list[list[str]], mode: str = "strict") -> dict:
    """Entity-level precision / recall / F1 overall (micro) and per type, plus word accuracy (seqeval)."""
    import warnings

    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.scheme import IOB2

    kwargs = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    with warnings.catch_warnings():  # seqeval's macro average over zero types warns; we report micro
        warnings.simplefilter("ignore")
        report = classification_report(gold, predicted, output_dict=True, zero_division=0, **kwargs)
    overall = report["micro avg"]
    return {
        "f1": float(overall["f1-score"]),
        "precision": float(overall["precision"]),
        "recall": float(overall["recall"]),
        "accuracy": float(accuracy_score(gold, predicted)),
        "n": len(gold),
        "words": sum(len(s) for s in gold),
        "entities": int(overall["support"]),
        "seqeval_mode": mode,
        "scorers": {"f1": f"seqeval {mode}" + (" (IOB2)" if mode == "strict" else ""), "conlleval_f1": "conlleval rules (peft_ft.tasks.conlleval)"},
        "per_type": {
            name: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]), "support": int(v["support"])}
            for name, v in report.items() if not name.endswith(" avg")
        },
    }


def conlleval_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """The same predictions scored under conlleval's rules, as flat `conlleval_*` keys (any can pick
    the best epoch) and a per-type table."""
    result = score(gold, predicted)
    return {
        **{f"conlleval_{k}": float(result[k]) for k in ("f1", "precision", "recall")},
        "conlleval_predicted_entities": result["predicted_entities"],
        "conlleval_per_type": result["per_type"],
    }


def conll_text(records: list[dict]) -> str:
    """`token gold predicted` per word, a blank line after each sentence: what conlleval reads."""
    lines = []
    for r in records:
        for token, gold, predicted in zip(r["tokens"], r["gold"], r["predicted"]):
            lines.append(f"{'_'.join(token.split()) or '_'} {gold} {predicted}")  # conlleval splits on whitespace
        lines.append("")
    return "\n".join(lines) + "\n" if lines else ""


# --- answering requests: whole words, as the evaluation decides them --------------------------------------


@dataclass(frozen=True)
class Words:
    """A text to tag, as words with their character spans (a request row's `tokens`, or the text split as the run's
    training text was: `word_spans`)."""

    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of_text(cls, text: str, recipe: Recipe | None = None) -> "Words":
        spans = word_spans(recipe)(text)
        return cls(text, tuple(text[a:b] for a, b in spans), tuple(spans))

    @classmethod
    def of_tokens(cls, tokens: list[str]) -> "Words":
        """The words joined by single spaces: answer offsets refer to that text."""
        spans, at = [], 0
        for token in tokens:
            spans.append((at, at + len(token)))
            at += len(token) + 1
        return cls(" ".join(tokens), tuple(tokens), tuple(spans))


def _whitespace_words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def word_spans(recipe: Recipe | None):
    """How a run splits a request's text into words: as its training text was split. A Label Studio run trained on
    `label_studio.pre_tokenize`'s words (punctuation apart: "Britain" "," ...); word files (CoNLL, BIO) come split
    already, and their runs split a text at whitespace (send `tokens` to choose the words)."""
    return pre_tokenize if recipe is not None and recipe.data.format == "label_studio" else _whitespace_words


class Entities(list):
    """A text's entities, a list as stock pipelines return, with `tags`: each word's own label (the request's
    tokens, or the text's words: `word_spans`), as the evaluation decides and scores it."""

    def __init__(self, found: list[dict], tags: list[str]):
        super().__init__(found)
        self.tags = tags


class WordTagger(FamilyAnswerer):
    """NER answers per word, in place of the stock pipeline's subword groups: each word gets the label
    of its first subword, a long text is cut into windows at word boundaries (`model.max_length`), so
    every word is tagged, exactly as the evaluation decides and scores; consecutive tags become
    entities under conlleval's chunk rules (an entity may open with I-). Text in (or `Words`),
    `[{"entity_group", "word", "start", "end", "score"}]` out (an `Entities` list, its `tags` the words'
    labels), `score` the mean probability of the entity's words' tags."""

    task_name = "ner"

    def __call__(self, inputs, batch_size: int = 32, adapter_names: list[str] | None = None):
        """`adapter_names` (one per input): each input's adapter, given to every window of it (mixed-adapter forwards)."""
        single = isinstance(inputs, (str, Words))
        items = [i if isinstance(i, Words) else Words.of_text(i, self.recipe) for i in ([inputs] if single else inputs)]
        names = [self.model.config.id2label[i] for i in range(len(self.model.config.id2label))]
        tagged = [i for i, item in enumerate(items) if item.words]  # an empty text has no word to tag
        examples = [{"tokens": list(items[i].words), "tags": [0] * len(items[i].words), "line": i} for i in tagged]
        answers = [Entities([], []) for _ in items]
        if examples:
            features, outputs = self.run_examples(examples, batch_size, names,
                                                  [adapter_names[i] for i in tagged] if adapter_names else None)
            tags, probs = word_predictions(examples, features, outputs)
            for i, row, row_probs in zip(tagged, tags, probs):
                labels = [names[t] for t in row]
                answers[i] = Entities(entities(items[i], labels, row_probs), labels)
        return answers[0] if single else answers


def entities(item: Words, tags: list[str], probs: list[float]) -> list[dict]:
    """Word tags -> entities (conlleval's chunks), with character offsets into the text."""
    found = []
    for kind, first, end in chunks(tags):
        start, stop = item.spans[first][0], item.spans[end - 1][1]
        found.append({"entity_group": kind, "word": item.text[start:stop], "start": start, "end": stop,
                      "score": sum(probs[first:end]) / (end - first)})
    return found


def _words_input(row: dict, recipe: Recipe, where: str) -> Words:
    """A NER row: its `tokens` (the run's `data.tokens_field`) as the words, else its text split as the run's
    training text was (`word_spans`)."""
    field = recipe.data.tokens_field
    if "text" not in row and isinstance(row.get(field), list):
        tokens = row[field]
        odd = [t for t in tokens if not isinstance(t, str)]
        if odd:
            raise DataError(f"{where}: field {field!r} holds {type(odd[0]).__name__} {str(odd[0])[:40]!r}; expected a list of words (strings)")
        # offsets refer to the tokens joined by spaces
        return Words.of_tokens([unicode_text(t, f"{where}: field {field!r}") for t in tokens])
    if "text" not in row and field in row and recipe.data.text_column not in row:
        raise DataError(f"{where}: field {field!r} is {type(row[field]).__name__} {str(row[field])[:40]!r}; expected a list "
                        f"of words (strings), or send the text in 'text'")
    return Words.of_text(request_text(row, ["text", recipe.data.text_column], where), recipe)


def _entities(output: Entities) -> dict:
    """The JSON answer: the entities, and `tags`, one label per word (a tokens request's tokens, else the text's
    words: `word_spans`): what the evaluation's predictions_<split>.conll holds for the same words."""
    keys = ("entity_group", "word", "start", "end")
    return {"entities": [{**{k: e[k] for k in keys}, "score": round(float(e["score"]), 6)} for e in output],
            "tags": list(output.tags)}


def _cost(tokenizer, recipe: Recipe, item: Words) -> int:
    """Every token of the text: windows of model.max_length cover all of it."""
    return token_count(tokenizer, item.text)


ANSWERS = Answers(build=WordTagger, to_input=_words_input, to_answer=_entities, cost=_cost, mixes="argument")


# Each word's label is its first subword's, as the evaluation scores (peft-ft answers a text longer than
# {MAX_LENGTH} tokens window by window; here the words past it are cut off).
ONNX_ANSWER = """words = {TEXT}.split()  # or your own list of words
enc = tokenizer(words, is_split_into_words=True, truncation=True, return_tensors="np")
[logits] = session.run(["logits"], {name: enc[name] for name in INPUTS})
first = {}  # word -> its first subword's position
for position, word in enumerate(enc.word_ids()):
    if word is not None:
        first.setdefault(word, position)
print([(words[w], labels[int(logits[0, p].argmax())]) for w, p in first.items()])
"""


CARD = Card(
    metrics={
        "f1": ("f1", "entity F1, {seqeval}"),
        "precision": ("precision", "entity precision, {seqeval}"),
        "recall": ("recall", "entity recall, {seqeval}"),
        "conlleval_f1": ("f1", "entity F1, conlleval rules"),
        "conlleval_precision": ("precision", "entity precision, conlleval rules"),
        "conlleval_recall": ("recall", "entity recall, conlleval rules"),
        "accuracy": ("accuracy", "word accuracy"),
    },
    # `stride`: the stock pipeline then reads a long text in overlapping windows of the tokenizer's model_max_length
    # (the run's max_length) instead of cutting it (or failing past the model's positions).
    pipeline='pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="first", stride={STRIDE})\n'
             'print(pipe({TEXT}))',
    example=lambda recipe: '"John Smith flew from London to Berlin."',
    full_pipeline_options=', aggregation_strategy="first", stride={STRIDE}',
    note="Stock pipelines group subwords by their own rules (they split `AL-AIN` at the hyphen), and with `stride` they read a "
         "long text in overlapping windows of {MAX_LENGTH} tokens cut anywhere, merging the windows' entities their own way; "
         "`peft_ft.pipeline(DIR)` and `peft-ft predict` cut a long text at word boundaries into windows that do not overlap "
         "and answer per whitespace word with the label of its first subword, as the evaluation scores.",
    onnx=lambda info, recipe: ONNX_ANSWER,
)


@register_task
class Ner(Task):
    name = "ner"
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    default_metric = "f1"
    metrics = ("f1", "precision", "recall", "accuracy", "conlleval_f1", "conlleval_precision", "conlleval_recall")
    formats = ("conll", "jsonl", "label_studio")
    pipeline_task = "token-classification"
    answers = ANSWERS
    card = CARD
    unread_keys = ("data.text_pair_column", "data.label_column")
    onnx_outputs = ("logits",)

    def validate(self, recipe: Recipe) -> list[str]:
        d = recipe.data
        if d.token_column == d.tag_column:
            return [f"data.tag_column: the same column as data.token_column ({d.token_column}); "
                    f"the default reads the token from column 0 and the tag from the last"]
        return []

    def load(self, recipe: Recipe, data_dir: Path | None) -> NerData:
        notes, raw = [], {}
        for name, _key, location in split_sources(recipe, data_dir):
            if recipe.data.format == "label_studio":  # a Label Studio export: its notes say what was left out
                sentences, read = read_ner(recipe, Path(location))
                notes += [f"{name}: {note}" for note in read]
                empty = 0
            else:
                sentences, empty = read_sentences(recipe, location)
            if empty:
                notes.append(f"{name}: skipped {empty} empty sentence(s) in {location}")
            if not sentences:
                raise DataError(f"{location}: no sentences; check data.format, data.separator and the columns")
            check_bio_tags(sentences, location)
            converted = fix_iob1(sentences, location, recipe.task.convert_iob1)
            if converted:
                notes.append(f"{name}: converted {converted} IOB1 tag(s) (I- opening an entity) to B- in {location}")
            raw[name] = (location, sentences)
        train_location = raw["train"][0]
        if recipe.task.labels:
            labels, fix = list(recipe.task.labels), "is not in task.labels; add it there"
        else:
            labels = label_list({t for s in raw["train"][1] for t in s["tags"]})
            fix = f"never occurs in the training file {train_location}; list every tag in task.labels to allow it"
        splits = {}
        for name, (location, sentences) in raw.items():
            check_known_tags(sentences, labels, location, fix)
            index = {n: i for i, n in enumerate(labels)}
            examples = [{"tokens": s["tokens"], "tags": [index[t] for t in s["tags"]], "line": s["line"]} for s in sentences]
            splits[name] = Split(name, location, examples)
        splits, carved = carve_splits(splits, recipe, None, "sentences")
        notes += carved
        cap_splits(splits, recipe)
        return NerData(splits, labels, notes, seqeval_mode=recipe.task.seqeval_mode)

    def model_kwargs(self, data: TaskData) -> dict:
        # Real tag names in the config: a pipeline then answers "B-PER", never "LABEL_3".
        return {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {n: i for i, n in enumerate(data.labels)},
        }

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        max_length = recipe.model.max_length
        words, counts, replaced = tokenizable_words(tokenizer, [e["tokens"] for e in split.examples])
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        spans = [(i, start, end) for i, c in enumerate(counts) for start, end in word_windows(c, budget)]
        enc = tokenizer([words[i][s:e] for i, s, e in spans], is_split_into_words=True, truncation=True, max_length=max_length)
        inside, label_all = inside_ids(data.labels), recipe.task.label_all_subwords
        # Prompt tuning prepends virtual positions to the logits (peft does not strip them): label them -100.
        virtual = [-100] * virtual_positions(recipe)
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        features = []
        for row, (i, start, _end) in enumerate(spans):
            word_ids = [None if w is None else w + start for w in enc.word_ids(row)]
            features.append({
                **{k: enc[k][row] for k in keys},
                "labels": virtual + align_labels(word_ids, split.examples[i]["tags"], inside, label_all),
                "length": len(enc["input_ids"][row]),
                "_example": i,
                "_word_ids": word_ids,
            })
        self._note(data, split, len(spans), len({i for i, s, _ in spans if s > 0}), replaced, max_length)
        return features

    @staticmethod
    def _note(data: TaskData, split: Split, rows: int, windowed: int, replaced: int, max_length: int) -> None:
        # encode runs after the runner has logged the load notes: log here as well as keeping the note.
        notes = []
        if windowed:
            notes.append(f"{split.name}: {windowed} sentence(s) longer than model.max_length ({max_length} tokens) "
                         f"split into windows ({rows} model rows for {len(split.examples)} sentences)")
        if replaced:
            notes.append(f"{split.name}: {replaced} word(s) that the tokenizer reads as nothing were given the unknown token")
        for note in notes:
            log.info(note)
        data.notes.extend(notes)

    def unpack(self, outputs, batch) -> list:
        logits = outputs.logits.float()
        # Prompt-learning methods prepend virtual positions to the logits: keep the last ones.
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]
        best, ids = logits.softmax(-1).max(-1)
        lengths = batch["attention_mask"].sum(1).tolist()
        return [(ids[i, :n].cpu().numpy(), best[i, :n].cpu().numpy()) for i, n in enumerate(lengths)]

    def score(self, split: Split, features: list[dict], outputs: list, data: TaskData) -> tuple[dict, list[dict]]:
        predicted, probs = word_predictions(split.examples, features, outputs)
        names = data.labels
        gold_tags = [[names[t] for t in e["tags"]] for e in split.examples]
        predicted_tags = [[names[t] for t in row] for row in predicted]
        metrics = entity_metrics(gold_tags, predicted_tags, getattr(data, "seqeval_mode", "strict"))
        metrics.update(conlleval_metrics(gold_tags, predicted_tags))
        rows_per_example = Counter(f["_example"] for f in features)
        metrics["windowed"] = sum(1 for n in rows_per_example.values() if n > 1)  # sentences cut into several rows
        records = [
            {"line": e["line"], "tokens": e["tokens"], "gold": g, "predicted": p, "confidence": [round(q, 4) for q in c]}
            for e, g, p, c in zip(split.examples, gold_tags, predicted_tags, probs)
        ]
        return metrics, records

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
        path = run_dir / f"predictions_{split.name}.conll"
        write_atomic(path, conll_text(records))
        return [*super().write_predictions(run_dir, split, records), path]
