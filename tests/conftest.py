"""Shared fixtures: a tiny BERT and tokenizer built in code, tiny data written by the tests.

Nothing here downloads: the model is a 2-layer, hidden-32 BERT saved to a temporary folder, the
tokenizer a word-level vocabulary written by hand (tests/helpers.py builds both).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# A run on the embedded model registers it in the Hugging Face hub cache (peft_ft.models.hub_cache): the
# tests get a cache of their own, set before huggingface_hub reads the variable at import.
HUB_CACHE = tempfile.mkdtemp(prefix="peft-ft-tests-hub-")
os.environ["HF_HUB_CACHE"] = HUB_CACHE
atexit.register(shutil.rmtree, HUB_CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import sentiment_rows, write_jsonl, write_tiny_bert  # noqa: E402

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning workers
# can make a 6 ms step take a second. Runs started by tests set train.threads = 1 for the same reason.
torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): xdist's one worker per core, except for one test file (or tests of one file)
    named on the command line. Workers take whole files, so one file would run on one worker anyway, after the
    ~10 s it takes to start them; it runs in this process instead."""
    files = {arg.split("::")[0] for arg in config.args}
    if len(files) == 1 and (config.invocation_params.dir / files.pop()).is_file():
        return 0
    return None  # xdist's own count


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def sentiment_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(16, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(16, seed=3))
    return d
