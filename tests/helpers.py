"""Helpers the test modules share: tiny models and tokenizers built in code, tiny data, short trainings.

Nothing here downloads. Test modules import from here (never from each other); fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

WORDS = (
    "the a an is was not good bad movie film great awful fine terrible plot acting "
    "correct answer student reference plants need water light sun energy grows "
    "john mary lives works in at for from paris london berlin acme corp google "
    "what who where when why how . , ? !"
).split()
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + WORDS
    + ["##s", "##ing", "##ed", "##er"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
)


def write_tiny_bert(path: Path, max_positions: int = 512) -> Path:
    """A BertModel (encoder + pooler, no task head) and its tokenizer, like a pretrained checkpoint. 512
    positions, as BERT: recipes' default model.max_length (256) must fit (checked at validate)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: the label is whether the text says good/great or bad/awful."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(["good", "great", "fine"] if positive else ["bad", "awful", "terrible"])
        filler = " ".join(rng.choice(["the", "movie", "film", "plot", "acting", "was", "is"]) for _ in range(rng.randint(1, 8)))
        rows.append({"text": f"{filler} {word}", "label": "pos" if positive else "neg"})
    return rows


# --- recipes ---------------------------------------------------------------------------------------

# [train] keys most test recipes share: one short pass, small batches, one thread (tiny models gain nothing
# from threads on a busy machine). A test that needs another value passes it; None leaves a key out.
TRAIN_DEFAULTS = {"epochs": 1, "batch_size": 8, "threads": 1}


def toml_value(value) -> str:
    """One value as TOML: strings (and paths) quoted and escaped, bools, ints, floats (nan, inf), lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return toml_string(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    return '"' + "".join(escapes.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text) + '"'


def toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key) else toml_string(key)


def recipe_text(model=None, data_dir=None, *, train="train.jsonl", task=None, data=None, model_opts=None, adapter=None,
                train_opts=None, eval=None, output=None, defaults: bool = True) -> str:
    """The one recipe builder of the tests: TOML text for `model` (model.name) trained on `data_dir`/`train`.

    Each section is a dict of key -> value (model_opts: [model] keys besides name; data: [data] keys besides dir
    and train; train_opts: [train] keys over TRAIN_DEFAULTS). A value of None leaves its key out, so
    `model=None`, `data_dir=None`, `train=None` or `train_opts={"epochs": None}` give a recipe without that key
    (the recipe's own default then applies, and the key is not explicit); `defaults=False` leaves out all of
    TRAIN_DEFAULTS ([train] holds train_opts only). Empty sections are left out."""
    sections = {
        "model": {"name": model, **(model_opts or {})},
        "task": task or {},
        "data": {"dir": data_dir, "train": train, **(data or {})},
        "adapter": adapter or {},
        "train": {**(TRAIN_DEFAULTS if defaults else {}), **(train_opts or {})},
        "eval": eval or {},
        "output": output or {},
    }
    lines = []
    for name, keys in sections.items():
        keys = {k: v for k, v in keys.items() if v is not None}
        if keys:
            lines += [f"[{name}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def write_recipe(path: Path, text: str) -> Path:
    """Writes recipe text (recipe_text(...), or a literal where the text itself is under test) to `path`."""
    path.write_text(text, encoding="utf-8")
    return path


def fit(model, ids, labels, steps: int, lr: float = 1e-2) -> list[float]:
    """Train `model` on one fixed batch with AdamW (trainable parameters only); the loss of each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --- the toy sentiment task, trained as LoRA runs (predict, serve, merge, pipelines, safety) ---------

TEXTS = ["the movie was good", "the plot is awful", "great acting", "terrible film", "the film was fine", "bad plot"]
FLIP = {"pos": "neg", "neg": "pos"}


def train_sentiment(root: Path, tiny_bert: Path, name: str, *, flip: bool = False, method: str = "lora") -> Path:
    """A run folder of the toy sentiment task on the tiny BERT (a few seconds); `flip` swaps the labels,
    so the adapter learns the opposite answers.

    LoRA at lr 5e-3 for 240 steps answers all of TEXTS right (and the flipped adapter all of them flipped)
    for every training seed tried (1-4, min. score 0.93); at lr 1e-2 the tiny model collapsed to two outputs
    on one Intel machine and disagreed on only 4 of 6 texts, so the switching tests depended on the CPU."""
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    data = root / f"data-{name}"
    data.mkdir(parents=True)
    rows = [{**r, "label": FLIP[r["label"]] if flip else r["label"]} for r in sentiment_rows(64, seed=1)]
    write_jsonl(data / "train.jsonl", rows)
    recipe = write_recipe(root / f"{name}.toml", recipe_text(
        tiny_bert, data, adapter={"method": method}, train_opts={"epochs": 60, "batch_size": 16, "lr": 5e-3 if method == "lora" else 2e-3},
        output={"dir": root / "runs", "name": name}))
    return run(load_recipe(recipe))


def train_ner(root: Path, tiny_bert: Path, name: str = "ner", seed: int = 0, epochs: int = 20) -> Path:
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    rng = random.Random(seed)
    rows = []
    for _ in range(48):
        person, place = rng.choice(["john", "mary"]), rng.choice(["paris", "london", "berlin"])
        rows.append({"tokens": [person, rng.choice(["lives", "works"]), "in", place, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
    data = root / f"data-{name}"
    data.mkdir(parents=True)
    write_jsonl(data / "train.jsonl", rows)
    recipe = write_recipe(root / f"{name}.toml", recipe_text(
        tiny_bert, data, model_opts={"max_length": 32}, task={"type": "ner"},
        train_opts={"epochs": epochs, "batch_size": 16, "lr": 1e-2, **({"seed": seed} if seed else {})},
        output={"dir": root / "runs", "name": name}))
    return run(load_recipe(recipe))


def reference(run_dir: Path, texts: list[str]) -> list[dict]:
    """Answers of one run loaded on its own (load_run + the stock pipeline, no adapter switching)."""
    from peft_ft.serving.pipelines import pipeline

    return [{"label": o["label"], "score": round(float(o["score"]), 6)} for o in pipeline(run_dir)(texts)]


# --- toy NER sentences in CoNLL format -------------------------------------------------------------

PEOPLE, PLACES = ["john", "mary"], ["paris", "london", "berlin"]


def toy_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Learnable: names are PER, cities LOC, `acme corp` / `google` ORG."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        s = [(rng.choice(PEOPLE), "B-PER"), (rng.choice(["lives", "works"]), "O"), (rng.choice(["in", "at"]), "O")]
        s += [(rng.choice(PLACES), "B-LOC")] if rng.random() < 0.5 else [("acme", "B-ORG"), ("corp", "I-ORG")]
        if rng.random() < 0.3:
            s += [("for", "O"), ("google", "B-ORG")]
        sentences.append(s + [(".", "O")])
    return sentences


def write_conll(path: Path, sentences) -> Path:
    body = "\n\n".join("\n".join(f"{w} NN O {t}" for w, t in s) for s in sentences)
    path.write_text("-DOCSTART- -X- -X- O\n\n" + body + "\n", encoding="utf-8")
    return path


# --- toy extractive QA -----------------------------------------------------------------------------

CITIES = PLACES
FILLER = ["the film was great .", "the plot was not bad .", "plants need water and light ."]


def qa_rows(n: int, seed: int) -> list[dict]:
    """`<person> lives in <city> .` among filler sentences; "where is <person> ?" asks for the city."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        before, after = " ".join(rng.sample(FILLER, rng.randint(0, 2))), " ".join(rng.sample(FILLER, rng.randint(0, 2)))
        fact = f"{person} lives in {city} ."
        context = " ".join(p for p in (before, fact, after) if p)
        start = context.index(fact) + len(f"{person} lives in ")
        rows.append({"id": f"{seed}-{i}", "title": "toy", "question": f"where is {person} ?", "context": context,
                     "answers": {"text": [city], "answer_start": [start]}})
    return rows


def official_file(path, rows):
    """The same questions in the official nesting (one paragraph per question)."""
    data = [{"title": r["title"], "paragraphs": [{"context": r["context"], "qas": [
        {"id": r["id"], "question": r["question"],
         "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}]}
        for r in rows]
    path.write_text(json.dumps({"version": "1.1", "data": data}))


# --- a tiny T5 -------------------------------------------------------------------------------------

T5_VOCAB = ["<pad>", "</s>", "<unk>", "question", "context", ":"] + WORDS


def write_tiny_t5_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_VOCAB)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    core.decoder = decoders.WordPiece(cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return tokenizer


def write_tiny_t5(path: Path) -> Path:
    """T5ForConditionalGeneration with random weights and its tokenizer in `path`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    write_tiny_t5_tokenizer(path)
    config = T5Config(
        vocab_size=len(T5_VOCAB), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path


# --- a run killed mid-epoch (resume tests) -----------------------------------------------------------

def resume_recipe(model, data, out) -> str:
    """2 epochs of 8 batches, a checkpoint every 3 steps, run folders in `out`/r."""
    return recipe_text(model, data, model_opts={"max_length": 32}, data={"validation": "valid.jsonl", "test": ["test.jsonl"]},
                       train_opts={"epochs": 2, "lr": 1e-2, "checkpoint_every": 3}, output={"dir": out, "name": "r"})


# Runs the CLI in a child process that kills itself on the N-th batch after its first checkpoint:
# a deterministic "killed mid-epoch" (the batches of epoch 1 are steps 1-8; the first checkpoint is step 3).
KILLED_CHILD = """
import os, signal, sys
import peft_ft.engine.checkpoint as checkpoint
import peft_ft.engine.train as train

after, argv = int(sys.argv[1]), sys.argv[2:]
seen = {"saved": False, "batches": 0}
original_save, original_pad = checkpoint.save, train.pad_batch

def save(*args, **kwargs):
    path = original_save(*args, **kwargs)
    seen["saved"] = True
    return path

def pad_batch(*args, **kwargs):
    if seen["saved"]:
        seen["batches"] += 1
        if seen["batches"] == after:
            os.kill(os.getpid(), signal.SIGKILL)
    return original_pad(*args, **kwargs)

checkpoint.save, train.pad_batch = save, pad_batch
from peft_ft.cli import main
sys.exit(main(argv))
"""


def run_killed(recipe: Path, after: int, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "child.py"
    script.write_text(KILLED_CHILD, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, str(script), str(after), "run", str(recipe)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)




def reload_difference(run_dir: Path) -> float:
    """Largest difference between the probabilities a classification run wrote for its test split and
    those of its saved folder reloaded with `load_run` (float32, as users load it)."""
    import numpy as np

    from peft_ft.rundir.load import load_run

    model, tokenizer, info = load_run(run_dir)
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.inference_mode():
        probs = model(**enc).logits.softmax(-1).numpy()
    saved = np.array([[r["probabilities"][n] for n in info["labels"]] for r in rows])
    return float(np.abs(probs - saved).max())
