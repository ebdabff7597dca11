"""`--resume` continues the recipe the run started with, alone: a changed recipe is refused with the
changed keys (a raised train.epochs / max_steps is allowed), a run folder in use is refused, and what a
killed save left behind is cleaned."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import resume_recipe, run_killed, sentiment_rows, write_jsonl, write_recipe
from peft_ft.engine import checkpoint
from peft_ft.rundir.layout import RunDirLock, recorded_fingerprint


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_bert) -> Path:
    """A run folder killed (SIGKILL) mid-epoch 1, after its first checkpoint."""
    tmp = tmp_path_factory.mktemp("guard")
    d = tmp / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(d / "valid.jsonl", sentiment_rows(16, seed=2))
    write_jsonl(d / "test.jsonl", sentiment_rows(16, seed=3))
    recipe = write_recipe(tmp / "r.toml", resume_recipe(tiny_bert, d, tmp / "out"))
    done = run_killed(recipe, 2, tmp)
    assert done.returncode == -9, done.stderr
    (run_dir,) = (tmp / "out" / "r").iterdir()
    assert checkpoint.listed(run_dir)
    return run_dir


def copy_of(killed: Path, tmp_path: Path) -> Path:
    return shutil.copytree(killed, tmp_path / "run")


def resume_cli(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_ft", "run", "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)


def edit(run_dir: Path, **values) -> None:
    text = (run_dir / "recipe.toml").read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    (run_dir / "recipe.toml").write_text(text)


def test_the_run_folder_records_a_fingerprint(killed):
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.layout import fingerprint

    mark = recorded_fingerprint(killed / "recipe.toml")
    assert mark and len(mark) == 64 and mark == fingerprint(load_recipe(killed / "recipe.toml"))


def test_resume_refuses_a_changed_rank_seed_and_lr_naming_each(killed, tmp_path):
    run_dir = copy_of(killed, tmp_path)
    edit(run_dir, r="16", seed="7", lr="0.5")
    done = resume_cli(run_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    for piece in ("adapter.r: was 8, now 16", "train.seed: was 42, now 7", "train.lr: was 0.01, now 0.5", "Put the old values back"):
        assert piece in done.stderr, (piece, done.stderr)
    assert sorted(p.name for p in checkpoint.listed(run_dir)) == sorted(p.name for p in checkpoint.listed(killed))


def test_resume_allows_more_epochs_and_runs_to_the_new_end(killed, tmp_path):
    run_dir = copy_of(killed, tmp_path)
    edit(run_dir, epochs="3")
    (run_dir / ".saving-stale").mkdir()  # a killed final save's staging folder
    done = resume_cli(run_dir)
    assert done.returncode == 0, done.stderr
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["epochs_run"] == 3
    assert not list(run_dir.glob(".saving-*"))
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.layout import fingerprint

    assert recorded_fingerprint(run_dir / "recipe.toml") == fingerprint(load_recipe(run_dir / "recipe.toml"))


def resume_with_data(run_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_ft", "run", "--resume", str(run_dir), "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=300)


def test_resume_refuses_changed_training_rows_naming_the_split(killed, tmp_path):
    """The recipe names files, not their rows: an edited train file would continue on other data in silence."""
    run_dir = copy_of(killed, tmp_path)
    data = shutil.copytree(killed.parent.parent.parent / "data", tmp_path / "data")
    lines = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows in another order
    done = resume_with_data(run_dir, data)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "the data differs from what this run started on: train (" in done.stderr, done.stderr
    assert "validation (" not in done.stderr, done.stderr
    assert sorted(p.name for p in checkpoint.listed(run_dir)) == sorted(p.name for p in checkpoint.listed(killed))
    assert not (run_dir / "metrics.json").exists()


def _state(folder: Path, **changes) -> None:
    state = json.loads((folder / checkpoint.STATE).read_text())
    (folder / checkpoint.STATE).write_text(json.dumps({**state, **changes}))


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / checkpoint.WEIGHTS))
    first = sorted(tensors)[0]
    tensors[first][..., 0] = float("nan")
    save_file(tensors, str(folder / checkpoint.WEIGHTS))


DAMAGE = {
    "not an object": (lambda f: (f / checkpoint.STATE).write_text("[1, 2]"), "state.json: not a JSON object"),
    "epoch as text": (lambda f: _state(f, epoch="1"), "state.json: 'epoch' is str"),
    "no run": (lambda f: _state(f, run=None), "state.json: 'run' is NoneType"),
    "best elsewhere": (lambda f: _state(f, best="../../x"), "names no checkpoint"),
    "truncated weights": (lambda f: (f / checkpoint.WEIGHTS).write_bytes((f / checkpoint.WEIGHTS).read_bytes()[:100]),
                          "trainable.safetensors does not read"),
    "NaN weights": (_nan_weights, "trainable.safetensors: NaN or inf in"),
    "garbled optimizer": (lambda f: (f / checkpoint.OPTIMIZER).write_bytes(b"\x00" * 64), "optimizer.safetensors does not read"),
    "missing rng": (lambda f: (f / checkpoint.RNG).unlink(), "no complete checkpoint"),
    "epoch past the recipe": (lambda f: _state(f, epoch=99), "epoch 99, batches done 3: out of this recipe's 2 epochs"),
    "result of text": (lambda f: _state(f, result={"steps": "x", "history": "oops"}), "'result' lacks an integer 'steps'"),
    "NaN loss kept": (lambda f: _state(f, epoch_losses=[0.5, float("nan")]), "'epoch_losses' holds a non-number, NaN or inf"),
    "schedule ahead": (lambda f: _scheduler_at(f, 50), "'scheduler' is at step 50, the checkpoint at 3"),
    "newer one incomplete": (lambda f: _newer_without_optimizer(f), "the newest checkpoint step-0000006 lacks optimizer.safetensors"),
}


def _scheduler_at(folder: Path, position: int) -> None:
    scheduler = json.loads((folder / checkpoint.STATE).read_text())["scheduler"]
    _state(folder, scheduler={**scheduler, "last_epoch": position})


def _newer_without_optimizer(folder: Path) -> None:
    newer = shutil.copytree(folder, folder.parent / "step-0000006")
    (newer / checkpoint.OPTIMIZER).unlink()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_not_a_traceback(killed, tmp_path, capsys, damage):
    from peft_ft.cli import main

    run_dir = copy_of(killed, tmp_path)
    (newest,) = checkpoint.listed(run_dir)
    harm, expected = DAMAGE[damage]
    harm(newest)
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert "remove this folder" in err or "put the files back" in err, err
    assert not (run_dir / "metrics.json").exists() and newest.is_dir()


def test_resume_refuses_fewer_epochs(killed, tmp_path):
    run_dir = copy_of(killed, tmp_path)
    edit(run_dir, epochs="1")
    done = resume_cli(run_dir)
    assert done.returncode == 2 and "train.epochs: was 2, now 1" in done.stderr, done.stderr


def test_a_second_resume_of_a_folder_in_use_is_refused(killed, tmp_path):
    run_dir = copy_of(killed, tmp_path)
    with RunDirLock(run_dir):  # as a run or resume working in it holds it
        done = resume_cli(run_dir)
    assert done.returncode == 2 and "another peft-ft process is training in this run folder" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_lock_is_released_with_its_process(killed, tmp_path):
    """A killed run's lock goes with it (flock): the killed fixture's folder is not in use."""
    from peft_ft.rundir.layout import in_use

    assert not in_use(killed)
    with RunDirLock(killed):
        assert in_use(killed)
    assert not in_use(killed)


def test_a_new_run_cleans_stale_saves_of_earlier_runs_not_in_use(tmp_path):
    from peft_ft.recipe.load import build_recipe
    from peft_ft.rundir.layout import clean_stale_siblings

    recipe = build_recipe({"data": {"train": "x.jsonl"}, "output": {"dir": str(tmp_path), "name": "r"}}, "r.toml")
    idle, busy = tmp_path / "r" / "20260101-000000", tmp_path / "r" / "20260101-000001"
    for folder in (idle, busy):
        (folder / ".saving-abc").mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    killed = tmp_path / "r" / "20260101-000002"  # killed while writing a checkpoint: its partial one was kept for good
    (killed / "checkpoints" / ".saving-xyz").mkdir(parents=True)
    (killed / "checkpoints" / "step-0000002").mkdir()
    with RunDirLock(busy):
        removed = clean_stale_siblings(recipe)
    assert removed == [f"{idle}/.saving-abc", f"{killed}/checkpoints/.saving-xyz"]
    assert (busy / ".saving-abc").is_dir() and (idle / "adapter_model.safetensors").is_file()
    assert (killed / "checkpoints" / "step-0000002").is_dir()


def test_a_key_newer_than_the_run_counts_as_unchanged_at_its_default():
    """A run checkpointed before a key existed resumes when the key is at its default (what the run did then), and
    is refused when the key is set to something else."""
    from peft_ft.recipe.load import build_recipe
    from peft_ft.rundir.layout import recipe_changes

    recipe = build_recipe({"data": {"train": "t.jsonl"}}, "r.toml")
    recorded = recipe.to_dict()
    del recorded["train"]["pad_to_multiple_of"]  # recorded by a version without the key
    assert recipe_changes(recorded, recipe) == []
    changed = build_recipe({"data": {"train": "t.jsonl"}, "train": {"pad_to_multiple_of": 8}}, "r.toml")
    assert recipe_changes(recorded, changed) == ["train.pad_to_multiple_of: was None, now 8"]


def test_resume_after_the_data_folder_moved_asks_for_its_new_place(killed, tmp_path):
    """The message named the original recipe file (a resume does not read it), said "(--data-dir)" though none was
    given, and began with advice that fails (data.dir in the run's recipe.toml is refused as a change)."""
    run_dir = copy_of(killed, tmp_path)
    newest = checkpoint.listed(run_dir)[-1]
    state = json.loads((newest / checkpoint.STATE).read_text())
    _state(newest, run={**state["run"], "data_dir": str(tmp_path / "moved-away")})
    done = resume_cli(run_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (f"--resume {run_dir}: the data folder this run trained on, {tmp_path / 'moved-away'}, is not there any more; "
            f"give its new place with --data-dir") in done.stderr, done.stderr
    data = shutil.copytree(killed.parent.parent.parent / "data", tmp_path / "data")
    assert resume_with_data(run_dir, data).returncode == 0
