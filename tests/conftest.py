"""Shared fixtures: a tiny BERT and tokenizer built in code, tiny data written by the tests.

Nothing here downloads: the model is a 2-layer, hidden-32 BERT saved to a temporary folder, the
tokenizer a word-level vocabulary written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning workers
# can make a 6 ms step take a second. Runs started by tests set train.threads = 1 for the same reason.
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


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


@pytest.fixture
def sentiment_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(16, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(16, seed=3))
    return d


def write_recipe(path: Path, text: str) -> Path:
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
