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

from helpers import recipe_text, sentiment_rows, write_jsonl, write_recipe

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
    # a real cached copy (refs/main naming another snapshot) is left alone
    other = tmp_path / "hub2"
    ref = other / f"models--{TINY_ID.replace('/', '--')}" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    kept, what = register(tiny_bert, TINY_ID, other)
    assert what.startswith("kept") and kept.name == "a" * 40 and not kept.exists()
    assert ref.read_text() == "a" * 40


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
        done = subprocess.run([sys.executable, "-m", "peft_ft", "run", str(recipe)], cwd=root, env=clean_env(cache),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = Path(done.stdout.strip().splitlines()[-1].removeprefix("done: "))
    return root, cache, runs


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
    with pytest.raises(PeftFtError, match=f"trained on a local model folder named '{tiny_bert.name}'.*PeftModel.from_pretrained"):
        load_run(moved)
