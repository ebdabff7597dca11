"""Extractive question answering (SQuAD v1.1 style) with an encoder and a start/end head.

The logic of transformers' `run_qa.py` / `utils_qa.py`, as module-level functions: a long context is
cut into overlapping windows (`model.max_length`, `task.doc_stride`), each window is one model row;
at evaluation the n-best start/end pairs of every window are mapped back to the context through the
offset mapping and the best-scoring span over all windows of a question is its answer.
"""

from __future__ import annotations

import math
from pathlib import Path

from peft_ft.data.files import Split, TaskData, carve_groups, split_sources
from peft_ft.data.formats.squad import read_squad_split, squad_metrics
from peft_ft.errors import DataError, PeftFtError
from peft_ft.methods import virtual_positions
from peft_ft.recipe.schema import Recipe
from peft_ft.storage import write_json
from peft_ft.tasks.base import Answers, Card, FamilyAnswerer, Task, register_task, replace_loss, request_text

# Questions named in an error message about their length (the rest are counted).
SHOWN_IDS = 5


def cap_examples(splits: dict[str, Split], recipe: Recipe) -> dict[str, Split]:
    """data.max_train_samples / max_eval_samples: keep the first N questions of each split."""
    for name, split in splits.items():
        cap = recipe.data.max_train_samples if name == "train" else recipe.data.max_eval_samples
        if cap:
            split.examples = split.examples[:cap]
    return splits


def load_squad_splits(recipe: Recipe, data_dir: Path | None) -> tuple[dict[str, Split], list[str]]:
    """The recipe's splits (validation carved by article when data.validation_fraction is set) and a note per carved split."""
    splits = {name: Split(name, location, read_squad_split(recipe, location)) for name, _, location in split_sources(recipe, data_dir)}
    notes = []
    if recipe.data.validation_fraction:
        splits, notes = hold_out_articles(splits, recipe)
    return cap_examples(splits, recipe), notes


def article_of(example: dict) -> str:
    """The unit that must not straddle train and validation: the article (its title), or the paragraph
    where rows carry no title. Questions on one paragraph share its answers' wording."""
    return example.get("title") or example["context"]


def hold_out_articles(splits: dict[str, Split], recipe: Recipe) -> tuple[dict[str, Split], list[str]]:
    """data.validation_fraction for QA: whole articles of train, seeded by train.seed, become `validation`."""
    train, fraction, seed = splits["train"], recipe.data.validation_fraction, recipe.train.seed
    keep, held, articles = carve_groups(train.examples, fraction, seed, article_of)
    if not held:
        raise DataError(f"{train.source}: data.validation_fraction needs at least two articles (titles, or paragraphs "
                        f"where rows have no title) to hold one out; name a data.validation file instead")
    carved = {"train": Split("train", train.source, keep), "validation": Split("validation", f"{fraction:.0%} of {train.source} by article", held)}
    note = (f"validation: held out {articles} whole article(s), {len(held)} of {len(train.examples)} training questions "
            f"(seed {seed}; no article on both sides)")
    return {**carved, **{n: s for n, s in splits.items() if n != "train"}}, [note]


# --- preprocessing ------------------------------------------------------------------------------


def check_question_lengths(questions: list[str], ids: list[str], tokenizer, recipe: Recipe, source: str) -> None:
    """Every window holds the question, the special tokens and more than doc_stride context tokens;
    otherwise the tokenizer panics (a Rust panic, not a Python error) mid-split."""
    lengths = [len(ids_) for ids_ in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    refuse_long_questions(lengths, ids, tokenizer.num_special_tokens_to_add(pair=True), recipe, source)


def check_questions_in_folder(splits: dict[str, Split], location: str, recipe: Recipe) -> None:
    """`check_question_lengths` before the model loads, with the folder's tokenizer.json read by `tokenizers`
    (a tenth of a second; transformers' import takes seconds, and `validate` stays fast). A hub id, or a folder
    with only a slow tokenizer's files, is checked when `run` encodes."""
    path = Path(location) / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # a tokenizer.json may pad or cut every encoding to a length (the embedded one: 128)
    tokenizer.no_truncation()
    specials = tokenizer.post_processor.num_special_tokens_to_add(True) if tokenizer.post_processor else 0
    room = question_room(recipe, specials)
    for split in splits.values():
        # Only questions that could be too long are tokenized: a token covers at least one UTF-8 byte (WordPiece,
        # byte-level BPE; SentencePiece adds one word-start piece), so a question of fewer bytes fits.
        maybe = [e for e in split.examples if len(e["question"].lstrip().encode("utf-8")) + 2 >= room]
        if maybe:
            encoded = tokenizer.encode_batch([e["question"].lstrip() for e in maybe], add_special_tokens=False)
            refuse_long_questions([len(e.ids) for e in encoded], [e["id"] for e in maybe], specials, recipe, split.source)


def question_room(recipe: Recipe, specials: int) -> int:
    """A question must be shorter than this many tokens: a window holds it, the special tokens and more than
    task.doc_stride context tokens."""
    return recipe.model.max_length - specials - recipe.task.doc_stride


def refuse_long_questions(lengths: list[int], ids: list[str], specials: int, recipe: Recipe, source: str) -> None:
    room = question_room(recipe, specials)
    long = [(qid, n) for qid, n in zip(ids, lengths) if n >= room]
    if long:
        shown = ", ".join(f"{qid} ({n} tokens)" for qid, n in long[:SHOWN_IDS])
        more = f" and {len(long) - SHOWN_IDS} more" if len(long) > SHOWN_IDS else ""
        raise DataError(
            f"{source}: question(s) {shown}{more} leave no more than task.doc_stride ({recipe.task.doc_stride}) context "
            f"tokens in a window of model.max_length ({recipe.model.max_length}); raise model.max_length or lower task.doc_stride"
        )


def context_offsets(offsets, sequence_ids) -> list[tuple[int, int] | None]:
    """Character spans of the context tokens; None for question and special tokens, so no answer can come from them."""
    return [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)]


def answer_token_span(offsets: list, start_char: int, end_char: int, cls_index: int) -> tuple[int, int]:
    """Start/end token of the answer `[start_char, end_char)` in one window; (cls, cls) when the window
    does not hold the whole answer (not at all, or cut by the window's edge)."""
    context = [k for k, o in enumerate(offsets) if o is not None]
    if not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def encode_windows(examples: list[dict], tokenizer, recipe: Recipe, *, with_positions: bool, source: str = "") -> list[dict]:
    """One feature per window: token ids (and segment ids when the tokenizer makes them), the
    answer's start/end token for training, and `_example` / `_offsets` for post-processing."""
    if not getattr(tokenizer, "is_fast", False):
        raise PeftFtError(f"model.name: extractive QA needs a fast (Rust) tokenizer for offset mappings; {type(tokenizer).__name__} is not one")
    # Leading spaces (some SQuAD questions have many) only waste window room.
    questions = [e["question"].lstrip() for e in examples]
    check_question_lengths(questions, [e["id"] for e in examples], tokenizer, recipe, source)
    enc = tokenizer(
        questions, [e["context"] for e in examples], truncation="only_second", max_length=recipe.model.max_length,
        stride=recipe.task.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
    )
    features = []
    for i, ids in enumerate(enc["input_ids"]):
        example = enc["overflow_to_sample_mapping"][i]
        offsets = context_offsets(enc["offset_mapping"][i], enc.sequence_ids(i))
        feature = {"input_ids": ids, "length": len(ids), "_example": example, "_offsets": offsets}
        if "token_type_ids" in enc:
            feature["token_type_ids"] = enc["token_type_ids"][i]
        if with_positions:
            answers = examples[example]["answers"]
            start_char = answers["answer_start"][0]
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            span = answer_token_span(offsets, start_char, start_char + len(answers["text"][0]), cls_index)
            feature["start_positions"], feature["end_positions"] = span
        features.append(feature)
    return features


def loss_over_tokens_only(model) -> None:
    """Leave padding out of the loss's softmax over positions.

    transformers' QA heads take the cross-entropy of the start and end logits over every position of the padded
    batch, padding included, so the loss and its gradients depend on how wide the batch was padded. The loss is
    recomputed with padded positions at -inf: the same for any padding. In eval mode too, so that a loss measured
    on a batch is the one training lowers. SQuAD with `train.pad_to_multiple_of = 64` and this loss: test F1
    69.34 over 3 seeds (69.13 with the stock loss, 69.67 unpadded; within run-to-run noise): bench/RESULTS.md,
    "QA loss without padding"."""
    import torch
    import torch.nn.functional as F

    def over_tokens(kwargs, output):
        starts, ends, mask = kwargs.get("start_positions"), kwargs.get("end_positions"), kwargs.get("attention_mask")
        if starts is None or ends is None or mask is None:
            return None
        start_logits, end_logits = output["start_logits"].float(), output["end_logits"].float()
        # Prompt tuning prepends virtual positions to the logits (and the labels were shifted past them): real ones.
        virtual = start_logits.shape[1] - mask.shape[1]
        padded = mask == 0
        if virtual:
            padded = torch.cat([padded.new_zeros(padded.shape[0], virtual), padded], dim=1)
        return (F.cross_entropy(start_logits.masked_fill(padded, float("-inf")), starts)
                + F.cross_entropy(end_logits.masked_fill(padded, float("-inf")), ends)) / 2

    replace_loss(model, over_tokens)


# --- post-processing ----------------------------------------------------------------------------


def window_candidates(start_logits, end_logits, offsets: list, n_best: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """(score, start_char, end_char) for the valid pairs among the n-best starts and ends of one window:
    both in the context, end not before start, at most max_answer_length tokens."""
    import numpy as np

    starts = np.argsort(start_logits)[::-1][:n_best].tolist()
    ends = np.argsort(end_logits)[::-1][:n_best].tolist()
    candidates = []
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                continue
            if e < s or e - s + 1 > max_answer_length:
                continue
            candidates.append((float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1]))
    return candidates


def best_answer(context: str, windows: list[tuple], n_best: int, max_answer_length: int) -> str:
    """The best-scoring span over all windows `(start_logits, end_logits, offsets)` of one question,
    as a substring of the context; "" when no window has a valid span."""
    candidates = [c for s, e, offsets in windows for c in window_candidates(s, e, offsets, n_best, max_answer_length)]
    if not candidates:
        return ""
    _, start, end = max(candidates)
    return context[start:end]


def answers_by_example(examples: list[dict], features: list[dict], outputs: list, n_best: int, max_answer_length: int) -> list[str]:
    """One answer per example from the per-window (start_logits, end_logits) outputs."""
    windows: dict[int, list] = {}
    for feature, (start_logits, end_logits) in zip(features, outputs):
        windows.setdefault(feature["_example"], []).append((start_logits, end_logits, feature["_offsets"]))
    return [best_answer(ex["context"], windows.get(i, []), n_best, max_answer_length) for i, ex in enumerate(examples)]


def write_official_predictions(run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
    """`predictions_<split>.json` = {question id: answer}, the file the official evaluate-v1.1.py scores."""
    path = run_dir / f"predictions_{split.name}.json"
    write_json(path, {r["id"]: r["predicted"] for r in records})
    return [path]


# --- answering requests ----------------------------------------------------------------------------------


class QuestionAnswerer(FamilyAnswerer):
    """Extractive QA, in place of the removed `question-answering` pipeline: `{"question", "context"}`
    in, `{"answer", "score", "start", "end"}` out (character offsets into the context). Windows and
    span choice are the QA family's (`task.doc_stride`, `task.n_best`, `task.max_answer_length`); the
    score is the answer's softmax weight among every candidate span of its question."""

    task_name = "qa"

    def __call__(self, inputs: dict | list[dict], batch_size: int = 32) -> dict | list[dict]:
        rows = [inputs] if isinstance(inputs, dict) else inputs
        examples = [{"id": str(i), "question": r["question"], "context": r["context"]} for i, r in enumerate(rows)]
        refuse_long_request_questions(rows, self.tokenizer, self.recipe)
        features, outputs = self.run_examples(examples, batch_size)
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


def refuse_long_request_questions(rows: list[dict], tokenizer, recipe: Recipe) -> None:
    """A request's question too long for this adapter's windows, named by its row (`where`, from `_qa_input`; else
    its place in the call) with what the asker can change: the question, not the run's recipe."""
    room = question_room(recipe, tokenizer.num_special_tokens_to_add(pair=True))
    lengths = [len(ids) for ids in tokenizer([r["question"].lstrip() for r in rows], add_special_tokens=False)["input_ids"]]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if n >= room:
            raise DataError(f"{row.get('where') or f'input {i + 1}'}: the question is {n} tokens; this adapter's windows "
                            f"({recipe.model.max_length} tokens, more than {recipe.task.doc_stride} of them context) leave "
                            f"room for {room - 1}: shorten the question")


def _qa_input(row: dict, recipe: Recipe, where: str) -> dict:
    return {"question": request_text(row, ["question"], where), "context": request_text(row, ["context"], where),
            "where": where}  # names the row if its question is too long for the windows


def _cost(tokenizer, recipe: Recipe, item: dict) -> int:
    """Every window of the context: all of them go through the model."""
    try:
        enc = tokenizer(item["question"].lstrip(), item["context"], truncation="only_second", max_length=recipe.model.max_length,
                        stride=recipe.task.doc_stride, return_overflowing_tokens=True)
    except Exception:  # tokenizers' own error for a question longer than a window: say it as the answering check does
        refuse_long_request_questions([item], tokenizer, recipe)
        raise
    return sum(len(ids) for ids in enc["input_ids"])


ANSWERS = Answers(build=QuestionAnswerer, to_input=_qa_input, to_answer=lambda o: {**o, "score": round(o["score"], 6)}, cost=_cost)


# How to answer without peft-ft (transformers 5 has no question-answering pipeline), by the evaluation's rule
# (`encode_windows`, `unpack`, `window_candidates`, `best_answer`) with the run's settings filled in by the card.
CARD_ANSWER = """question, context = "Where does the Eiffel Tower stand?", "The Eiffel Tower stands in Paris, the capital of France."
# As peft-ft answers: windows of {MAX_LENGTH} tokens overlapping by {DOC_STRIDE}; in each, the {N_BEST} best starts x
# the {N_BEST} best ends inside the context, end not before start, at most {MAX_ANSWER_LENGTH} tokens; the highest
# start + end logit over all windows wins
room = {MAX_LENGTH} - {DOC_STRIDE} - tokenizer.num_special_tokens_to_add(pair=True)  # a window keeps more than {DOC_STRIDE} context tokens
if len(tokenizer(question.lstrip(), add_special_tokens=False)["input_ids"]) >= room:  # the tokenizer would panic
    raise ValueError(f"the question is too long for these windows: shorten it to under {room} tokens")
inputs = tokenizer(question.lstrip(), context, truncation="only_second", max_length={MAX_LENGTH}, stride={DOC_STRIDE},
                   return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
offsets = inputs.pop("offset_mapping").tolist()
inputs.pop("overflow_to_sample_mapping")
with torch.no_grad():
    out = model(**inputs)
candidates = []  # (score, start char, end char)
for w in range(len(offsets)):
    n = int(inputs["attention_mask"][w].sum())  # the window's own tokens: padding never competes
    in_context = [s == 1 for s in inputs.sequence_ids(w)[:n]]
    starts, ends = out.start_logits[w, :n], out.end_logits[w, :n]
    for s in starts.argsort(descending=True)[:{N_BEST}].tolist():
        for e in ends.argsort(descending=True)[:{N_BEST}].tolist():
            if in_context[s] and in_context[e] and s <= e < s + {MAX_ANSWER_LENGTH}:
                candidates.append((float(starts[s] + ends[e]), offsets[w][s][0], offsets[w][e][1]))
_, start, end = max(candidates) if candidates else (0.0, 0, 0)
answer = context[start:end]
print(answer)
"""
# The same rule over an ONNX export's outputs (numpy arrays).
ONNX_ANSWER = """question, context = "Where does the Eiffel Tower stand?", "The Eiffel Tower stands in Paris, the capital of France."
# As peft-ft answers: windows of {MAX_LENGTH} tokens overlapping by {DOC_STRIDE}; in each, the {N_BEST} best starts x
# the {N_BEST} best ends inside the context, end not before start, at most {MAX_ANSWER_LENGTH} tokens; the highest
# start + end logit over all windows wins
room = {MAX_LENGTH} - {DOC_STRIDE} - tokenizer.num_special_tokens_to_add(pair=True)  # a window keeps more than {DOC_STRIDE} context tokens
if len(tokenizer(question.lstrip(), add_special_tokens=False)["input_ids"]) >= room:  # the tokenizer would panic
    raise ValueError(f"the question is too long for these windows: shorten it to under {room} tokens")
enc = tokenizer(question.lstrip(), context, truncation="only_second", max_length={MAX_LENGTH}, stride={DOC_STRIDE},
                return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="np")
start_logits, end_logits = session.run(["start_logits", "end_logits"], {name: enc[name] for name in INPUTS})
candidates = []  # (score, start char, end char)
for w, offsets in enumerate(enc["offset_mapping"]):
    n = int(enc["attention_mask"][w].sum())  # the window's own tokens: padding never competes
    in_context = [s == 1 for s in enc.sequence_ids(w)[:n]]
    starts, ends = start_logits[w, :n], end_logits[w, :n]
    for s in np.argsort(-starts)[:{N_BEST}]:
        for e in np.argsort(-ends)[:{N_BEST}]:
            if in_context[s] and in_context[e] and s <= e < s + {MAX_ANSWER_LENGTH}:
                candidates.append((float(starts[s] + ends[e]), int(offsets[s][0]), int(offsets[e][1])))
_, start, end = max(candidates) if candidates else (0.0, 0, 0)
print(context[start:end])
"""
CARD = Card(
    metrics={"exact_match": ("exact_match", "exact match, SQuAD v1.1 script rules (percent)"),
             "f1": ("f1", "token F1, SQuAD v1.1 script rules (percent)")},
    peft_auto_class="AutoPeftModel", peft_auto_comment="the generic PeftModel passes token_type_ids on",
    answer=CARD_ANSWER,
    onnx=lambda info, recipe: ONNX_ANSWER,
)


@register_task
class ExtractiveQA(Task):
    name = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    # Not QUESTION_ANS: peft's QA wrapper drops token_type_ids. The generic PeftModel passes them on,
    # and the runner lists the new `qa_outputs` head in modules_to_save, so it trains and saves.
    peft_task_type = None
    default_metric = "f1"
    metrics = ("exact_match", "f1")
    formats = ("squad", "jsonl", "parquet")
    pipeline_task = "question-answering"
    answers = ANSWERS
    card = CARD
    unread_keys = ("task.labels", "data.text_column", "data.text_pair_column", "data.label_column")
    onnx_outputs = ("start_logits", "end_logits")
    onnx_pairs = True  # question, then a context

    def validate(self, recipe: Recipe) -> list[str]:
        problems = []
        if recipe.task.doc_stride >= recipe.model.max_length:
            problems.append(
                f"task.doc_stride: {recipe.task.doc_stride} must be well below model.max_length ({recipe.model.max_length}); "
                f"the usual pair is max_length 384, doc_stride 128"
            )
        return problems

    def load(self, recipe: Recipe, data_dir: Path | None) -> TaskData:
        splits, notes = load_squad_splits(recipe, data_dir)
        return TaskData(splits, labels=[], notes=notes)

    def check_tokens(self, data: TaskData, location: str, recipe: Recipe) -> None:
        check_questions_in_folder(data.splits, location, recipe)

    def prepare_training(self, model, recipe: Recipe, data: TaskData) -> None:
        loss_over_tokens_only(model)

    def encode(self, split: Split, tokenizer, recipe: Recipe, data: TaskData) -> list[dict]:
        features = encode_windows(split.examples, tokenizer, recipe, with_positions=split.name == "train", source=split.source)
        # `score` gets no recipe: the post-processing settings travel with the features.
        settings = {"n_best": recipe.task.n_best, "max_answer_length": recipe.task.max_answer_length}
        # Prompt tuning prepends virtual positions to the start/end logits: the answer sits that much later.
        shift = virtual_positions(recipe)
        for f in features:
            f["_postprocess"] = settings
            if shift and "start_positions" in f:
                f["start_positions"] += shift
                f["end_positions"] += shift
        return features

    def unpack(self, outputs, batch) -> list:
        # Prompt-learning methods prepend virtual positions to the logits: keep the last ones.
        virtual = outputs.start_logits.shape[1] - batch["input_ids"].shape[1]
        starts = outputs.start_logits[:, virtual:].float().cpu().numpy()
        ends = outputs.end_logits[:, virtual:].float().cpu().numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [(starts[i, :n], ends[i, :n]) for i, n in enumerate(lengths)]

    def score(self, split: Split, features: list[dict], outputs: list, data: TaskData) -> tuple[dict, list[dict]]:
        answers = answers_by_example(split.examples, features, outputs, **features[0]["_postprocess"])
        predictions = {ex["id"]: a for ex, a in zip(split.examples, answers)}
        metrics = squad_metrics(predictions, {ex["id"]: ex["answers"]["text"] for ex in split.examples})
        records = [
            {"id": ex["id"], "question": ex["question"], "predicted": a, "gold": ex["answers"]["text"]}
            for ex, a in zip(split.examples, answers)
        ]
        return metrics, records

    def write_predictions(self, run_dir: Path, split: Split, records: list[dict]) -> list[Path]:
        return write_official_predictions(run_dir, split, records)
