"""Hostile and broken folders, recipes and paths through the real CLI (a subprocess): every refusal is one
line naming the file or key and what to do, exit 2, no traceback, nothing half-written, no orphan folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import recipe_text, sentiment_rows, train_sentiment, write_jsonl, write_recipe
from peft_ft.recipe.load import build_recipe


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_bert) -> Path:
    return train_sentiment(tmp_path_factory.mktemp("hostile"), tiny_bert, "pos")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peft_ft", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def refused(done: subprocess.CompletedProcess, *pieces: str) -> str:
    """Exit 2, one `error:` message (argparse's usage lines before it), no traceback, each piece in the message."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err)
    assert "Traceback" not in err, err
    message = err[err.index("error:"):]
    for piece in pieces:
        assert piece in message, (piece, message)
    return message


def edited_copy(clean_run: Path, tmp_path: Path, edit) -> Path:
    # beside the original: the run's local base model is recorded relative to the run folder (peft_ft.rundir.portable)
    copy = shutil.copytree(clean_run, clean_run.parent / f"{tmp_path.name}-copy")
    edit(copy)
    return copy


def edit_json(name: str, **changes):
    def edit(folder: Path):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, **changes}))
    return edit


def pickled(folder: Path):
    import torch

    torch.save({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")


def truncated(folder: Path):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def nan_weights(folder: Path):
    # a readable file whose numbers are gone (every tensor byte 0xff is NaN): before, predict answered with one
    # label for every input and export compared NaN with NaN and reported a difference of 0
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v.clone().fill_(float("nan")) for k, v in tensors.items()}, folder / "adapter_model.safetensors")


def _replace(path: Path, make) -> None:
    """`path` removed and made again by `make` (a pipe, a link, a folder): reading a pipe hung, /dev/zero filled the
    memory, a folder raised IsADirectoryError."""
    path.unlink()
    make(path)


FOLDER_CASES = {
    "empty weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), ["adapter_model.safetensors", "too short"]),
    "truncated weights": (truncated, ["adapter_model.safetensors", "truncated", "the file has"]),
    "pickle renamed .safetensors": (pickled, ["adapter_model.safetensors", "pickle"]),
    "corrupt peft_ft.json": (lambda f: (f / "peft_ft.json").write_text('{"task": '), ["peft_ft.json", "unreadable"]),
    "peft_ft.json naming another class": (edit_json("peft_ft.json", auto_class="pipeline"), ["peft_ft.json", "auto_class"]),
    "bogus target module": (edit_json("adapter_config.json", target_modules=["bogus"]), ["does not load onto its base", "copy the folder again"]),
    "rank 20000 in adapter_config.json": (edit_json("adapter_config.json", r=20000), ["adapter_config.json", "r = 20000", "hidden size (32)"]),
    "rank 16 over rank-8 tensors": (edit_json("adapter_config.json", r=16), ["adapter_config.json", "r = 16", "tensors hold r 8"]),
    "NaN weights": (nan_weights, ["hold NaN or infinity", "the folder is damaged"]),
    "weights file is a pipe": (lambda f: _replace(f / "adapter_model.safetensors", os.mkfifo), ["adapter_model.safetensors", "a pipe"]),
    "weights file links to /dev/zero": (lambda f: _replace(f / "adapter_model.safetensors", lambda p: p.symlink_to("/dev/zero")),
                                        ["adapter_model.safetensors", "a pipe, socket or device"]),
    "config is a folder": (lambda f: _replace(f / "adapter_config.json", os.mkdir), ["adapter_config.json", "a folder, not a file"]),
    "max_length past the positions": (lambda f: (f / "recipe.toml").write_text((f / "recipe.toml").read_text().replace(
        "max_length = 256", "max_length = 4096")), ["recipe.toml", "model.max_length 4096", "512 positions"]),
}


@pytest.mark.parametrize("case", FOLDER_CASES, ids=list(FOLDER_CASES))
def test_a_damaged_adapter_folder_is_one_message(case, clean_run, tmp_path):
    edit, pieces = FOLDER_CASES[case]
    folder = edited_copy(clean_run, tmp_path, edit)
    (tmp_path / "in.txt").write_text("good film\n")
    started = time.monotonic()
    refused(cli("predict", "--adapter", f"a={folder}", tmp_path / "in.txt"), *pieces)
    if "rank 20000" in case:
        assert time.monotonic() - started < 60  # refused before peft allocates a 20000-rank adapter (it took GBs)


@pytest.mark.parametrize("edit, says", [(truncated, "adapter_model.safetensors"), (nan_weights, "hold NaN or infinity"),
                                         (lambda f: (f / "adapter_config.json").write_text('{"r": 8,,'), "adapter_config.json")],
                         ids=["truncated", "NaN weights", "adapter_config.json not JSON"])
def test_merge_and_export_refuse_a_damaged_folder_and_write_nothing(clean_run, tmp_path, edit, says):
    # In this process (the CLI's exit 2 for these errors is tested above): a subprocess per case cost ~20 s.
    from peft_ft.errors import PeftFtError
    from peft_ft.serving.export import export_onnx
    from peft_ft.serving.merge import merge_run

    folder = edited_copy(clean_run, tmp_path, edit)
    with pytest.raises(PeftFtError, match=says):
        merge_run(folder, tmp_path / "merged")
    with pytest.raises(PeftFtError, match=says):
        export_onnx(folder, tmp_path / "onnx")
    assert not list(tmp_path.glob("*merged*")) and not list(tmp_path.glob("*onnx*"))


def test_predict_names_a_row_that_holds_no_text(clean_run, tmp_path):
    from peft_ft.errors import DataError
    from peft_ft.tasks.base import request_text

    for row, says in [({"text": 12345}, "field 'text' is int '12345'; expected text"),
                      ({"text": None}, "field 'text' is NoneType 'None'; expected text"),
                      ({"sentence": "ok", "text": 5}, None)]:
        if says is None:
            assert request_text(row, ["text", "sentence"], "in.jsonl: line 1") == "ok"  # another field holds the text
            continue
        with pytest.raises(DataError, match=f"in.jsonl: line 1: {says}"):
            request_text(row, ["text", "sentence"], "in.jsonl: line 1")
    # a lone surrogate, end to end: a traceback and exit 1 before
    (tmp_path / "in.jsonl").write_text('{"text": "\\ud800 x"}\n')
    refused(cli("predict", "--adapter", f"a={clean_run}", tmp_path / "in.jsonl"),
            "in.jsonl: line 1: field 'text': character 0 is a lone UTF-16 surrogate")


def test_predict_output_to_a_read_only_place(clean_run, tmp_path):
    (tmp_path / "in.txt").write_text("good film\n")
    refused(cli("predict", "--adapter", f"a={clean_run}", "--output", tmp_path / "no-such-folder" / "out.jsonl", tmp_path / "in.txt"),
            "--output", "folder does not exist")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if mount(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)]):
        try:
            refused(cli("predict", "--adapter", f"a={clean_run}", "--output", readonly / "out.jsonl", tmp_path / "in.txt"),
                    "--output", "read-only")
        finally:
            mount([str(readonly)], "umount")
    # root writes through permission bits; /proc refuses new files to everyone
    refused(cli("predict", "--adapter", f"a={clean_run}", "--output", "/proc/peft-ft-out.jsonl", tmp_path / "in.txt"), "--output")


def test_out_folders_that_cannot_be_made_are_refused_before_loading(clean_run, tmp_path):
    """merge/export/combine stage OUT in a hidden folder beside it, then rename: a link, a file on the path or a
    name too long to stage failed (a traceback) after the model was loaded and merged."""
    from peft_ft.errors import PeftFtError
    from peft_ft.serving.merge import check_out

    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "afile").write_text("x")
    for out, says in ((tmp_path / "link", "is a symbolic link"), (tmp_path / "dangling", "is a symbolic link"),
                      (tmp_path / "afile" / "sub", "afile is a file"), (tmp_path / ("x" * 250), "too long to stage")):
        with pytest.raises(PeftFtError, match=says):
            check_out(out)
    check_out(tmp_path / "new" / "deeper")  # a new folder under folders still to be made is fine


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    """`error` as Optuna raises it after its storage failed: with `cause` as its context."""
    error.__context__ = cause
    return error


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/r/x/train.log"), "runs/r/x/train.log: No space left on device; free some space"),
    (OSError(errno.EROFS, "Read-only file system", "out/.m.merging-1"), "Read-only file system; the file system is read-only"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/r/x/checkpoints"), "was it moved or deleted while"),
    (OSError(errno.EFBIG, "File too large", "a.safetensors"), "lift the file size limit"),
    (_raised_from(AssertionError("Should not reach."), Exception("(sqlite3.OperationalError) database or disk is full")),
     "the disk is full while writing ((sqlite3.OperationalError) database or disk is full); free some space"),
])
def test_the_machines_errors_met_anywhere_are_one_message_not_a_traceback(monkeypatch, capsys, error, says):
    """A full or read-only disk, or a run folder moved away mid-run, met outside the checks that name it."""
    import peft_ft.cli

    def fail(args):
        raise error

    monkeypatch.setitem(peft_ft.cli.COMMANDS, "validate", (fail, *peft_ft.cli.COMMANDS["validate"][1:]))
    assert peft_ft.cli.main(["validate", "r.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import peft_ft.cli

    def fail(args):
        raise OSError(errno.EBADF, "Bad file descriptor")  # no advice for the user: a bug of ours

    monkeypatch.setitem(peft_ft.cli.COMMANDS, "validate", (fail, *peft_ft.cli.COMMANDS["validate"][1:]))
    with pytest.raises(OSError, match="Bad file descriptor"):
        peft_ft.cli.main(["validate", "r.toml"])


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_port_out_of_range(port):
    refused(cli("serve", "--adapter", "a=/nowhere", "--port", port, timeout=60), "--port")


def mount(args: list[str], command: str = "mount") -> bool:
    """Whether a (u)mount worked: tests that need a small or read-only file system skip without one."""
    if os.geteuid() != 0 or shutil.which(command) is None:
        return False
    return subprocess.run([command, *args], capture_output=True).returncode == 0


# --- recipes: validate and run share one pre-flight -----------------------------------------------------


@pytest.fixture
def recipe_case(tmp_path, tiny_bert):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(32, seed=1))
    write_jsonl(data / "valid.jsonl", sentiment_rows(8, seed=2))
    path = write_recipe(tmp_path / "r.toml", recipe_text(tiny_bert, data, data={"validation": "valid.jsonl"},
                                                         train_opts={"epochs": 1, "threads": 1}, defaults=False,
                                                         output={"dir": tmp_path / "runs", "name": "r"}))
    return path, tmp_path / "runs"


def distilbert(tmp_path: Path, tiny_bert: Path) -> Path:
    from transformers import DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=200, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if (tiny_bert / f).exists():
            shutil.copy(tiny_bert / f, folder / f)
    return folder


RECIPE_CASES = {
    "seq2seq on an encoder-only model": (["task.type=seq2seq", "data.format=jsonl", "data.text_column=text", "data.target_column=label"],
                                         ["task.type", "encoder-decoder", "encoder-only"]),
    "max_length past the position table": (["model.max_length=100000"], ["model.max_length", "16384"]),
    "max_length past this model's positions": (["model.max_length=4096"], ["model.max_length", "512 positions"]),
    "rank past the ceiling": (["adapter.r=100000"], ["adapter.r", "at most 1024"]),
    "rank past the model's width": (["adapter.r=64"], ["adapter.r", "hidden size (32)"]),
    "virtual tokens past the positions": (["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=300", "model.max_length=300"],
                                          ["adapter.num_virtual_tokens", "at most 212"]),
    "a target module the model lacks": (['adapter.target_modules=["bogus"]'], ["adapter.target_modules", "bogus"]),
}


def run_in_process(args: list, capsys) -> subprocess.CompletedProcess:
    """`peft-ft run` through `cli.main` in this process (torch is loaded already: seconds saved per case)."""
    from peft_ft.cli import main

    capsys.readouterr()
    code = main(["run", *map(str, args)])
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


@pytest.mark.parametrize("case", RECIPE_CASES, ids=list(RECIPE_CASES))
def test_validate_and_run_refuse_alike_and_run_leaves_no_folder(case, recipe_case, capsys):
    path, runs = recipe_case
    sets, pieces = RECIPE_CASES[case]
    args = [a for s in sets for a in ("--set", s)]
    validated = refused(cli("validate", path, *args), *pieces)
    ran = refused(run_in_process([path, *args], capsys), *pieces)
    assert validated == ran
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))


def test_rank_is_bounded_by_the_narrowest_target_layer():
    import torch

    from peft_ft.errors import PeftFtError
    from peft_ft.methods import check_rank

    model = torch.nn.Module()
    model.wide, model.narrow = torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)
    recipe = build_recipe({"data": {"train": "x"}, "adapter": {"r": 8}}, "r.toml")
    check_rank(model, ["wide"], recipe)
    with pytest.raises(PeftFtError, match=r"adapter.r: 8 is more than the smallest side \(4\) of the target layer narrow"):
        check_rank(model, ["wide", "narrow"], recipe)
    with pytest.raises(PeftFtError, match="layer narrow"):
        check_rank(model, r"nar+ow", recipe)


def test_prefix_tuning_on_a_model_without_past_keys(recipe_case, tmp_path, tiny_bert, capsys):
    path, runs = recipe_case
    model = distilbert(tmp_path, tiny_bert)
    args = ["--set", f"model.name={json.dumps(str(model))}", "--set", "adapter.method=prefix_tuning", "--set", "model.max_length=64"]
    validated = refused(cli("validate", path, *args), "prefix_tuning", "distilbert")
    assert refused(run_in_process([path, *args], capsys)) == validated
    assert not runs.exists() or not any(runs.rglob("*"))


def test_a_refusal_found_while_building_removes_the_new_run_folder(recipe_case, monkeypatch):
    """A misfit only the real model shows (here: forced) ends the run without leaving an orphan folder."""
    import peft_ft.engine.run
    from peft_ft.errors import PeftFtError
    from peft_ft.recipe.load import load_recipe

    path, runs = recipe_case

    def misfit(*args, **kwargs):
        raise PeftFtError("adapter.method: does not fit this model")

    monkeypatch.setattr(peft_ft.engine.run, "build_model", misfit)
    with pytest.raises(PeftFtError, match="does not fit"):
        peft_ft.engine.run.run(load_recipe(path))
    assert not (runs / "r").exists()  # the recipe's folder held only this run: gone too
    earlier = runs / "r" / "20260101-000000"
    earlier.mkdir(parents=True)
    with pytest.raises(PeftFtError, match="does not fit"):
        peft_ft.engine.run.run(load_recipe(path))
    assert list((runs / "r").iterdir()) == [earlier]  # an earlier run's folder is kept, and so is their parent


def test_validate_stays_fast_without_model_checks(recipe_case):
    """A recipe whose checks need only config.json: validate imports no torch (a second or less)."""
    path, _ = recipe_case
    code = ("import sys, time; t = time.perf_counter(); from peft_ft.cli import main; rc = main(['validate', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules, time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    rc, torch_loaded, seconds = done.stdout.split()[-3:]
    assert rc == "0" and torch_loaded == "False", done.stdout + done.stderr


# --- a full disk -----------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_leaves_nothing_half_written(clean_run, tmp_path, monkeypatch, capsys):
    """ENOSPC injected into safetensors' writer (as the Rust writer reports it) during merge's save."""
    import safetensors
    import transformers.modeling_utils

    from peft_ft.cli import main

    def full(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # what save_pretrained calls
    assert main(["merge", str(clean_run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space to save the merged model: it needs about" in err and "Nothing was left half-written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_ones(tmp_path, monkeypatch):
    import torch

    from peft_ft.engine import checkpoint
    from peft_ft.errors import PeftFtError

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {})

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("peft_ft.storage.write_atomic", full)
    with pytest.raises(PeftFtError, match=r"not enough disk space to save checkpoint step-0000002: it needs about"):
        checkpoint.save(tmp_path, 2, model, optimizer, scheduler, {})
    assert [p.name for p in checkpoint.listed(tmp_path)] == ["step-0000001"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]


def test_a_disk_that_fills_at_the_last_file_leaves_a_run_that_resume_finishes(tmp_path, tiny_bert, monkeypatch, capsys):
    """metrics.json marks a run finished, so it is written last: a disk that filled at the model card before left a
    "finished" folder without it, which --resume refused and nothing could complete."""
    import peft_ft.engine.run
    from peft_ft.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(16))
    recipe = write_recipe(tmp_path / "r.toml", recipe_text(tiny_bert, data, task={"type": "classification"},
                                                            output={"dir": tmp_path / "runs"}))
    real = peft_ft.engine.run.write_json

    def full_at_metrics(path, content):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, content)

    monkeypatch.setattr(peft_ft.engine.run, "write_json", full_at_metrics)
    assert main(["run", str(recipe)]) == 2
    assert "metrics.json: No space left on device; free some space" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs" / "r").iterdir()
    assert (run_dir / "README.md").is_file() and not (run_dir / "metrics.json").exists()
    monkeypatch.setattr(peft_ft.engine.run, "write_json", real)
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert (run_dir / "metrics.json").is_file() and not (run_dir / "checkpoints").exists()


def test_a_small_real_file_system_fills_up(clean_run, tmp_path):
    """A 64 KiB tmpfs cannot hold the merged model (~160 KiB): refused with the size it needs, nothing left there."""
    small = tmp_path / "small"
    small.mkdir()
    if not mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]):
        pytest.skip("needs root and mount for a small tmpfs")
    try:
        message = refused(cli("merge", clean_run, "--out", small / "merged"), "not enough disk space", "it needs about")
        assert list(small.iterdir()) == [], message
    finally:
        mount([str(small)], "umount")


@pytest.mark.parametrize("inodes", [4, 6, 9])
def test_a_file_system_out_of_inodes_is_named_and_left_as_it_was(tmp_path, tiny_bert, capsys, inodes):
    """A disk with bytes to spare but no inode left gives ENOSPC too: it was reported as "free some space" (there
    was space), and a run that met it at its first file left an empty run folder on each attempt."""
    from peft_ft.cli import main

    small = tmp_path / "small"
    small.mkdir()
    if not mount(["-t", "tmpfs", "-o", f"size=8m,nr_inodes={inodes}", "tmpfs", str(small)]):
        pytest.skip("needs root and mount for a small tmpfs")
    try:
        data = tmp_path / "data"
        data.mkdir()
        write_jsonl(data / "train.jsonl", sentiment_rows(16))
        recipe = write_recipe(tmp_path / "r.toml", recipe_text(tiny_bert, data, task={"type": "classification"},
                                                                output={"dir": small / "runs"}))
        assert main(["run", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "no free inodes" in err and "Traceback" not in err, err
        assert [p.name for p in small.rglob("*")] in ([], ["runs"]), list(small.rglob("*"))  # no empty run folder
    finally:
        mount([str(small)], "umount")


def test_inodes_are_told_apart_from_bytes(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from peft_ft.storage import machine_problem, no_space

    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "b.json"))
    assert "free some space and run again" in machine_problem(error)
    assert "not enough disk space" in str(no_space(tmp_path, 10, "x"))
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_files=100, f_favail=0, f_bavail=10**6, f_frsize=4096))
    assert "no free inodes" in machine_problem(error) and "no free inodes" in str(no_space(tmp_path, 10, "x"))


@pytest.mark.parametrize("tokens, says", [([["a", "b"], ["c"]], "holds list"), ([1, 2], "holds int"), (["ok", "\ud800"], "lone UTF-16 surrogate")])
def test_ner_request_tokens_must_be_words(tokens, says):
    from peft_ft.errors import DataError
    from peft_ft.tasks.ner import _words_input

    recipe = build_recipe({"task": {"type": "ner"}, "data": {"train": "train.conll"}}, "r.toml")
    with pytest.raises(DataError, match=f"in.jsonl: line 1: field 'tokens'.*{says}"):  # before: str() of each item, tagged
        _words_input({"tokens": tokens}, recipe, "in.jsonl: line 1")


def test_export_names_its_own_flag_for_an_occupied_output(clean_run, tmp_path):
    from peft_ft.errors import PeftFtError
    from peft_ft.serving.export import export_onnx

    (tmp_path / "taken").write_text("mine")
    with pytest.raises(PeftFtError, match="--onnx .*taken: already exists and is a file, not an empty folder"):
        export_onnx(clean_run, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_hub_base_missing_offline_is_named_at_once(clean_run, tmp_path, monkeypatch):
    # before: ~60 s of hub retries, then a message about the recipe's model.name, which this folder never used
    folder = edited_copy(clean_run, tmp_path, edit_json("peft_ft.json", base_model="no-org/no-model", base_model_source="hub"))
    (tmp_path / "in.txt").write_text("good film\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(cli("predict", "--adapter", f"a={folder}", tmp_path / "in.txt"),
            f"adapter a: {folder}: base model (peft_ft.json's base_model): 'no-org/no-model' is a hub id", "not in the local cache")
