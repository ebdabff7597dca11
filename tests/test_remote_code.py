"""Remote code runs only on the command line's say-so: the attack of issue #23, replayed.

A copied run folder sets `model.trust_remote_code = true` in its recipe.toml and points
`peft_ft.json`'s base model at a model folder whose config has `auto_map` and a .py file that
writes a marker file when imported. Without `--trust-remote-code`, predict, serve, merge and
`peft_ft.pipeline()` load the model with transformers' own BERT classes and the marker never
appears; with the flag it does (so the marker does detect the attack).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import train_sentiment

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")

from transformers import BertConfig, BertForSequenceClassification


class EvilConfig(BertConfig):
    model_type = "bert"


class EvilForSequenceClassification(BertForSequenceClassification):
    config_class = EvilConfig
'''


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_bert) -> Path:
    return train_sentiment(tmp_path_factory.mktemp("remote"), tiny_bert, "pos")


def hostile_folder(clean_run: Path, tiny_bert: Path, root: Path) -> tuple[Path, Path]:
    """(run folder, marker path): the run's copy whose base model ships code that leaves the marker."""
    marker = root / "MARKER"
    model = shutil.copytree(tiny_bert, root / "evil-model")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilForSequenceClassification"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    run = shutil.copytree(clean_run, root / "run")
    info = json.loads((run / "peft_ft.json").read_text())
    (run / "peft_ft.json").write_text(json.dumps({**info, "base_model": str(model)}))
    recipe = (run / "recipe.toml").read_text().replace("trust_remote_code = false", "trust_remote_code = true")
    assert "trust_remote_code = true" in recipe
    (run / "recipe.toml").write_text(recipe)
    return run, marker


def cli(*args: str, tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies remote code
    return subprocess.run([sys.executable, "-m", "peft_ft", *args], capture_output=True, text=True, timeout=300, env=env, **kwargs)


def test_predict_runs_no_remote_code_without_the_flag_and_does_with_it(clean_run, tiny_bert, tmp_path):
    run, marker = hostile_folder(clean_run, tiny_bert, tmp_path)
    (tmp_path / "in.txt").write_text("good film\n")
    done = cli("predict", "--adapter", f"a={run}", str(tmp_path / "in.txt"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert "ignored, a loaded folder cannot turn on remote code" in done.stderr and "--trust-remote-code" in done.stderr
    assert json.loads(done.stdout)["label"] in ("pos", "neg")
    # The control: the person running the command says so, and the model's code runs (the marker detects it).
    done = cli("predict", "--adapter", f"a={run}", "--trust-remote-code", str(tmp_path / "in.txt"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "remote code ran"
    assert "remote code is on" in done.stderr


def test_merge_runs_no_remote_code_without_the_flag(clean_run, tiny_bert, tmp_path):
    run, marker = hostile_folder(clean_run, tiny_bert, tmp_path)
    done = cli("merge", str(run), "--out", str(tmp_path / "merged"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_serve_runs_no_remote_code_without_the_flag(clean_run, tiny_bert, tmp_path):
    run, marker = hostile_folder(clean_run, tiny_bert, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    process = subprocess.Popen([sys.executable, "-m", "peft_ft", "serve", "--adapter", f"a={run}", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving")) and process.poll() is None:
            lines.append(process.stdout.readline())  # the log's warnings come first
        line = lines[-1]
        assert line.startswith("serving a on http://127.0.0.1:"), lines
        assert "cannot turn on remote code" in "".join(lines)
        request = urllib.request.Request(line.split()[-1] + "/predict/a", data=json.dumps({"texts": ["good film"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            assert json.loads(response.read())["predictions"][0]["label"] in ("pos", "neg")
        assert not marker.exists()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_pipeline_load_run_and_adapter_set_run_no_remote_code_by_default(clean_run, tiny_bert, tmp_path):
    from peft_ft import load_run, pipeline
    from peft_ft.serving.predict import AdapterSet

    run, marker = hostile_folder(clean_run, tiny_bert, tmp_path)
    assert pipeline(run)("good film")[0]["label"] in ("pos", "neg")
    load_run(run)
    AdapterSet({"a": run})
    assert not marker.exists()


def test_a_model_that_needs_its_own_code_is_refused_with_the_flag_named(clean_run, tiny_bert, tmp_path):
    """A model type transformers does not know: without the flag, one message (exit 2), no traceback, no code run."""
    run, marker = hostile_folder(clean_run, tiny_bert, tmp_path)
    config_file = Path(json.loads((run / "peft_ft.json").read_text())["base_model"]) / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_type": "evil-bert"}))
    (tmp_path / "in.txt").write_text("good film\n")
    done = cli("predict", "--adapter", f"a={run}", str(tmp_path / "in.txt"), tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "--trust-remote-code" in done.stderr, done.stderr
    assert not marker.exists()


def test_the_decision_is_one_function(tmp_path, caplog):
    """`run RECIPE`: the recipe decides (warned); a folder's recipe: only the command line decides."""
    import logging

    from peft_ft.models.safety import remote_code
    from peft_ft.recipe.load import load_recipe

    (tmp_path / "r.toml").write_text('[model]\ntrust_remote_code = true\n[data]\ntrain = "x.jsonl"\n')
    asking = load_recipe(tmp_path / "r.toml")
    with caplog.at_level(logging.WARNING, logger="peft_ft"):
        assert remote_code(asking).model.trust_remote_code is True
        assert remote_code(asking, False, "run").model.trust_remote_code is False
        assert remote_code(asking, True, "run").model.trust_remote_code is True
        assert remote_code(load_recipe(tmp_path / "r.toml", ["model.trust_remote_code=false"]), True).model.trust_remote_code is True
    assert "ignored, a loaded folder cannot turn on remote code" in caplog.text


def test_no_loader_passes_trust_remote_code_from_anywhere_but_the_decision():
    """Every `trust_remote_code=` keyword outside safety.py reads the decided recipe (or hands on the flag itself)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "peft_ft"
    allowed = {"recipe.model.trust_remote_code", "trust_remote_code", "args.trust_remote_code", "self.trust_remote_code",
               "kwargs.pop('trust_remote_code', False)"}
    found = []
    for path in root.rglob("*.py"):
        if path.name == "safety.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                found += [(path.name, ast.unparse(k.value)) for k in node.keywords if k.arg == "trust_remote_code"]
    odd = [(name, value) for name, value in found if value not in allowed]
    assert found and not odd, odd


def test_the_flag_on_a_new_run_is_refused_rather_than_ignored(tmp_path, capsys):
    from peft_ft.cli import main

    (tmp_path / "r.toml").write_text('[data]\ntrain = "x.jsonl"\n')
    assert main(["run", str(tmp_path / "r.toml"), "--trust-remote-code"]) == 2
    assert "set model.trust_remote_code = true" in capsys.readouterr().err
