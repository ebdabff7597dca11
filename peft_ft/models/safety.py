"""Loading without pickle: the one check every loader of a run, adapter or model folder calls.

A pickle file (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`) runs code when it is loaded, so a folder that
holds one is refused unless the user says, explicitly, that they trust it (`--allow-pickle` on
predict / serve / merge, `allow_pickle=True` in Python). peft-ft itself writes only safetensors and
JSON/TOML, so its own folders never trip the check. Where transformers would fall back to
`pytorch_model.bin` by itself, the loaders also pass `use_safetensors=True` (`model_load_kwargs`).

Remote code (a model's own Python files, run by transformers when `trust_remote_code` is on) is
decided in one place, `remote_code`: only the person running the command can switch it on, never a
file inside a folder being loaded. Kernels downloaded from the Hub (transformers' `use_kernels`) stay off
in every model load (`model_load_kwargs`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.recipe.schema import Recipe

log = logging.getLogger("peft_ft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFE_WEIGHTS = (".safetensors",)


def pickle_files(folder: str | Path) -> list[str]:
    """Names of the pickle files directly in `folder` (what transformers and peft would read)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


ALLOW_PICKLE = "pass --allow-pickle (allow_pickle=True in Python)"
# `peft-ft run` and `validate` have no such flag: a recipe's base is converted once, where it is trusted.
CONVERT_PICKLE = ("convert the folder once, where you trust it: AutoModel.from_pretrained(FOLDER, use_safetensors=False)"
                  ".save_pretrained(NEW_FOLDER) writes model.safetensors; set model.name to NEW_FOLDER")


def check_no_pickle(folder: str | Path, what: str, allow_pickle: bool = False, escape: str = ALLOW_PICKLE) -> None:
    """Refuse `folder` if it holds a pickle file, saying which and why (`escape`: how a user who trusts it goes on);
    with `allow_pickle`, warn instead."""
    found = pickle_files(folder)
    if not found:
        return
    if allow_pickle:
        log.warning("%s %s holds pickle files (%s): loading them anyway, as --allow-pickle asks", what, folder, ", ".join(found))
        return
    raise PeftFtError(
        f"{what} {folder}: refused: it holds pickle file(s) {', '.join(found)}. Loading a pickle can run any code "
        f"hidden in it, and peft-ft writes only safetensors. Convert them to .safetensors, delete them if unused, "
        f"or, if you trust where the folder came from, {escape}"
    )


def model_load_kwargs(allow_pickle: bool = False) -> dict:
    """`from_pretrained` arguments of every model load: no falling back to pickle weights by itself, and no
    kernels from the Hub.

    transformers 5.25 turns `use_kernels` on by default (5.0-5.24: off): `from_pretrained` then swaps the forward
    of layers such as BERT's GELU for compiled kernels fetched from the Hub (kernels-community/activation, on a GPU
    in inference mode), and refuses to load where the `kernels` package is missing. Off, every transformers
    version runs the torch layers that our measurements, our fused CPU kernels and peft's wrappers were made
    against, and loading a model fetches no code.
    """
    return {"use_kernels": False, **({} if allow_pickle else {"use_safetensors": True})}


def remote_code(recipe: Recipe, command_line: bool | None = None, where: str = "") -> Recipe:
    """THE decision whether Python code shipped with a model (config `auto_map` + .py files) may run;
    every loader calls it and loads with the recipe it returns.

    `command_line` is what the person running the command said on it: `--trust-remote-code` on
    predict / serve / merge / run --resume, `trust_remote_code=True` in Python. None means the
    recipe itself came from the command line (`peft-ft run RECIPE`), so its `model.trust_remote_code`
    is that person's word. A recipe read from a folder being loaded (a run or adapter folder's
    recipe.toml) is data, not a say-so: its key is ignored (with a warning), so a copied or
    downloaded folder can never switch remote code on by itself. Returns the recipe with
    `model.trust_remote_code` set to the decision, which every `from_pretrained` then passes.
    """
    asked = bool(recipe.model.trust_remote_code)
    prefix = f"{where}: " if where else ""
    model = recipe.model.name or "the model"
    if command_line is None:
        on = asked
    else:
        on = bool(command_line)
        if asked and not on:
            log.warning("%srecipe.toml sets model.trust_remote_code = true: ignored, a loaded folder cannot turn on remote "
                        "code; if you trust the code shipped with %s, pass --trust-remote-code (trust_remote_code=True)",
                        prefix, model)
    if on:
        log.warning("%sremote code is on: Python code shipped with %s will run on this machine", prefix, model)
    if on == asked:
        return recipe
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, trust_remote_code=on))


def remote_code_refusal(error: Exception, where: str) -> PeftFtError | None:
    """transformers' refusal to run a model's own code without trust_remote_code (a ValueError), as our
    message naming the flag; None for any other error."""
    text = str(error)
    if "trust_remote_code" not in text:
        return None
    return PeftFtError(f"{where}: the model needs Python code shipped with it (its config.json has `auto_map`), and remote "
                       f"code runs only when you say so: read that code first, then pass --trust-remote-code "
                       f"(`peft-ft run` and `validate`: model.trust_remote_code = true in the recipe; trust_remote_code=True "
                       f"in Python). transformers said: {text.splitlines()[0]}")
