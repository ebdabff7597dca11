"""`peft-ft export RUN_DIR --onnx OUT`: merged, exported, checked against PyTorch, answered by onnxruntime."""

from __future__ import annotations

import json

import pytest

from helpers import train_ner
from peft_ft.errors import PeftFtError


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_bert):
    return train_ner(tmp_path_factory.mktemp("export"), tiny_bert)


def test_export_answers_like_pytorch(ner_run, tmp_path, capsys):
    import numpy as np
    import onnxruntime
    import torch

    from peft_ft.cli import main
    from peft_ft.rundir.load import load_run

    out = tmp_path / "onnx"
    assert main(["export", str(ner_run), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "model.onnx" in printed
    report = json.loads((out / "export.json").read_text())
    assert report["max_abs_diff"] <= report["tolerance"] == 1e-4 and report["inputs"][:2] == ["input_ids", "attention_mask"]
    assert {"model.onnx", "config.json", "labels.json", "peft_ft.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["id2label"]["3"] == "B-PER"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32  # the run's model.max_length
    # onnxruntime on texts of its own, against the run loaded by peft-ft (adapter not merged)
    model, tokenizer, _ = load_run(ner_run)
    enc = tokenizer(["mary lives in berlin .", "john works at acme corp in paris and london ."], padding=True, return_tensors="pt")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    [logits] = session.run(["logits"], {n: enc[n].numpy() for n in report["inputs"]})
    with torch.no_grad():
        expected = model(**enc).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    # predict (or merge, export) on the export folder: said what it is, not "no model.safetensors ... set model.name"
    (tmp_path / "in.jsonl").write_text('{"text": "mary lives in berlin ."}\n')
    assert main(["predict", "--adapter", f"o={out}", str(tmp_path / "in.jsonl")]) == 2
    assert "an ONNX export (peft-ft export --onnx of" in capsys.readouterr().err


def test_export_refused_above_the_tolerance_writes_nothing(ner_run, tmp_path):
    from peft_ft.serving.export import export_onnx

    out = tmp_path / "onnx"
    with pytest.raises(PeftFtError, match=r"max \|logit difference\| .* above the tolerance -1"):
        export_onnx(ner_run, out, tolerance=-1)
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))


def test_export_refuses_what_it_cannot_export(ner_run, tmp_path):
    from peft_ft.serving.export import export_onnx

    info = json.loads((ner_run / "peft_ft.json").read_text())
    seq2seq = tmp_path / "s2s"
    seq2seq.mkdir()
    (seq2seq / "peft_ft.json").write_text(json.dumps({**info, "task": "seq2seq", "auto_class": "AutoModelForSeq2SeqLM"}))
    with pytest.raises(PeftFtError, match="task 'seq2seq' cannot be exported"):
        export_onnx(seq2seq, tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    with pytest.raises(PeftFtError, match="already exists"):
        export_onnx(ner_run, taken)


def test_the_onnx_file_holds_no_path_of_this_machine(ner_run, tmp_path):
    """torch's exporter notes every node's Python stack trace (absolute paths to peft-ft and site-packages) in the
    file: stripped before the check, so the file checked by onnxruntime is the one kept."""
    import sys
    from pathlib import Path

    import onnxruntime

    from peft_ft.serving.export import export_onnx

    out = tmp_path / "onnx"
    export_onnx(ner_run, out)
    data = (out / "model.onnx").read_bytes()
    for path in {str(Path.cwd()), sys.prefix, sys.base_prefix, str(ner_run), str(tmp_path), str(Path(__file__).resolve().parent.parent)}:
        assert path.encode() not in data, path
    assert b"stack_trace" not in data
    onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # still a valid model


# --- the export's README: onnxruntime alone answers as peft-ft does ------------------------------------------


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_bert, ner_run):
    """A run of each family that exports: the NER run above, a classification and a QA run (briefly trained: the
    comparison is between two ways of answering, not of quality)."""
    from helpers import qa_rows, recipe_text, sentiment_rows, write_jsonl, write_recipe
    from peft_ft.engine.run import run
    from peft_ft.recipe.load import load_recipe

    root = tmp_path_factory.mktemp("export-families")
    runs = {"ner": ner_run}
    for family, rows, task in (("classification", sentiment_rows(32, seed=1), {}),
                               ("qa", qa_rows(32, seed=1), {"type": "qa", "doc_stride": 8, "n_best": 5, "max_answer_length": 4})):
        data = root / f"data-{family}"
        data.mkdir()
        write_jsonl(data / "train.jsonl", rows)
        recipe = write_recipe(root / f"{family}.toml", recipe_text(
            tiny_bert, data, model_opts={"max_length": 64}, task=task, train_opts={"epochs": 2, "batch_size": 16, "lr": 1e-2},
            output={"dir": root / "runs", "name": family}))
        runs[family] = run(load_recipe(recipe))
    return runs


# What each README snippet answers, as `peft-ft predict` on the run folder answers the same input.
PREDICT_INPUT = {
    "classification": {"text": "This is great."},
    "ner": {"text": "John Smith flew from London to Berlin."},
    "qa": {"question": "Where does the Eiffel Tower stand?", "context": "The Eiffel Tower stands in Paris, the capital of France."},
}


@pytest.mark.parametrize("family", ["classification", "ner", "qa"])
def test_the_export_readme_answers_with_onnxruntime_as_predict_does(family, family_runs, tmp_path, capsys):
    import ast
    import os
    import re
    import subprocess
    import sys

    from peft_ft.cli import main

    run_dir, out = family_runs[family], tmp_path / "onnx"
    assert main(["export", str(run_dir), "--onnx", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "past the model's position table onnxruntime fails" in card and "{" not in card.split("```python")[0]
    [code] = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    # a fresh interpreter in the export's parent folder, then which of peft-ft and peft it imported (none)
    check = "\nimport sys\nprint('IMPORTED', [m for m in ('peft_ft', 'peft') if m in sys.modules])\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PEFT_FT"))}
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, code + "\n---\n" + done.stderr[-3000:]
    *_, printed, imported = done.stdout.strip().splitlines()
    assert imported == "IMPORTED []"
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps(PREDICT_INPUT[family]) + "\n")
    capsys.readouterr()
    assert main(["predict", "--adapter", f"run={run_dir}", str(rows)]) == 0
    [answer] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    if family == "classification":
        said = ast.literal_eval(printed)
        assert said["label"] == answer["label"] and said["score"] == pytest.approx(answer["score"], abs=1e-4)
    elif family == "ner":
        assert [tag for _, tag in ast.literal_eval(printed)] == answer["tags"]
    else:
        assert printed == answer["answer"] or (printed == "" and answer["answer"] == "")
        # a question longer than a window holds: the snippet's own message, where the tokenizer would panic
        long = code.replace(PREDICT_INPUT["qa"]["question"], " ".join(["where does mary live"] * 16))
        done = subprocess.run([sys.executable, "-c", long], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "panicked" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("ValueError: the question is too long for these windows")


def test_a_merged_folder_has_a_card_that_stock_transformers_runs(ner_run, tmp_path):
    import os
    import re
    import subprocess
    import sys

    from peft_ft.cli import main

    out = tmp_path / "merged"
    assert main(["merge", str(ner_run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"The peft-ft run `{ner_run.name}`" in card
    [code] = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PEFT_FT"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "entity_group" in done.stdout, code + "\n---\n" + done.stderr[-3000:]
