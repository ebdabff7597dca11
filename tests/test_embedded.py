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
