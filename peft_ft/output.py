"""The run folder: created once and never overwritten; every file written atomically."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.schema import Recipe


def create_run_dir(recipe: Recipe, now: datetime.datetime | None = None) -> Path:
    """`<output.dir>/<name>/<timestamp>/`; an existing folder is an error, never reused."""
    name = recipe.output.name or Path(recipe.source).stem
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(recipe.output.dir) / name / stamp
    taken = f"output: run folder {run_dir} already exists; it is kept as it is. Wait a second and run again, or set output.name"
    if run_dir.exists():
        raise PeftFtError(taken)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()  # not exist_ok: two runs started in the same second never share a folder
    except OSError as e:
        if run_dir.is_dir():
            raise PeftFtError(taken) from None
        blocking = next((p for p in run_dir.parents if p.is_file()), None)
        why = f"{blocking} is a file" if blocking else e.strerror
        raise PeftFtError(f"{recipe.source}: output.dir: cannot make the run folder {run_dir} ({why}); "
                          f"set output.dir to a folder you can write") from None
    return run_dir


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_pretrained_atomic(model, run_dir: Path, state_dict: dict | None = None) -> list[Path]:
    """`save_pretrained` into a hidden folder, then move each file into place. `state_dict`: weights
    gathered from a sharded (FSDP / ZeRO-3) run, saved instead of the model's own shards."""
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".saving-"))
    try:
        model.save_pretrained(staging, **({"state_dict": state_dict} if state_dict is not None else {}))
        moved = []
        for f in sorted(staging.iterdir()):
            if f.name == "README.md":  # peft's generic card; ours replaces it
                continue
            os.replace(f, run_dir / f.name)
            moved.append(run_dir / f.name)
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def folder_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
