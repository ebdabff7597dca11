"""Loading without pickle: the one check every loader of a run, adapter or model folder calls.

A pickle file (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`) runs code when it is loaded, so a folder that
holds one is refused unless the user says, explicitly, that they trust it (`--allow-pickle` on
predict / serve / merge, `allow_pickle=True` in Python). peft-ft itself writes only safetensors and
JSON/TOML, so its own folders never trip the check. Where transformers would fall back to
`pytorch_model.bin` by itself, the loaders also pass `use_safetensors=True` (`safetensors_only`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft_ft.errors import PeftFtError

log = logging.getLogger("peft_ft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFE_WEIGHTS = (".safetensors",)


def pickle_files(folder: str | Path) -> list[str]:
    """Names of the pickle files directly in `folder` (what transformers and peft would read)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def check_no_pickle(folder: str | Path, what: str, allow_pickle: bool = False) -> None:
    """Refuse `folder` if it holds a pickle file, saying which and why; with `allow_pickle`, warn instead."""
    found = pickle_files(folder)
    if not found:
        return
    if allow_pickle:
        log.warning("%s %s holds pickle files (%s): loading them anyway, as --allow-pickle asks", what, folder, ", ".join(found))
        return
    raise PeftFtError(
        f"{what} {folder}: refused: it holds pickle file(s) {', '.join(found)}. Loading a pickle can run any code "
        f"hidden in it, and peft-ft writes only safetensors. Convert them to .safetensors, delete them if unused, "
        f"or, if you trust where the folder came from, pass --allow-pickle (allow_pickle=True in Python)"
    )


def safetensors_only(allow_pickle: bool = False) -> dict:
    """`from_pretrained` arguments that stop transformers from falling back to pickle weights by itself."""
    return {} if allow_pickle else {"use_safetensors": True}


def remote_code(recipe, where: str = "") -> bool:
    """The recipe's `model.trust_remote_code` (off by default), with a warning when it is on."""
    on = bool(recipe.model.trust_remote_code)
    if on:
        log.warning("%smodel.trust_remote_code is on: Python code shipped with %s will run on this machine",
                    f"{where}: " if where else "", recipe.model.name or "the model")
    return on
