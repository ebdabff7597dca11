"""Writing files safely: atomically (a crash leaves the old file or the new one), with the space checked first and
a full disk reported as such, with the permissions any new file gets. The run folder's layout is `peft_ft.rundir`'s."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError


def disk_full(error: BaseException) -> bool:
    """ENOSPC (or a quota, or the file size limit) as Python raises it, or as safetensors' Rust writer reports it
    (SafetensorError)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: ulimit -f
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "code: 28", "StorageFull", "File too large", "code: 27",
                                         "database or disk is full"))


# errno values that say something about the machine rather than a bug in peft-ft, with what the user can do
_MACHINE_ADVICE = {
    errno.ENOSPC: "free some space and run again", errno.EDQUOT: "free some space (the disk quota) and run again",
    errno.EFBIG: "lift the file size limit (ulimit -f) and run again",
    errno.EROFS: "the file system is read-only: choose a folder you can write",
    errno.EACCES: "choose a folder you can write, or fix its permissions", errno.EPERM: "fix its permissions, or choose another folder",
    errno.ENAMETOOLONG: "choose a shorter path", errno.ELOOP: "a symbolic link in the path leads back to itself: fix it",
    errno.ENOENT: "a folder in the path is missing: was it moved or deleted while the command ran?",
    errno.ENOTDIR: "a part of the path is a file, not a folder: give a folder path",
    errno.EIO: "the disk reported an input/output error: check it",
}


def machine_problem(error: BaseException) -> str | None:
    """A message for an error of the machine (a full disk, a read-only or vanished folder) met outside the checks
    that name it themselves; None for anything else, which stays a bug with its traceback."""
    chain = [error]
    while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    full = next((e for e in chain if disk_full(e) and not isinstance(e, OSError)), None)
    if full is not None:  # safetensors' Rust writer; sqlite under Optuna (which ends in an AssertionError of its own)
        return f"the disk is full while writing ({str(full).splitlines()[0]}); free some space and run again"
    if not isinstance(error, OSError) or error.errno not in _MACHINE_ADVICE:
        return None
    where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
    return f"{where + ': ' if where else ''}{error.strerror}; {advice_for(error)}"


def advice_for(error: OSError, path: Path | None = None, otherwise: str = "choose a folder you can write") -> str:
    """What the user can do about `error`, met at `path` (else at the error's own file name)."""
    at = path if path is not None else (Path(os.fsdecode(error.filename)) if error.filename is not None else None)
    if error.errno == errno.ENOSPC and at is not None and out_of_inodes(at):
        return NO_INODES
    return _MACHINE_ADVICE.get(error.errno, otherwise)


# ENOSPC also means a file system with bytes to spare but no inode left for one more file (many small files).
NO_INODES = ("its file system has no free inodes (file entries) left, though it has free space: remove files you do not "
             "need there (many small ones count as much as big ones), or use another file system, and run again")


def out_of_inodes(path: Path) -> bool:
    """The file system of `path` (or of its nearest existing folder) can make no more files."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_files > 0 and stats.f_favail == 0  # f_files 0: no inode accounting (btrfs, some network mounts)


def unwritable(folder: Path) -> str | None:
    """Why new files cannot be made in `folder`, an existing path ("is a file", ...), or None when they can."""
    if not folder.is_dir():
        return "is a file"
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "is on a read-only file system"
    return None if os.access(folder, os.W_OK | os.X_OK) else "is not writable by this user"


def no_space(folder: Path, needed: int, what: str) -> PeftFtError:
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize if Path(folder).exists() else 0
    if out_of_inodes(folder):
        return PeftFtError(f"{folder}: no file can be made to save {what}: {NO_INODES}. Nothing was left half-written")
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


def honour_umask_tree(folder: Path) -> None:
    """`honour_umask` for a staging folder and everything in it: safetensors writes its files 0600 itself."""
    honour_umask(folder, directory=True)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            honour_umask(path, directory=path.is_dir())


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or the new one. A symbolic
    link is written through (its target replaced, the link kept), an existing file keeps its permissions, and a
    device or pipe (`--output /dev/stdout`) is written to as it is: renaming over it would replace it with a file."""
    data = text.encode("utf-8")
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as f:
            f.write(data)
        return
    with _replacing(path, len(data)) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure saved as `write_atomic` saves text: a disk that fills leaves the old plot (or none) and a
    message, not an empty PNG."""
    with _replacing(Path(path), 0) as (fd, tmp):
        os.close(fd)
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix[1:])  # the temporary name ends .tmp


@contextlib.contextmanager
def _replacing(path: Path, needed: int):
    """A temporary file beside `path` (its open descriptor, which the caller closes, and its path), renamed over
    `path` once written, with the permissions `path` has (a private 0600 file stays private) or a new file's."""
    mode = path.stat().st_mode & 0o7777 if path.is_file() else None
    with space_for(path.parent, needed, path.name):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # what a run cleans up
        tmp = Path(name)
        try:
            yield fd, tmp
            if mode is None:
                honour_umask(tmp)
            else:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
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
            honour_umask(f)  # safetensors writes its file private (0600), as a temporary file would be
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


def lock_folder(folder: Path) -> int | None:
    """An exclusive flock on `folder` itself, as an open descriptor (closing it releases the lock), or None when
    another process holds it. On the folder, not a lock file: nothing is left behind, and a killed process's lock
    goes with it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
