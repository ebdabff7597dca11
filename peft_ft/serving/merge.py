"""`peft-ft merge`: fold an adapter and its trained head into the base, as a plain transformers folder.

The result loads with `AutoModelFor...from_pretrained(DIR)` without peft: safetensors weights, a
config with the real label names, the tokenizer. It also keeps `peft_ft.json` (is_adapter false,
`merged_from`) and `recipe.toml`, so `peft-ft predict` and `peft_ft.pipeline` take it like any run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.methods import METHODS
from peft_ft.models.integrity import read_json_object
from peft_ft.models.loading import deepspeed_unused
from peft_ft.models.safety import check_no_pickle
from peft_ft.rundir.card import merged_card
from peft_ft.rundir.layout import CARD, INFO, LABELS, RECIPE, read_info, read_recipe
from peft_ft.rundir.portable import moved_info
from peft_ft.rundir.load import check_run_folder, load_run
from peft_ft.storage import advice_for, honour_umask_tree, lock_folder, space_for, tensor_bytes, unwritable, write_atomic, write_json

log = logging.getLogger("peft_ft")


def check_mergeable(run_dir: Path, info: dict) -> None:
    """Refuse, saying why, what has no adapter weights to fold in."""
    if not info["is_adapter"]:
        if info.get("merged_from"):
            raise PeftFtError(f"{run_dir}: already merged (from {info['merged_from']}): it is a plain transformers model folder; use it as it is")
        raise PeftFtError(
            f"{run_dir}: method {info['method']!r} trained every weight and saved a complete model: the folder already is "
            f"a plain transformers model (config.json, model.safetensors, tokenizer); load it with "
            f"{info['auto_class']}.from_pretrained or copy it, there is no adapter to merge"
        )
    config = read_json_object(run_dir / "adapter_config.json", "an adapter run folder holds adapter_config.json")
    # The method's registry entry, not peft's config class: importing peft (seconds) delayed every refusal after it,
    # a missing base among them, by that much.
    method = METHODS.get(info["method"])
    if method is not None and method.prompt_learning:
        raise PeftFtError(
            f"{run_dir}: method {info['method']!r} ({config.get('peft_type', '?')}) cannot be merged: it learns virtual tokens that are "
            f"fed to the model with every input, not a change to existing weights, so there is nothing to fold into the base. "
            f"Serve it as an adapter (peft-ft predict / serve) instead"
        )


def unwrap_heads(model):
    """Heads still inside peft's `ModulesToSaveWrapper` become their trained copy: peft 0.21.2's
    LN-tuning `merge_and_unload` leaves them wrapped, and the saved folder would then name them
    `classifier.modules_to_save.default.*`, which transformers does not read (a random head on load)."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.modules_to_save[module.active_adapter])
    return model


def save_tokenizer(tokenizer, folder: Path, run_dir: Path) -> None:
    """The tokenizer of a complete model folder, holding the run's model.max_length: the base's model_max_length
    (often 1e30, "unset") would make a stock pipeline read more than the run did, or fail past the model's positions."""
    tokenizer.model_max_length = read_recipe(run_dir).model.max_length
    tokenizer.save_pretrained(folder)


def check_out(out: Path, flag: str = "--out") -> None:
    """OUT must be a new or empty folder that can be made where it is named: checked before any model loads (and
    again before the rename). The output is staged in a hidden folder beside it, then renamed into place."""
    if out.is_symlink():  # the rename would replace the link (or fail on an empty target), not fill its target
        raise PeftFtError(f"{flag} {out}: is a symbolic link; give the folder it leads to, or a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not an empty folder" if out.is_dir() else "is a file, not an empty folder"
        raise PeftFtError(f"{flag} {out}: already exists and {what}; it is kept as it is. Choose a new folder")
    if len(f".{out.name}.exporting-12345678".encode("utf-8", "surrogatepass")) > 255:  # the staging folder's name
        raise PeftFtError(f"{flag} {out}: the folder name is too long to stage the output beside it; choose a shorter name")
    parent = next((p for p in [out.absolute().parent, *out.absolute().parents] if p.exists()), None)
    why = unwritable(parent) if parent is not None else None
    if why:
        raise PeftFtError(f"{flag} {out}: cannot be made: {parent} {why}; choose a folder you can write")


STAGING_VERBS = ("merging", "exporting", "combining")  # .<out name>.<verb>-XXXXXXXX: the hidden folders staged beside OUT


@contextlib.contextmanager
def staged(out: Path, verb: str, flag: str = "--out"):
    """A hidden folder beside `out` to build the output in (one of STAGING_VERBS), renamed to `out` when the block
    ends without an error and removed when it fails. It is locked while in use, so the next command for the same
    `out` removes what a killed one left there, and never another process's work in progress."""
    for stale in _stale_stagings(out):
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed %s, left by a command that was killed", stale)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{verb}-"))
    except OSError as e:
        raise PeftFtError(f"{flag} {out}: cannot create it ({e.strerror}); {advice_for(e, out.parent)}") from None
    lock = lock_folder(staging)
    try:
        yield staging
        check_out(out, flag)  # again: something may have appeared there meanwhile
        if out.exists():
            out.rmdir()
        honour_umask_tree(staging)  # mkdtemp made it private; it is an ordinary output folder
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _stale_stagings(out: Path) -> list[Path]:
    if not out.parent.is_dir():
        return []
    prefixes = tuple(f".{out.name}.{verb}-" for verb in STAGING_VERBS)
    stale = []
    for p in out.parent.iterdir():
        if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink():
            try:
                lock = lock_folder(p)
            except OSError:  # one we cannot open (another user's, or its mode changed): not ours to remove
                continue
            if lock is not None:  # nobody builds in it now
                os.close(lock)
                stale.append(p)
    return stale


def merge_run(run_dir: str | Path, out: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Merge the adapter of a run folder into its base and save the plain model in `out` (new or empty).

    Written into a hidden folder beside `out` and renamed into place, so `out` is complete or absent.
    A run (or base) folder holding pickle files is refused unless `allow_pickle`; the base's own code runs
    only with `trust_remote_code` (peft_ft.models.safety).
    """
    run_dir, out = Path(run_dir), Path(out)
    check_no_pickle(run_dir, "run folder", allow_pickle)
    info = read_info(run_dir)
    check_out(out)
    check_mergeable(run_dir, info)  # a method that cannot merge says so before the folder's files are checked
    check_run_folder(run_dir, allow_pickle)
    model, tokenizer, info = load_run(run_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    # merge_and_unload keeps the active adapter's head (modules_to_save) as a plain module
    merged = unwrap_heads(model.merge_and_unload())
    with staged(out, "merging") as staging:
        with space_for(out.parent, tensor_bytes(merged.parameters()), "the merged model"), deepspeed_unused():
            merged.save_pretrained(staging)
            save_tokenizer(tokenizer, staging, run_dir)
        shutil.copyfile(run_dir / RECIPE, staging / RECIPE)
        if (run_dir / LABELS).is_file():
            shutil.copyfile(run_dir / LABELS, staging / LABELS)
        weights = sorted(p.name for p in staging.glob("*.safetensors"))
        # No paths of this machine: the merged folder is its own base and names its source run by name.
        merged_info = {
            **moved_info(run_dir, out), "is_adapter": False, "merged_from": run_dir.resolve().name,
            "weight_files": weights, "weight_bytes": sum((staging / w).stat().st_size for w in weights),
        }
        write_json(staging / INFO, merged_info)
        write_atomic(staging / CARD, merged_card(read_recipe(staging), merged_info, out.name))
    return out
