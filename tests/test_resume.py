"""Checkpoints and resume: a run killed (SIGKILL) or interrupted (Ctrl-C) mid-epoch and resumed ends
exactly where an uninterrupted run of the same seed ends; pruning keeps the best; saves are atomic;
a NaN loss stops the run with a clear message and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import resume_recipe, run_killed, sentiment_rows, write_jsonl, write_recipe
from peft_ft.cli import main
from peft_ft.engine import checkpoint
from peft_ft.errors import PeftFtError

# Measured: the resumed runs match the uninterrupted one bit for bit on CPU (same seed, one thread):
# losses, metrics and adapter weights differ by 0.0. The bound leaves room for other BLAS builds only.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("resume")
    d = tmp / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(16, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(16, seed=3))

    def recipe(name: str) -> Path:
        return write_recipe(tmp / f"{name}.toml", resume_recipe(tiny_bert, d, tmp / name))

    assert main(["run", str(recipe("straight"))]) == 0
    straight = next((tmp / "straight" / "r").iterdir())
    return tmp, recipe, straight


def assert_same_results(resumed: Path, straight: Path) -> None:
    from safetensors.torch import load_file

    a, b = (json.loads((p / "metrics.json").read_text()) for p in (resumed, straight))
    for split in ("validation", "test"):
        for key in ("accuracy", "macro_f1"):
            assert abs(a[split][key] - b[split][key]) <= TOLERANCE, (split, key)
    assert a["train"]["steps"] == b["train"]["steps"] == 16
    assert a["train"]["best_epoch"] == b["train"]["best_epoch"]
    for ha, hb in zip(a["train"]["history"], b["train"]["history"], strict=True):
        assert ha["epoch"] == hb["epoch"] and ha["steps"] == hb["steps"]
        assert abs(ha["train_loss"] - hb["train_loss"]) <= TOLERANCE
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (resumed, straight))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOLERANCE
    assert (resumed / "predictions_test.jsonl").read_text() == (straight / "predictions_test.jsonl").read_text()


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(setup):
    tmp, recipe, straight = setup
    killed = run_killed(recipe("killed"), after=2, cwd=tmp)
    assert killed.returncode == -9, killed.stderr
    run_dir = next((tmp / "killed" / "r").iterdir())
    assert [p.name for p in checkpoint.listed(run_dir)] == ["step-0000003"]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "recipe.toml").is_file()
    state = checkpoint.read_state(run_dir / "checkpoints" / "step-0000003")
    assert (state["epoch"], state["batches_done"], len(state["epoch_losses"])) == (1, 3, 3)

    assert main(["run", "--resume", str(run_dir)]) == 0
    assert_same_results(run_dir, straight)
    assert not (run_dir / "checkpoints").exists()  # a finished run keeps only its final weights
    assert "resumed from" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("after, resumed_from", [(5, "step-0000006"), (13, "step-0000014")])
def test_adalora_resumes_exactly_with_its_rank_allocator(setup, tiny_bert, after, resumed_from):
    """AdaLoRA keeps state outside its weights and the optimizer: the allocator's smoothed importance scores and the
    rank pattern. Killed while allocating (step 7), or after the budget was final at step 13 (16 steps, tfinal 3:
    the resumed run masks with the saved pattern; without it the resume crashed), it ends as the straight run."""
    from helpers import recipe_text
    from safetensors.torch import load_file

    tmp = setup[0]
    name = f"adalora-{after}"

    def recipe(out: str) -> Path:
        return write_recipe(tmp / f"{out}.toml", recipe_text(
            tiny_bert, tmp / "data", model_opts={"max_length": 32}, adapter={"method": "adalora", "r": 4, "init_r": 8},
            data={"validation": "valid.jsonl", "test": ["test.jsonl"]},
            train_opts={"epochs": 2, "lr": 1e-2, "checkpoint_every": 2}, output={"dir": tmp / out, "name": "r"}))

    assert main(["run", str(recipe(f"{name}-straight"))]) == 0
    straight = next((tmp / f"{name}-straight" / "r").iterdir())
    killed = run_killed(recipe(name), after=after, cwd=tmp)
    assert killed.returncode == -9, killed.stderr
    run_dir = next((tmp / name / "r").iterdir())
    assert checkpoint.listed(run_dir)[-1].name == resumed_from
    assert (checkpoint.listed(run_dir)[-1] / checkpoint.METHOD).is_file()
    assert main(["run", "--resume", str(run_dir)]) == 0
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (run_dir, straight))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= TOLERANCE
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (run_dir, straight))
    assert ca["rank_pattern"] == cb["rank_pattern"] and cb["rank_pattern"]  # the pattern the budget settled on


@pytest.mark.parametrize("sent", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_and_resume_matches(setup, monkeypatch, sent):
    """Ctrl-C, or SIGTERM (what a batch scheduler sends before it kills), stops after the step with a checkpoint."""
    import signal

    import peft_ft.engine.train

    tmp, recipe, straight = setup
    original, count = peft_ft.engine.train.pad_batch, {"n": 0}

    def pad_batch(*args, **kwargs):  # a real SIGINT to this process while step 5 is being prepared
        count["n"] += 1
        if count["n"] == 5:
            os.kill(os.getpid(), getattr(signal, sent))
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_ft.engine.train, "pad_batch", pad_batch)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN when pytest runs in the background
    assert main(["run", str(recipe(f"stop-{sent}"))]) == 130
    monkeypatch.undo()
    run_dir = next((tmp / f"stop-{sent}" / "r").iterdir())
    # Step 5 finished, then a checkpoint of it was written (step 3's was pruned: keep_checkpoints = 1).
    assert [p.name for p in checkpoint.listed(run_dir)] == ["step-0000005"]
    assert f"interrupted ({sent})" in (run_dir / "train.log").read_text() and "--resume" in (run_dir / "train.log").read_text()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the loop gave the signals back as it found them
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert_same_results(run_dir, straight)


def test_resume_refuses_a_finished_run_and_a_folder_without_checkpoints(setup, tmp_path, capsys):
    _, _, straight = setup
    assert main(["run", "--resume", str(straight)]) == 2
    assert "this run finished" in capsys.readouterr().err
    (tmp_path / "recipe.toml").write_text("[data]\ntrain = 'x.jsonl'\n")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_prune_keeps_the_newest_and_never_the_best(tmp_path):
    for step in (3, 6, 8, 9, 12):
        folder = tmp_path / "checkpoints" / checkpoint.name_of(step)
        folder.mkdir(parents=True)
        for name in checkpoint.FILES:
            (folder / name).write_text("{}")
    (tmp_path / "checkpoints" / ".saving-x").mkdir()  # a save killed halfway: never listed
    removed = checkpoint.prune(tmp_path, keep=2, protect="step-0000003")
    assert removed == ["step-0000006", "step-0000008"]
    assert [p.name for p in checkpoint.listed(tmp_path)] == ["step-0000003", "step-0000009", "step-0000012"]
    from peft_ft.rundir.layout import clean_stale_saves

    assert clean_stale_saves(tmp_path) == ["checkpoints/.saving-x"]
    assert not (tmp_path / "checkpoints" / ".saving-x").exists()


def test_a_failed_checkpoint_save_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    first = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {"epoch": 1})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    original = safetensors.torch.save_file

    def failing(tensors, path, *a, **k):  # the second file of a checkpoint fails, as on a full disk
        if Path(path).name == checkpoint.OPTIMIZER:
            Path(path).write_bytes(b"partial")
            raise OSError("No space left on device")
        return original(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with torch.no_grad():
        model.weight.add_(1.0)
    # a full disk is the user's to fix: one message with the space needed (peft_ft.storage.space_for)
    with pytest.raises(PeftFtError, match="not enough disk space to save checkpoint step-0000001: it needs about"):
        checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {"epoch": 2})
    with pytest.raises(PeftFtError, match="not enough disk space"):
        checkpoint.save(tmp_path, 2, model, optimizer, scheduler, {"epoch": 2})
    assert [p.name for p in checkpoint.listed(tmp_path)] == ["step-0000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]  # no staging left


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    import random

    import numpy as np
    import torch

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
        return model, optimizer, scheduler

    def step(model, optimizer, scheduler):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    model, optimizer, scheduler = make()
    step(model, optimizer, scheduler)
    path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {"epoch": 1})
    python_numpy = (random.random(), np.random.rand())
    step(model, optimizer, scheduler)  # its input comes from the torch RNG: equal only if that is restored too
    after_two = model.weight.detach().clone()

    model, optimizer, scheduler = make()
    assert checkpoint.load(path, model, optimizer, scheduler)["epoch"] == 1
    assert (random.random(), np.random.rand()) == python_numpy
    step(model, optimizer, scheduler)
    assert torch.equal(model.weight, after_two)
    assert scheduler.get_last_lr() == [0.1 / 3]


def test_nan_loss_stops_with_step_lr_hint_and_keeps_the_last_good_checkpoint(setup, monkeypatch, capsys):
    import peft_ft.engine.run

    tmp, recipe, _ = setup
    original = peft_ft.engine.run.build_model
    calls = {"n": 0}

    def poison(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 5:
                output.loss = output.loss * float("nan")
        return output

    def build_model(*args, **kwargs):
        model, tokenizer, heads = original(*args, **kwargs)
        model.register_forward_hook(poison)
        return model, tokenizer, heads

    monkeypatch.setattr(peft_ft.engine.run, "build_model", build_model)
    assert main(["run", str(recipe("nan"))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the loss is nan at step 5 (epoch 1, learning rate" in err
    assert "step-0000003" in err and "lower train.lr" in err
    run_dir = next((tmp / "nan" / "r").iterdir())
    assert not (run_dir / "metrics.json").exists()
    kept = checkpoint.listed(run_dir)
    assert [p.name for p in kept] == ["step-0000003"]
    assert all(t.isfinite().all() for t in checkpoint.load_weights(kept[0]).values())


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    import peft_ft.storage
    from peft_ft.storage import write_json

    path = tmp_path / "metrics.json"
    write_json(path, {"f1": 0.5})
    real_fdopen = os.fdopen

    class HalfWriter:  # writes half of the text, then the disk "fills up"
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("No space left on device")

    monkeypatch.setattr(peft_ft.storage.os, "fdopen", lambda fd, *a, **k: HalfWriter(real_fdopen(fd, *a, **k)))
    with pytest.raises(PeftFtError, match="not enough disk space to save metrics.json"):
        write_json(path, {"f1": 0.9, "accuracy": 0.9})
    assert json.loads(path.read_text()) == {"f1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the temporary file is gone


def test_a_failed_save_pretrained_leaves_the_previous_adapter_intact(tmp_path):
    from peft_ft.storage import save_pretrained_atomic

    class Model:
        def __init__(self, fail: bool):
            self.fail = fail

        def save_pretrained(self, folder):
            (Path(folder) / "adapter_config.json").write_text('{"r": 16}')
            if self.fail:
                (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
                raise OSError("killed mid-save")
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"weights")

    save_pretrained_atomic(Model(fail=False), tmp_path)
    with pytest.raises(OSError, match="mid-save"):
        save_pretrained_atomic(Model(fail=True), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
