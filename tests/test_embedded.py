"""The default path: the embedded MiniLM-L6 from site-packages, offline, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import recipe_text, sentiment_rows, write_jsonl


@pytest.mark.slow
def test_embedded_model_trains_offline_through_the_cli(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(48, seed=1))
    write_jsonl(data / "test.jsonl", sentiment_rows(16, seed=3))
    recipe = tmp_path / "embedded.toml"
    # no model.name: the embedded model; no data.dir: --data-dir below
    recipe.write_text(recipe_text(task={"type": "classification"}, data={"validation_fraction": 0.25, "test": ["test.jsonl"]},
                                  train_opts={"epochs": 1, "max_steps": 3, "batch_size": 8}, defaults=False,
                                  output={"dir": tmp_path / "runs"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "peft_ft", "run", str(recipe), "--data-dir", str(data)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = next((tmp_path / "runs" / "embedded").iterdir())
    info = json.loads((run_dir / "peft_ft.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["base_model"] == "embedded:all-MiniLM-L6-v2" and info["model_type"] == "bert"
    assert info["total_params"] > 22_000_000 and info["trainable_percent"] < 2
    assert metrics["train"]["steps"] == 3 and metrics["test"]["n"] == 16
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0


def test_a_missing_embedded_package_is_named_for_the_command_that_needs_it(monkeypatch):
    """predict, merge and register-embedded said "model.name is empty ... or set model.name", which none of them reads."""
    import importlib.util

    import peft_ft.models.loading as loading
    from peft_ft.errors import PeftFtError
    from peft_ft.models.hub_cache import register_embedded
    from peft_ft.rundir.load import base_location

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == loading.EMBEDDED_PACKAGE else real(name, *a))
    for call, says in ((lambda: base_location({"base_model": loading.EMBEDDED_NAME}, "run1: base model"),
                        "run1: base model: this run was trained on the embedded MiniLM-L6, but the package"),
                       (register_embedded, "registering sentence-transformers/all-MiniLM-L6-v2 links the embedded MiniLM-L6")):
        with pytest.raises(PeftFtError) as refused:
            call()
        assert str(refused.value).startswith(says) and "model.name" not in str(refused.value), str(refused.value)
    with pytest.raises(PeftFtError, match="model.name is empty, so the embedded MiniLM-L6 is used"):
        loading.embedded_model_dir()
