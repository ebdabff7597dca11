"""Run folders travel: copied elsewhere, they load with stock transformers + peft, offline, in a fresh
interpreter that imports nothing of peft-ft, with the trained head and the real label names.

Each python block of a folder's README.md (its model card) runs as it is, in a subprocess started
in a temporary directory that holds a copy of the folder, with HF_HUB_OFFLINE=1 and a hub cache
where the base is registered (peft_ft.models.hub_cache). A check appended to the block compares what the
stock model answers with what the run's own evaluation predicted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import FILLER, qa_rows, recipe_text, sentiment_rows, write_jsonl, write_recipe

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
TINY_ID = "peft-ft-tests/tiny-bert"


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), "a model card opens with YAML front matter"
    return yaml.safe_load(card.split("---\n", 2)[1])


def clean_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "PEFT_FT"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


NOT_PEFT_FT = "import sys as _sys\nassert not [m for m in _sys.modules if m.split('.')[0] == 'peft_ft'], 'peft_ft was imported'\n"

# Word tags at each word's first subword, as the evaluation reads them, for the sentences in check.json.
NER_CHECK = NOT_PEFT_FT + """
import json as _json, torch as _torch
_out = []
for _words in _json.load(open("check.json")):
    _enc = tokenizer(_words, is_split_into_words=True, return_tensors="pt", truncation=True)
    with _torch.no_grad():
        _ids = model(**_enc).logits[0].argmax(-1).tolist()
    _first = {}
    for _pos, _w in enumerate(_enc.word_ids(0)):
        if _w is not None:
            _first.setdefault(_w, _pos)
    _out.append([model.config.id2label[_ids[_first[_w]]] for _w in range(len(_words))])
print("CHECK " + _json.dumps({"tags": _out, "labels": [model.config.id2label[i] for i in range(len(model.config.id2label))]}))
"""

# Class probabilities of the texts in check.json.
CLASSIFICATION_CHECK = NOT_PEFT_FT + """
import json as _json, torch as _torch
_rows = _json.load(open("check.json"))
_enc = tokenizer([r["text"] for r in _rows], padding=True, return_tensors="pt")
with _torch.no_grad():
    _probs = model(**_enc).logits.softmax(-1).tolist()
print("CHECK " + _json.dumps({"probs": _probs, "labels": [model.config.id2label[i] for i in range(len(model.config.id2label))]}))
"""


def run_snippet(code: str, folder: Path, cache: Path, check: str = "", check_data=None) -> dict | None:
    """Run a card's snippet (plus a check) in a fresh interpreter whose working directory holds a copy
    of the folder; returns what the check printed after CHECK."""
    workdir = folder.parent
    if check_data is not None:
        (workdir / "check.json").write_text(json.dumps(check_data))
    done = subprocess.run([sys.executable, "-c", code + "\n" + check], cwd=workdir, env=clean_env(cache),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
    found = [line[len("CHECK "):] for line in done.stdout.splitlines() if line.startswith("CHECK ")]
    return json.loads(found[-1]) if found else None


def copy_folder(run_dir: Path, root: Path, name: str) -> Path:
    copy = root / "elsewhere" / name
    shutil.copytree(run_dir, copy)
    return copy


def assert_no_machine_paths(folder: Path, *paths: Path) -> None:
    for f in folder.iterdir():
        if f.suffix in (".json", ".toml", ".md", ".log"):
            text = f.read_text(encoding="utf-8")
            for p in paths:
                assert str(p) not in text, f"{f.name} holds the machine path {p}"
            assert not re.search(r"(?<![\w.])/(tmp|home|work|root|usr)/", text), f"{f.name} holds an absolute path"


# --- the hub cache ---------------------------------------------------------------------------------


def test_register_makes_a_hub_id_resolve_offline_and_keeps_real_copies(tmp_path, tiny_bert):
    from huggingface_hub import try_to_load_from_cache

    from peft_ft.models.hub_cache import register

    cache = tmp_path / "hub"
    snapshot, what = register(tiny_bert, TINY_ID, cache)
    assert what == "registered" and (snapshot / "config.json").resolve() == (tiny_bert / "config.json").resolve()
    assert try_to_load_from_cache(TINY_ID, "config.json", cache_dir=cache) == str(snapshot / "config.json")
    assert register(tiny_bert, TINY_ID, cache) == (snapshot, "up to date")
    # the package moved (a rebuilt venv): the links follow it
    moved = shutil.copytree(tiny_bert, tmp_path / "moved")
    snapshot2, what = register(moved, TINY_ID, cache)
    assert what == "registered" and snapshot2 == snapshot and (snapshot / "config.json").resolve() == (moved / "config.json").resolve()
    # a real cached copy (refs/main naming another snapshot that loads) is left alone
    other = tmp_path / "hub2"
    repo = other / f"models--{TINY_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    shutil.copytree(tiny_bert, repo / "snapshots" / ("a" * 40))
    kept, what = register(tiny_bert, TINY_ID, other)
    assert what.startswith("kept") and kept.name == "a" * 40
    assert (repo / "refs" / "main").read_text() == "a" * 40
    # one that loads nothing (links into a package since removed) is replaced: it was kept, and the id stayed broken
    for f in (repo / "snapshots" / ("a" * 40)).iterdir():
        f.unlink()
        f.symlink_to(tmp_path / "gone" / f.name)
    snapshot3, what = register(tiny_bert, TINY_ID, other)
    assert what == f"registered (in place of snapshot {'a' * 12}, which held no loadable model)"
    assert (repo / "refs" / "main").read_text() == snapshot3.name != "a" * 40
    assert try_to_load_from_cache(TINY_ID, "config.json", cache_dir=other) == str(snapshot3 / "config.json")


def test_register_embedded_command(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from peft_ft.cli import main
    from peft_ft.models.loading import embedded_model_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["register-embedded"]) == 0
    out = capsys.readouterr().out
    assert "sentence-transformers/all-MiniLM-L6-v2" in out and "registered" in out
    snapshot = next((tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").resolve() == (embedded_model_dir() / "model.safetensors").resolve()


# --- a freshly trained tiny adapter -----------------------------------------------------------------


def ner_sentences(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(["john", "mary"]), rng.choice(["paris", "london", "berlin"])
        rows.append({"tokens": [person, rng.choice(["lives", "works"]), "in", place, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
    return rows


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, tiny_bert):
    """A NER and a sentiment run on the tiny BERT named by hub id (registered in a hub cache of the
    test's own), trained by `peft-ft run` in a subprocess with HF_HUB_OFFLINE=1."""
    from peft_ft.models.hub_cache import register

    root = tmp_path_factory.mktemp("portable")
    cache = root / "hub"
    register(tiny_bert, TINY_ID, cache)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "ner_train.jsonl", ner_sentences(48, 0))
    write_jsonl(data / "ner_test.jsonl", ner_sentences(12, 1))
    write_jsonl(data / "sent_train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(data / "sent_test.jsonl", sentiment_rows(12, seed=3))
    runs = {}
    for name, task, model_opts in [("tiny_ner", "ner", {"max_length": 32}), ("tiny_sentiment", "classification", None)]:
        prefix = "ner" if task == "ner" else "sent"
        recipe = write_recipe(root / f"{name}.toml", recipe_text(
            TINY_ID, data, train=f"{prefix}_train.jsonl", model_opts=model_opts, task={"type": task},
            data={"test": [f"{prefix}_test.jsonl"]}, train_opts={"epochs": 20, "batch_size": 16, "lr": 1e-2},
            output={"dir": root / "runs", "name": name}))
        runs[name] = run_offline(recipe, root, cache)
    return root, cache, runs


def run_offline(recipe: Path, root: Path, cache: Path) -> Path:
    """`peft-ft run RECIPE` in a subprocess with HF_HUB_OFFLINE=1 and the hub cache `cache`; the run folder."""
    done = subprocess.run([sys.executable, "-m", "peft_ft", "run", str(recipe)], cwd=root, env=clean_env(cache),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1].removeprefix("done: "))


def test_a_run_folder_names_its_base_portably(hub_runs):
    root, _, runs = hub_runs
    for name, run_dir in runs.items():
        config = json.loads((run_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == TINY_ID
        info = json.loads((run_dir / "peft_ft.json").read_text())
        assert (info["base_model"], info["base_model_id"], info["base_model_source"]) == (TINY_ID, TINY_ID, "hub")
        assert "run_dir" not in info and info["data"]["train"].endswith("_train.jsonl") and "/" not in info["data"]["train"]
        assert json.loads((run_dir / "labels.json").read_text()) == info["labels"]
        assert not (run_dir / "config.json").exists()  # it would make transformers take the folder for a full model
        assert_no_machine_paths(run_dir, root)
        assert "output.dir" in (run_dir / "recipe.toml").read_text().splitlines()[1]  # shortened, and said so


@pytest.mark.parametrize("name", ["tiny_ner", "tiny_sentiment"])
def test_card_snippets_load_a_fresh_adapter_with_stock_tools(hub_runs, tmp_path, name):
    _, cache, runs = hub_runs
    run_dir = runs[name]
    card = (run_dir / "README.md").read_text()
    blocks = snippets(card)
    assert len(blocks) == 2 and "AutoPeftModelFor" in blocks[0] and "PeftModel.from_pretrained" in blocks[1]
    labels = json.loads((run_dir / "labels.json").read_text())
    for i, code in enumerate(blocks):
        folder = copy_folder(run_dir, tmp_path / str(i), run_dir.name)  # as written: runs/NAME/<timestamp>
        if name == "tiny_ner":
            lines = [block.splitlines() for block in (run_dir / "predictions_ner_test.conll").read_text().strip().split("\n\n")]
            sentences = [[line.split()[0] for line in s] for s in lines]
            predicted = [[line.split()[2] for line in s] for s in lines]
            assert len(sentences) == 12
            found = run_snippet(code, folder, cache, NER_CHECK, sentences)
            assert found["labels"] == labels
            assert found["tags"] == predicted  # the trained head, word by word as the evaluation decided
        else:
            rows = [json.loads(line) for line in (run_dir / "predictions_sent_test.jsonl").read_text().splitlines()]
            found = run_snippet(code, folder, cache, CLASSIFICATION_CHECK, [{"text": r["text"]} for r in rows])
            assert found["labels"] == labels == ["neg", "pos"]
            for row, probs in zip(rows, found["probs"]):
                assert probs == pytest.approx([row["probabilities"][n] for n in labels], abs=1e-5)


def test_stock_pipeline_on_the_folder_with_labels_from_labels_json(hub_runs, tmp_path):
    """`transformers.pipeline(task, model=DIR)` reads adapter_config.json itself; labels.json supplies the names."""
    _, cache, runs = hub_runs
    run_dir = runs["tiny_sentiment"]
    folder = copy_folder(run_dir, tmp_path, "tiny_sentiment")
    rows = [json.loads(line) for line in (run_dir / "predictions_sent_test.jsonl").read_text().splitlines()]
    code = NOT_PEFT_FT + """
import json
from transformers import pipeline
labels = json.load(open("tiny_sentiment/labels.json"))
pipe = pipeline("text-classification", model="tiny_sentiment", model_kwargs={"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}})
print("CHECK " + json.dumps([[a["label"], a["score"]] for a in pipe([r["text"] for r in json.load(open("check.json"))])]))
"""
    found = run_snippet(code, folder, cache, check_data=[{"text": r["text"]} for r in rows])
    assert [label for label, _ in found] == [r["predicted"] for r in rows]  # the trained head, real names
    assert [score for _, score in found] == pytest.approx([r["probabilities"][r["predicted"]] for r in rows], abs=1e-5)
    assert {r["predicted"] for r in rows} == {"neg", "pos"}


def test_card_front_matter(hub_runs):
    _, _, runs = hub_runs
    for name, run_dir in runs.items():
        meta = front_matter((run_dir / "README.md").read_text())
        assert {"base_model", "library_name", "pipeline_tag", "datasets", "model-index"} <= set(meta)
        assert meta["base_model"] == TINY_ID and meta["library_name"] == "peft" and meta["datasets"] == ["data"]
        [result] = meta["model-index"][0]["results"]
        assert result["dataset"]["split"].endswith("_test")
        names = {m["name"] for m in result["metrics"]}
        if name == "tiny_ner":
            assert meta["pipeline_tag"] == "token-classification"
            assert {"entity F1, seqeval strict (IOB2)", "entity F1, conlleval rules"} <= names
        else:
            assert meta["pipeline_tag"] == "text-classification"
            assert any(n.startswith("macro-F1 over the classes present") for n in names) and "macro-F1 over all 2 classes" in names
        metrics = json.loads((run_dir / "metrics.json").read_text())
        split = result["dataset"]["split"]
        for m in result["metrics"]:
            assert isinstance(m["value"], float) and m["type"]
        if name == "tiny_ner":
            f1 = next(m["value"] for m in result["metrics"] if m["name"] == "entity F1, conlleval rules")
            assert f1 == round(metrics[split]["conlleval_f1"], 4)


# --- the snippets on inputs longer than the run's max_length ---------------------------------------------

NER_EXAMPLE, SENTIMENT_EXAMPLE = '"John Smith flew from London to Berlin."', '"This is great."'
QA_EXAMPLE = ('"Where does the Eiffel Tower stand?"', '"The Eiffel Tower stands in Paris, the capital of France."')
# 65 words, far past tiny_ner's 32 tokens; the last sentence's entities lie beyond the first window
LONG_NER = " ".join(["mary works in london ."] * 12 + ["john lives in paris ."])
# 660 tokens: past the tiny BERT's 512 positions, which a stock pipeline without truncation fails on
LONG_SENTIMENT = " ".join(["the plot was not bad and the acting was fine ."] * 60 + ["the movie was great"])

# What the snippet's own pipeline call answered (`with_example` keeps it as RESULT).
RESULT_CHECK = NOT_PEFT_FT + 'import json as _j\nprint("CHECK " + _j.dumps(RESULT, default=lambda x: x.item()))\n'
QA_CHECK = NOT_PEFT_FT + 'import json as _j\nprint("CHECK " + _j.dumps(answer))\n'


def with_example(code: str, *replacements: tuple[str, str]) -> str:
    """The snippet with its example input replaced, its printed pipeline answer kept as RESULT."""
    for old, new in replacements:
        assert old in code, old
        code = code.replace(old, new)
    return code.replace("print(pipe(", "RESULT = (pipe(")


def predict_offline(run_dir: Path, cache: Path, rows: list[dict], workdir: Path) -> list[dict]:
    """`peft-ft predict` on `rows`, offline: what peft-ft answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_jsonl(workdir / "in.jsonl", rows)
    done = subprocess.run([sys.executable, "-m", "peft_ft", "predict", "--adapter", f"a={run_dir}", "in.jsonl", "--output", "out.jsonl"],
                          cwd=workdir, env=clean_env(cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]


def last_sentence_entities(entities: list[dict], text: str) -> set:
    return {(e["entity_group"], e["word"]) for e in entities if e["start"] >= text.rindex("john")}


@pytest.mark.parametrize("name", ["tiny_ner", "tiny_sentiment"])
def test_card_snippets_read_a_text_longer_than_max_length(hub_runs, tmp_path, name):
    """The base's tokenizer knows no max_length: the snippets cut (classification, as peft-ft does) or window (NER) at
    the run's, where a stock pipeline would fail past the model's positions or read more than the run did."""
    _, cache, runs = hub_runs
    run_dir = runs[name]
    text, example = (LONG_NER, NER_EXAMPLE) if name == "tiny_ner" else (LONG_SENTIMENT, SENTIMENT_EXAMPLE)
    [ours] = predict_offline(run_dir, cache, [{"text": text}], tmp_path / "predict")
    blocks = snippets((run_dir / "README.md").read_text())
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        folder = copy_folder(run_dir, tmp_path / str(i), run_dir.name)
        found = run_snippet(with_example(code, (example, json.dumps(text))), folder, cache, RESULT_CHECK)
        if name == "tiny_sentiment":
            [found] = found if isinstance(found, list) else [found]
            assert found["label"] == ours["label"] and found["score"] == pytest.approx(ours["score"], abs=1e-5)
        else:  # other windows than peft-ft's (answers may differ), but the whole text is read: the last sentence's entities
            assert {("PER", "john"), ("LOC", "paris")} <= last_sentence_entities(found, text)
            assert {("PER", "john"), ("LOC", "paris")} <= last_sentence_entities(ours["entities"], text)


@pytest.fixture(scope="module")
def hub_qa_run(tmp_path_factory, tiny_bert):
    """A QA LoRA run on the tiny BERT by hub id, with short windows and non-default span settings."""
    from peft_ft.models.hub_cache import register

    root = tmp_path_factory.mktemp("portable-qa")
    cache = root / "hub"
    register(tiny_bert, TINY_ID, cache)
    (root / "data").mkdir()
    write_jsonl(root / "data" / "train.jsonl", qa_rows(48, seed=1))
    recipe = write_recipe(root / "tiny_qa.toml", recipe_text(
        TINY_ID, root / "data", model_opts={"max_length": 32}, task={"type": "qa", "doc_stride": 8, "n_best": 5, "max_answer_length": 4},
        train_opts={"epochs": 4, "batch_size": 16, "lr": 1e-2}, output={"dir": root / "runs", "name": "tiny_qa"}))
    return cache, run_offline(recipe, root, cache)


def test_qa_card_snippets_answer_as_peft_ft_over_several_windows(hub_qa_run, tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    cache, run_dir = hub_qa_run
    card = (run_dir / "README.md").read_text()
    assert "max_length=32, stride=8" in card and "[:5]" in card and "s + 4:" in card  # the run's settings
    pairs = [("where is mary ?", " ".join(FILLER * 3 + ["mary lives in london ."] + FILLER * 2)),
             ("who works at acme ?", " ".join(FILLER * 2 + ["john works at acme corp in paris ."] + FILLER * 3))]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    for question, context in pairs:
        windows = tokenizer(question, context, truncation="only_second", max_length=32, stride=8, return_overflowing_tokens=True)
        assert len(windows["input_ids"]) >= 4
    ours = predict_offline(run_dir, cache, [{"question": q, "context": c} for q, c in pairs], tmp_path / "predict")
    blocks = snippets(card)
    assert len(blocks) == 2
    for i, (code, (question, context), answer) in enumerate(zip(blocks, pairs, ours)):
        folder = copy_folder(run_dir, tmp_path / str(i), run_dir.name)
        code = with_example(code, (QA_EXAMPLE[0], json.dumps(question)), (QA_EXAMPLE[1], json.dumps(context)))
        assert run_snippet(code, folder, cache, QA_CHECK) == answer["answer"] != ""


def test_qa_card_snippets_refuse_a_question_too_long_for_the_windows(hub_qa_run, tmp_path):
    """32-token windows overlapping by 8 hold a question of at most 20 tokens: longer, the tokenizer panics (a Rust
    PanicException naming no cause). The snippet says what to change instead, as peft-ft does."""
    cache, run_dir = hub_qa_run
    question = " ".join(["where does mary live"] * 6)  # 24 words, each one token of the tiny vocabulary
    for i, code in enumerate(snippets((run_dir / "README.md").read_text())):
        folder = copy_folder(run_dir, tmp_path / str(i), run_dir.name)
        code = with_example(code, (QA_EXAMPLE[0], json.dumps(question)))
        done = subprocess.run([sys.executable, "-c", code], cwd=folder.parent, env=clean_env(cache), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1 and "panicked" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == ("ValueError: the question is too long for these windows: "
                                                        "shorten it to under 21 tokens")


FULL_DATA = {
    "classification": (lambda: sentiment_rows(48, seed=1), {"lr": 2e-3}, SENTIMENT_EXAMPLE),
    "ner": (lambda: ner_sentences(48, 0), {"lr": 2e-3, "epochs": 15}, NER_EXAMPLE),
    "qa": (lambda: qa_rows(48, seed=1), {"lr": 2e-3}, None),
}


@pytest.mark.parametrize("task", list(FULL_DATA))
def test_full_run_folders_keep_the_runs_max_length_and_their_snippet_reads_long_inputs(task, tmp_path, tiny_bert):
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe
    from peft_ft.serving.pipelines import pipeline

    rows, train_opts, example = FULL_DATA[task]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows())
    opts = {"doc_stride": 8} if task == "qa" else {}
    run_dir = run(load_recipe(write_recipe(tmp_path / "full.toml", recipe_text(
        tiny_bert, data, model_opts={"max_length": 32}, task={"type": task, **opts}, adapter={"method": "full"},
        train_opts={"epochs": 6, "batch_size": 16, **train_opts}, output={"dir": tmp_path / "runs", "name": f"full_{task}"}))))
    assert json.loads((run_dir / "tokenizer_config.json").read_text())["model_max_length"] == 32
    [code] = snippets((run_dir / "README.md").read_text())
    folder = copy_folder(run_dir, tmp_path / "copy", run_dir.name)
    ours = pipeline(run_dir)
    if task == "qa":
        question, context = "where is mary ?", " ".join(FILLER * 3 + ["mary lives in london ."] + FILLER * 2)
        code = with_example(code, (QA_EXAMPLE[0], json.dumps(question)), (QA_EXAMPLE[1], json.dumps(context)))
        assert run_snippet(code, folder, tmp_path / "hub", QA_CHECK) == ours({"question": question, "context": context})["answer"]
        return
    text = LONG_NER if task == "ner" else LONG_SENTIMENT
    found = run_snippet(with_example(code, (example, json.dumps(text))), folder, tmp_path / "hub", RESULT_CHECK)
    if task == "classification":  # cut at the folder tokenizer's model_max_length, as peft-ft cuts
        [found] = found if isinstance(found, list) else [found]
        [expected] = ours([text])
        assert found["label"] == expected["label"] and found["score"] == pytest.approx(float(expected["score"]), abs=1e-5)
    else:  # stock windows are not peft-ft's: both read the whole text
        assert {("PER", "john"), ("LOC", "paris")} <= last_sentence_entities(found, text)
        assert {("PER", "john"), ("LOC", "paris")} <= last_sentence_entities(ours(text), text)


# --- prefix tuning on encoders -----------------------------------------------------------------------


def test_prefix_tuning_cards_on_encoders_say_stock_tools_cannot_run_them(tmp_path, tiny_bert):
    """peft 0.21 refuses the prefix on transformers 5.24's encoders (peft-ft patches it: methods.route_prefixes); the
    card says so and points to peft-ft, and that claim holds: the card's own snippet loads, the forward raises."""
    from helpers import TEXTS, train_sentiment
    from peft_ft.recipe.load import build_recipe
    from peft_ft.rundir.card import usage_section
    from peft_ft.serving.pipelines import pipeline

    run_dir = train_sentiment(tmp_path, tiny_bert, "prefix", method="prefix_tuning")
    card = (run_dir / "README.md").read_text()
    assert "does not run with stock transformers 5.24 and 5.25 and peft 0.21" in card
    assert "`peft_ft.pipeline(DIR)`" in card and "`peft-ft predict DIR`" in card
    assert {a["label"] for a in pipeline(run_dir)(TEXTS)} <= {"neg", "pos"}  # where the card points: it answers
    [code] = snippets(card)
    folder = copy_folder(run_dir, tmp_path, run_dir.name)
    code = code.replace(f'"path/to/{tiny_bert.name}"', json.dumps(str(tiny_bert)))
    check = ('import json as _j\ntry:\n    model(**tokenizer(["good film"], return_tensors="pt"))\n    print("CHECK null")\n'
             'except ValueError as _e:\n    print("CHECK " + _j.dumps(str(_e)))\n')
    assert "Model does not support past key values which are required for prefix tuning" in run_snippet(code, folder, tmp_path / "hub", check)
    for task, note in [("ner", True), ("qa", True), ("seq2seq", False)]:
        recipe = build_recipe({"task": {"type": task}, "adapter": {"method": "prefix_tuning"}, "data": {"train": "t.json"}}, "x.toml")
        info = {"task": task, "method": "prefix_tuning", "is_adapter": True, "base_model": "org/base", "base_model_id": "org/base",
                "base_model_source": "hub", "labels": ["O", "B-PER"] if task == "ner" else []}
        text = "\n".join(usage_section(recipe, info, "DIR"))
        assert ("does not run with stock transformers" in text) is note and "peft_ft.pipeline(DIR)" in text


# --- the shipped adapters ---------------------------------------------------------------------------

SHIPPED = sorted(p.name for p in ADAPTERS.iterdir() if (p / "peft_ft.json").is_file()) if ADAPTERS.is_dir() else []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folders_are_portable(name):
    folder = ADAPTERS / name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    info = json.loads((folder / "peft_ft.json").read_text())
    assert info["base_model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and info["base_model_source"] == "embedded"
    assert_no_machine_paths(folder)
    if info["labels"]:
        assert json.loads((folder / "labels.json").read_text()) == info["labels"]
    meta = front_matter((folder / "README.md").read_text())
    assert {"base_model", "library_name", "pipeline_tag", "datasets", "model-index"} <= set(meta)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["library_name"] == "peft"
    assert all(m["name"] and isinstance(m["value"], float) for r in meta["model-index"][0]["results"] for m in r["metrics"])


SHIPPED_CHECKS = {
    "conll_lora": (NER_CHECK, [["John", "Smith", "flew", "from", "London", "to", "Berlin", "."]],
                   lambda found: found["tags"] == [["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]]),
    "grading_lora": (NOT_PEFT_FT + 'import json as _j\n_r = "Plants need water and sunlight to grow."\n'
                     'print("CHECK " + _j.dumps([pipe({"text": _r, "text_pair": _r})["label"], pipe({"text": _r, "text_pair": "I like pizza."})["label"]]))\n',
                     None, lambda found: found[0] == "correct" and found[1] != "correct"),
    "qa_lora": (NOT_PEFT_FT + 'import json as _j\nprint("CHECK " + _j.dumps(answer))\n', None, lambda found: found.strip(" .") == "Paris"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_snippets_run_offline_with_stock_tools(name, tmp_path):
    from peft_ft.models.hub_cache import register_embedded

    cache = tmp_path / "hub"
    register_embedded(cache)
    check, data, ok = SHIPPED_CHECKS[name]
    blocks = snippets((ADAPTERS / name / "README.md").read_text())
    assert blocks
    for i, code in enumerate(blocks):
        folder = copy_folder(ADAPTERS / name, tmp_path / str(i), name)
        found = run_snippet(code, folder, cache, check, data)
        assert ok(found), (name, i, found)


# --- the pieces -------------------------------------------------------------------------------------


def test_recipe_text_shortens_absolute_paths_and_says_so():
    from peft_ft.recipe.dump import to_toml
    from peft_ft.recipe.load import build_recipe
    from peft_ft.rundir.portable import portable_toml

    recipe = build_recipe({"model": {"name": "/models/my-bert"}, "data": {"dir": "/data", "train": "a/train.jsonl",
                           "test": ["/elsewhere/test.jsonl", "b/test2.jsonl"]}, "output": {"dir": "/runs"}}, "/home/me/r.toml")
    text = portable_toml(to_toml(recipe))
    lines = text.splitlines()
    assert lines[1] == "# absolute paths of the training machine shortened to their last part: model.name, data.dir, data.test, output.dir"
    assert 'name = "my-bert"' in lines and 'test = ["test.jsonl", "b/test2.jsonl"]' in lines and 'train = "a/train.jsonl"' in lines
    assert portable_toml(text) == text  # idempotent: compare --resume compares texts in this form


def test_data_sources_are_relative_to_the_data_folder(tmp_path):
    from peft_ft.rundir.portable import data_sources

    data = tmp_path / "data"
    sources = {"train": f"{data}/conll2003/train.txt", "validation": f"10% of {data}/sb/train.parquet",
               "test": "/other/place/test.jsonl", "hub": "hub:org/name:test"}
    assert data_sources(sources, data) == {"train": "conll2003/train.txt", "validation": "10% of sb/train.parquet",
                                           "test": "test.jsonl", "hub": "hub:org/name:test"}


def test_a_run_on_a_local_base_names_it_by_folder_and_says_when_it_is_gone(tmp_path, tiny_bert):
    from helpers import train_sentiment
    from peft_ft.errors import PeftFtError
    from peft_ft.rundir.load import load_run

    run_dir = train_sentiment(tmp_path, tiny_bert, "pos")
    assert json.loads((run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert.name
    info = json.loads((run_dir / "peft_ft.json").read_text())
    assert info["base_model_source"] == "local folder" and not Path(info["base_model"]).is_absolute()
    assert (run_dir / info["base_model"]).resolve() == tiny_bert.resolve()
    card = (run_dir / "README.md").read_text()
    assert f'BASE = "path/to/{tiny_bert.name}"' in card and "AutoPeftModel" not in card  # no hub id to load by
    load_run(run_dir)  # where it was trained: found through the relative path
    moved = shutil.copytree(run_dir, tmp_path / "a" / "b" / "c" / "d" / "e" / "copy")
    with pytest.raises(PeftFtError, match=f"trained on a local model folder named '{tiny_bert.name}'.*set base_model in the "
                       f"run folder's peft_ft.json.*PeftModel.from_pretrained"):
        load_run(moved)
    for base in (str(tiny_bert.resolve()), os.path.relpath(tiny_bert, moved)):  # what the message offers, both ways
        (moved / "peft_ft.json").write_text(json.dumps({**info, "base_model": base}))
        load_run(moved)
