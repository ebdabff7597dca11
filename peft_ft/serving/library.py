"""Which adapters `peft-ft serve` has loaded, and loading more while it runs.

`--adapter NAME=DIR` runs are loaded at start. With `--adapter-dir DIR`, an admin may load more
(`POST /adapters {"name", "path"}`, `path` relative to DIR) and unload them (`DELETE /adapters/NAME`).
A runtime path is refused unless it stays inside DIR: no absolute path, no `..`, and the folder and
every file in it must resolve (symlinks followed) inside DIR. Loading then follows the CLI's rules
(no pickle files unless --allow-pickle; the remote-code setting of the CLI).

`--max-adapters N` keeps at most N loaded: loading one more unloads the least recently used adapter
that no request is using; it stays known and is reloaded when a request names it (the reload time
is in /metrics).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from peft_ft.errors import PeftFtError
from peft_ft.rundir.layout import read_info
from peft_ft.tasks import TASKS


class LibraryError(PeftFtError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def allowed_run_dir(root: Path, path: str) -> Path:
    """The run folder `path` names inside `root`, or a LibraryError (403) saying why it is refused."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if not parts or PurePosixPath(path).is_absolute() or Path(path).is_absolute() or ".." in parts or "\x00" in path:
        raise LibraryError(403, f"path {path!r} is refused: give a folder relative to --adapter-dir, without '..'")
    root = root.resolve()
    target = _resolved(root / path, path, path)
    if not target.is_relative_to(root):
        raise LibraryError(403, f"path {path!r} leads outside --adapter-dir (a symbolic link?): refused")
    if not target.is_dir():
        raise LibraryError(404, f"path {path!r}: no such folder inside --adapter-dir")
    for file in target.rglob("*"):
        if not _resolved(file, path, file.relative_to(target)).is_relative_to(root):
            raise LibraryError(403, f"path {path!r}: {file.relative_to(target)} links outside --adapter-dir: refused")
    return target


def _resolved(file: Path, path: str, shown) -> Path:
    """`file` with its links followed; a link loop (or a path the system cannot follow) is the request's problem."""
    try:
        return file.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # RuntimeError: "Symlink loop" (Python 3.11)
        raise LibraryError(422, f"path {path!r}: {shown} cannot be followed ({e}); fix or remove that link") from None


class Library:
    """The adapters a server knows (name -> run folder) and those loaded now, least recently used first."""

    def __init__(self, adapters, started: dict[str, str], adapter_dir: str | None = None, max_adapters: int | None = None):
        self.adapters = adapters  # the AdapterSet
        self.known: dict[str, Path] = {name: Path(path) for name, path in started.items()}
        self.root = Path(adapter_dir) if adapter_dir else None
        self.max_adapters = max_adapters
        self.recent: OrderedDict[str, None] = OrderedDict((name, None) for name in adapters.names)
        self.busy: dict[str, int] = {}
        self.reloads: dict[str, list[float]] = {}
        self.lock = threading.RLock()  # loads and unloads, one at a time
        self.idle = threading.Condition(self.lock)  # a DELETE waits on it for the requests already using its adapter
        self.leaving: set[str] = set()  # deleted, unloaded once their last request is done
        self.on_unload = lambda: None  # the scheduler ends the workers of unloaded models
        self._evict_over_limit()

    def use(self, name: str) -> None:
        """Mark `name` as used by a request (loading it again if it was unloaded); pair with `done`."""
        with self.lock:
            if name not in self.known:
                raise LibraryError(404, f"unknown adapter {name!r}; loaded: {', '.join(self.adapters.names) or 'none'}")
            self.busy[name] = self.busy.get(name, 0) + 1
            try:
                if name not in self.adapters.adapters:
                    start = time.monotonic()
                    self._load(name, self.known[name])
                    self.reloads.setdefault(name, []).append(time.monotonic() - start)
            except BaseException:
                self.done(name)
                raise
            self.recent.move_to_end(name)

    def done(self, name: str) -> None:
        with self.lock:
            self.busy[name] -= 1
            if not self.busy[name]:  # a load that found every other adapter busy went over --max-adapters: back to it
                self.idle.notify_all()
                self._evict_over_limit()

    def add(self, name: str, path: str) -> Path:
        """`POST /adapters`: load a run folder from inside --adapter-dir under a new name."""
        if self.root is None:
            raise LibraryError(403, "runtime loading is off: start the server with --adapter-dir DIR (and an --admin-key)")
        run_dir = allowed_run_dir(self.root, path)
        with self.lock:
            if name in self.known or name in self.leaving:
                raise LibraryError(409, f"an adapter named {name!r} is already known{' (being unloaded)' * (name in self.leaving)}; "
                                        f"DELETE /adapters/{name} first or pick another name")
            self._load(name, run_dir)
            self.known[name] = run_dir
        return run_dir

    def remove(self, name: str) -> None:
        """`DELETE /adapters/NAME`: forget it at once (new requests get 404), and unload it once the requests already
        using it are answered: unloading under them took their model and tokenizer away mid-request."""
        with self.lock:
            if name not in self.known:
                raise LibraryError(404, f"unknown adapter {name!r}")
            del self.known[name]
            self.recent.pop(name, None)
            self.leaving.add(name)
            try:
                self.idle.wait_for(lambda: not self.busy.get(name))  # releases the lock while it waits
                if name in self.adapters.adapters:
                    self.adapters.remove(name)
                    self.on_unload()
            finally:
                self.leaving.discard(name)

    def _load(self, name: str, run_dir: Path) -> None:
        self.adapters.add(name, run_dir)
        self.recent[name] = None
        self.recent.move_to_end(name)
        self._evict_over_limit(keep=name)

    def _evict_over_limit(self, keep: str | None = None) -> None:
        if not self.max_adapters:
            return
        for name in list(self.recent):
            if len(self.recent) <= self.max_adapters:
                break
            if name != keep and not self.busy.get(name):
                self.adapters.remove(name)
                del self.recent[name]
                self.on_unload()

    def describe(self) -> dict:
        loaded = self.adapters.describe()
        with self.lock:
            keys = {name: self.adapters.mix_key(name) for name in loaded}
            out = {}
            for name, run_dir in self.known.items():
                info = loaded.get(name) or {"run_dir": str(run_dir), **_run_summary(run_dir)}
                # mixing needs a partner: another loaded adapter of the same base, labels and max_length
                partners = keys.get(name) is not None and sum(k == keys[name] for k in keys.values()) > 1
                out[name] = {**info, "resident": name in loaded, "mixes": partners}
            return out

    def snapshot(self) -> dict:
        with self.lock:
            return {"resident": len(self.recent), "known": len(self.known), "max_adapters": self.max_adapters,
                    "reloads": {n: {"count": len(t), "last_ms": round(1000 * t[-1], 1), "total_ms": round(1000 * sum(t), 1)}
                                for n, t in self.reloads.items()}}


def _run_summary(run_dir: Path) -> dict:
    info = read_info(run_dir)
    return {"task": info["task"], "pipeline_task": TASKS[info["task"]].pipeline_task, "method": info["method"],
            "base_model": info["base_model"], "labels": info["labels"]}
