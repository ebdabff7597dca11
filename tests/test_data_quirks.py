"""Data quirks read as the user meant them: empty label cells dropped and counted in every format,
integer labels without a phantom class, a warning when nothing will be evaluated, a byte-order mark
read as UTF-8-SIG, an explicit data.dir over the environment, files that honour the umask, and adapter
names matched whole."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from peft_ft.errors import PeftFtError
from peft_ft.recipe.load import build_recipe, load_recipe
from peft_ft.tasks import TASKS

TEXTS = ["good film", "bad film", "great plot", "awful plot", "fine acting", "terrible acting"]


def load(tmp_path: Path, train: str, *, validation: str | None = None, **data) -> object:
    recipe = build_recipe({"data": {"dir": str(tmp_path), "train": train, **({"validation": validation} if validation else {}), **data}},
                          str(tmp_path / "r.toml"))
    return TASKS["classification"].load(recipe, tmp_path)


def write_table(path: Path, labels: list) -> Path:
    """The texts with `labels` in the file's own format (None: the format's empty cell)."""
    rows = [{"text": t, "label": label} for t, label in zip(TEXTS, labels)]
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{'' if r['label'] is None else r['label']}\n" for r in rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_empty_label_cells_are_dropped_and_counted_in_every_format(tmp_path, suffix):
    write_table(tmp_path / f"train{suffix}", ["pos", "neg", None, "pos", None, "neg"])
    data = load(tmp_path, f"train{suffix}")
    assert data.labels == ["neg", "pos"]  # never a class ""
    assert len(data.splits["train"].examples) == 4
    assert any("dropped 2 unlabelled rows" in note for note in data.notes), data.notes


def test_an_empty_string_label_in_jsonl_is_dropped_too(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(TEXTS, ["pos", "", "neg", " ", "pos", "neg"])))
    data = load(tmp_path, "train.jsonl")
    assert data.labels == ["neg", "pos"] and len(data.splits["train"].examples) == 4


def test_integer_labels_take_their_classes_from_the_data(tmp_path):
    write_table(tmp_path / "train.jsonl", [1, 2, 3, 4, 5, 3])
    data = load(tmp_path, "train.jsonl")
    assert data.labels == ["1", "2", "3", "4", "5"]  # five classes, no phantom 0
    assert [e["label"] for e in data.splits["train"].examples] == [0, 1, 2, 3, 4, 2]
    assert TASKS["classification"].model_kwargs(data)["num_labels"] == 5


def test_an_integer_label_absent_from_training_is_an_error_not_a_shifted_class(tmp_path):
    write_table(tmp_path / "train.csv", [1, 3, 1, 3, 1, 3])
    write_table(tmp_path / "valid.csv", [1, 2, 3, 1, 3, 1])
    with pytest.raises(PeftFtError, match=r"valid.csv: row 2: label '2' is not among the training labels \(1, 3\)"):
        load(tmp_path, "train.csv", validation="valid.csv")


def test_integer_labels_follow_task_labels_when_given(tmp_path):
    write_table(tmp_path / "train.csv", [0, 1, 0, 1, 0, 1])
    recipe = build_recipe({"task": {"labels": ["neg", "pos"]}, "data": {"dir": str(tmp_path), "train": "train.csv"}}, "r.toml")
    data = TASKS["classification"].load(recipe, tmp_path)
    assert data.labels == ["neg", "pos"] and [e["label"] for e in data.splits["train"].examples] == [0, 1, 0, 1, 0, 1]


def test_a_byte_order_mark_is_read_as_utf8_sig(tmp_path):
    write_table(tmp_path / "train.csv", ["pos", "neg"] * 3)
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.csv").read_bytes())
    data = load(tmp_path, "train.csv")
    assert data.labels == ["neg", "pos"] and data.splits["train"].examples[0]["text"] == "good film"
    (tmp_path / "r.toml").write_bytes(b"\xef\xbb\xbf" + b'[data]\ntrain = "train.csv"\n')
    assert load_recipe(tmp_path / "r.toml").data.train == "train.csv"


def test_an_explicit_data_dir_wins_over_the_environment(tmp_path, monkeypatch):
    from peft_ft.data.files import resolve_data_dir

    (tmp_path / "mine").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("PEFT_FT_DATA_DIR", str(tmp_path / "env"))
    explicit = build_recipe({"data": {"dir": str(tmp_path / "mine"), "train": "x"}}, "r.toml")
    assert resolve_data_dir(explicit) == (tmp_path / "mine").resolve()
    assert resolve_data_dir(build_recipe({"data": {"train": "x"}}, "r.toml")) == (tmp_path / "env").resolve()
    assert resolve_data_dir(explicit, str(tmp_path / "env")) == (tmp_path / "env").resolve()  # --data-dir first


def test_files_named_by_full_path_need_no_data_folder(tmp_path, monkeypatch):
    """A recipe whose every file is an absolute path was refused "data directory not found" where no default folder
    existed, though the folder is never used; an explicit --data-dir that does not exist is still refused. The
    message lists each folder it looked in once (from the repository root, the two defaults are one folder)."""
    from peft_ft.data.files import resolve_data_dir
    from peft_ft.errors import DataError

    monkeypatch.delenv("PEFT_FT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("peft_ft.data.files.PROJECT_ROOT", tmp_path)  # run from the repository root, no shared/ beside it
    full = build_recipe({"data": {"train": str(tmp_path / "a" / "train.csv"), "test": [str(tmp_path / "b" / "t.csv")]}}, "r.toml")
    assert resolve_data_dir(full) == tmp_path / "a"
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir(full, str(tmp_path / "nowhere"))
    relative = build_recipe({"data": {"train": str(tmp_path / "a" / "train.csv"), "test": ["t.csv"]}}, "r.toml")
    with pytest.raises(DataError, match="data directory not found") as refused:
        resolve_data_dir(relative)
    assert str(refused.value).count("(default)") == 1, refused.value


def test_no_evaluation_split_is_a_warning_at_validate(tmp_path, tiny_bert):
    from helpers import recipe_text

    write_table(tmp_path / "train.csv", ["pos", "neg"] * 3)
    (tmp_path / "r.toml").write_text(recipe_text(tiny_bert, tmp_path, train="train.csv", defaults=False))
    done = subprocess.run([sys.executable, "-m", "peft_ft", "validate", str(tmp_path / "r.toml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no validation or test split: nothing will be evaluated" in done.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_and_folders_honour_the_umask(tmp_path, mask):
    import torch

    from peft_ft import storage as output
    from peft_ft.engine import checkpoint

    old = os.umask(mask)
    output.umask.cache_clear()
    try:
        output.write_atomic(tmp_path / "a.json", "{}")
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        saved = checkpoint.save(tmp_path, 1, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), {})
    finally:
        os.umask(old)
        output.umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((saved / checkpoint.STATE).stat().st_mode) == 0o666 & ~mask


def test_an_atomic_write_goes_through_links_keeps_a_files_mode_and_writes_to_devices(tmp_path):
    """`predict --output` names what the user has: a link to a file, a private file, a device. Renaming a new file
    over the path replaced the link, the device node (as root, /dev/null itself) and the file's permissions."""
    from peft_ft.storage import write_atomic

    (tmp_path / "target.jsonl").write_text("old")
    (tmp_path / "link.jsonl").symlink_to("target.jsonl")
    write_atomic(tmp_path / "link.jsonl", "new\n")
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "target.jsonl").read_text() == "new\n"
    private = tmp_path / "private.jsonl"
    private.write_text("old")
    private.chmod(0o600)
    write_atomic(private, "new\n")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == "new\n"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as a shell's `| consumer` would be
    try:
        write_atomic(fifo, "through the pipe\n")
        assert os.read(reader, 100) == b"through the pipe\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still the pipe, not a file in its place


def test_a_plot_on_a_full_disk_leaves_the_old_one_and_a_message(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peft_ft.storage import save_figure

    fig = plt.figure()
    save_figure(fig, tmp_path / "plot.png", dpi=50)
    old = (tmp_path / "plot.png").read_bytes()
    assert old.startswith(b"\x89PNG")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full)
    with pytest.raises(PeftFtError, match="not enough disk space to save plot.png"):
        save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_run_and_merged_folders_honour_the_umask(tmp_path, tiny_bert):
    from helpers import train_sentiment
    from peft_ft import storage as output
    from peft_ft.serving.merge import merge_run

    old = os.umask(0o022)
    output.umask.cache_clear()
    try:
        run_dir = train_sentiment(tmp_path, tiny_bert, "pos")
        merged = merge_run(run_dir, tmp_path / "merged")
    finally:
        os.umask(old)
        output.umask.cache_clear()
    assert stat.S_IMODE(merged.stat().st_mode) == 0o755
    for folder in (merged, run_dir):  # safetensors writes its files 0600 itself: another user could not read them
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in folder.iterdir() if f.is_file()} == \
            {f.name: oct(0o644) for f in folder.iterdir() if f.is_file()}


@pytest.mark.parametrize("value", ["pos\n=/x", "pos\r=/x", "po s=/x", "pos/../x=/x", "=/x"])
def test_adapter_names_are_matched_whole(value):
    from peft_ft.serving.predict import parse_adapter_args

    with pytest.raises(PeftFtError, match="may use only letters, digits"):
        parse_adapter_args([value])
