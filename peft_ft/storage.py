"""The run folder: created once and never overwritten; every file written atomically."""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.recipe.schema import Recipe


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


FINGERPRINT = "# fingerprint: "
# What `--resume` lets differ from the run's recorded recipe: only a longer run (documented in README).
RAISABLE_ON_RESUME = ("train.epochs", "train.max_steps")


def fingerprint(recipe: Recipe) -> str:
    """sha256 of the resolved recipe's values (not its comments or layout)."""
    import hashlib

    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def recipe_text(recipe: Recipe) -> str:
    """A run folder's recipe.toml: every resolved value, and the fingerprint `--resume` checks."""
    from peft_ft.recipe.schema import to_toml

    # Second line: the first stays "# resolved from ...", which tools follow back to the recipe file.
    header, body = to_toml(recipe).split("\n", 1)
    return f"{header}\n{FINGERPRINT}{fingerprint(recipe)} (sha256 of the values below; --resume refuses other values)\n{body}"


def recorded_fingerprint(path: Path) -> str | None:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(FINGERPRINT):
            return line[len(FINGERPRINT):].split()[0]
    return None


def recipe_changes(recorded: dict, now: Recipe) -> list[str]:
    """`key: was X, now Y` for every value of `now` that differs from the `recorded` one (Recipe.to_dict()),
    except a raised train.epochs / train.max_steps (0 = no step limit counts as the highest)."""
    changes = []
    current = now.to_dict()
    for section, values in current.items():
        for key, value in values.items():
            dotted, old = f"{section}.{key}", recorded.get(section, {}).get(key)
            if old == value:
                continue
            if dotted in RAISABLE_ON_RESUME and isinstance(old, int) and _raised(dotted, old, value):
                continue
            changes.append(f"{dotted}: was {old!r}, now {value!r}")
    return changes


def _raised(dotted: str, old: int, new: int) -> bool:
    if dotted == "train.max_steps":
        return new == 0 or (old != 0 and new > old)
    return new > old


class RunDirLock:
    """An exclusive lock (flock) on a run folder for as long as a run or resume works in it: a second
    `--resume` (or a resume of a run still training) is refused instead of racing it. The lock is on the
    folder itself: no lock file is left behind, and a killed process's lock goes with it."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = Path(run_dir), None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise PeftFtError(f"{self.run_dir}: another peft-ft process is training in this run folder (it holds its lock); "
                              f"wait for it to finish or stop it, then resume") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def in_use(run_dir: Path) -> bool:
    """Whether a process holds `run_dir`'s lock (a run or resume working in it now)."""
    try:
        with RunDirLock(run_dir):
            return False
    except PeftFtError:
        return True
    except OSError:
        return False


def clean_stale_saves(run_dir: Path) -> list[str]:
    """Remove what a killed save left in a run folder nobody works in: hidden `.saving-*` folders (a
    save_pretrained cut short) and `.NAME.*.tmp` files (a write_atomic cut short). Returns their names."""
    removed = []
    for p in Path(run_dir).glob(".*"):
        if p.is_dir() and p.name.startswith(".saving-"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def clean_stale_siblings(recipe: Recipe) -> list[str]:
    """Before a new run: the stale saves in earlier runs of the same name that no process works in."""
    parent = Path(recipe.output.dir) / (recipe.output.name or Path(recipe.source).stem)
    removed = []
    if parent.is_dir():
        for run_dir in sorted(p for p in parent.iterdir() if p.is_dir()):
            if any(run_dir.glob(".saving-*")) and not in_use(run_dir):
                removed += [f"{run_dir}/{name}" for name in clean_stale_saves(run_dir)]
    return removed


def disk_full(error: BaseException) -> bool:
    """ENOSPC (or a quota) as Python raises it, or as safetensors' Rust writer reports it (SafetensorError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "code: 28" in text or "StorageFull" in text


def no_space(folder: Path, needed: int, what: str) -> PeftFtError:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize if Path(folder).exists() else 0
    return PeftFtError(f"{folder}: not enough disk space to save {what}: it needs about {human_size(needed)}, "
                       f"{human_size(free)} is free. Nothing was left half-written; free some space (or move "
                       f"output.dir) and run again")


@contextlib.contextmanager
def space_for(folder: Path, needed: int, what: str):
    """Refuse at once when `folder`'s disk has less than `needed` bytes free; a disk that fills up during the
    save (other writers, an estimate too low) gives the same message. Callers write atomically, so
    nothing half-written stays behind either way."""
    stats = os.statvfs(folder)
    if stats.f_blocks and stats.f_bavail * stats.f_frsize < needed:  # f_blocks 0: no block accounting (/proc...)
        raise no_space(folder, needed, what)
    try:
        yield
    except PeftFtError:
        raise
    except Exception as e:
        if disk_full(e):
            raise no_space(folder, needed, what) from None
        raise


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.cache
def umask() -> int:
    """The process's umask (read once: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp make private (0600 / 0700) files and folders; what we rename into place gets the
    permissions any other new file would (0644 / 0755 under the usual umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or the new one."""
    data = text.encode("utf-8")
    with space_for(path.parent, len(data), path.name):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            honour_umask(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_pretrained_atomic(model, run_dir: Path, state_dict: dict | None = None) -> list[Path]:
    """`save_pretrained` into a hidden folder, then move each file into place. `state_dict`: weights
    gathered from a sharded (FSDP / ZeRO-3) run, saved instead of the model's own shards. An adapter saves
    its trainable tensors (adapter and head), a full model every parameter: that is the space it needs."""
    adapter = hasattr(model, "peft_config")
    params = model.parameters() if hasattr(model, "parameters") else []
    needed = tensor_bytes(p for p in params if p.requires_grad or not adapter)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".saving-"))
    try:
        with space_for(run_dir, needed, "the model weights"):
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
