"""Resumable training checkpoints: `<run>/checkpoints/step-NNNNNNN/`, each written whole or not at all.

A checkpoint holds what the loop needs to continue exactly where it stopped, and nothing a user
has to unpickle: the trainable parameters (`trainable.safetensors`: the adapter and head, small),
the optimizer's tensors (`optimizer.safetensors`), the torch RNG states (`rng.safetensors`), and
`state.json` with the optimizer's param groups, the scheduler, the Python and numpy RNG states,
the position (epoch, batches done in it), the history and the name of the best epoch's checkpoint.
The data order needs no state: `train_batches` is a pure function of (seed, epoch).

Each checkpoint is written into a hidden folder and renamed into place, so a crash mid-save leaves
the previous checkpoints as they were and no half-written one that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from peft_ft.errors import PeftFtError
from peft_ft.rundir.layout import CHECKPOINTS
from peft_ft.storage import honour_umask_tree, space_for, tensor_bytes, write_json

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"
FILES = (WEIGHTS, OPTIMIZER, RNG, STATE)
METHOD = "method.safetensors"  # only for a method with state of its own (AdaLoRA's rank allocator)
DAMAGED = "remove this folder to resume from the checkpoint before it, or start a new run"


def name_of(step: int) -> str:
    return f"step-{step:07d}"


def listed(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are hidden folders and never listed; a folder
    missing one of its four files, by a hand or a failing disk, is not one either)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and all((p / f).is_file() for f in FILES))


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, method_state: tuple | None = None) -> Path:
    """Write checkpoint `step-<step>` atomically; an existing one of the same step is replaced. `method_state`:
    (tensors, JSON) the adapter method keeps outside its weights and the optimizer (Method.training_state)."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / name_of(step)
    weights = trainable_tensors(model)
    optim_tensors, optim_json = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_json = _rng_state()
    method_tensors, method_json = method_state or ({}, None)
    needed = tensor_bytes([*weights.values(), *optim_tensors.values(), *rng_tensors.values(), *method_tensors.values()])
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".saving-"))
    try:
        with space_for(root, needed, f"checkpoint {final.name}"):
            save_file(weights, str(staging / WEIGHTS))
            save_file(optim_tensors, str(staging / OPTIMIZER))
            save_file(rng_tensors, str(staging / RNG))
            if method_state is not None:
                save_file(method_tensors, str(staging / METHOD))
            write_json(staging / STATE, {**state, "step": step, "optimizer": optim_json,
                                         "scheduler": scheduler.state_dict(), "rng": rng_json,
                                         **({"method": method_json} if method_state is not None else {})})
        honour_umask_tree(staging)
        if final.exists():  # e.g. Ctrl-C on the last step of an epoch, then the epoch-end save
            old = Path(tempfile.mkdtemp(dir=root, prefix=".replaced-"))
            os.replace(final, old / final.name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load(path: Path, model, optimizer, scheduler, restore_method=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from a checkpoint; returns its state. `restore_method`
    (Method.restore_training_state) puts back the method's own state."""
    state = read_state(path, full=False)  # the loop's position: checked in full by `--resume` before
    if state.get("best") and not (Path(path).parent / state["best"] / WEIGHTS).is_file():
        raise PeftFtError(f"{path}: the best evaluation's checkpoint {state['best']} is missing beside it; put it back, "
                          f"or start a new run")
    restore_weights(model, load_weights(path))
    try:
        optimizer.load_state_dict(_unflatten_optimizer(_tensors(Path(path) / OPTIMIZER), state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(_tensors(Path(path) / RNG), state["rng"])
        if restore_method is not None:
            if not (Path(path) / METHOD).is_file() or not isinstance(state.get("method"), dict):
                raise PeftFtError(f"{path}: this checkpoint lacks {METHOD}, the adapter method's own training state "
                                  f"(written by peft-ft before it saved that state); start a new run")
            restore_method(model, _tensors(Path(path) / METHOD), state["method"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise PeftFtError(f"{path}: damaged checkpoint (the optimizer, scheduler or RNG state does not load: {e}); {DAMAGED}") from None
    return state


# state.json's keys and the types the loop reads them as
_STATE_TYPES = {"step": int, "epoch": int, "batches_done": int, "epoch_losses": list, "best": (str, type(None)),
                "result": dict, "run": dict, "optimizer": dict, "scheduler": dict, "rng": dict}


# what `load` itself restores from state.json (the loop's position is the runner's: checked by `--resume` first)
_TENSOR_STATE = {k: _STATE_TYPES[k] for k in ("optimizer", "scheduler", "rng")}


def read_state(path: Path, full: bool = True) -> dict:
    """state.json, its keys checked against the types the loop reads them as (`full`: the loop's position too,
    not only what `load` restores)."""
    try:
        state = json.loads((Path(path) / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftFtError(f"{path}: unreadable checkpoint ({e}); {DAMAGED}") from None
    problem = _state_problem(state, full)
    if not problem and full and Path(path).name != name_of(state["step"]):
        problem = f"'step' {state['step']} is not the step of its folder {Path(path).name}"
    if problem:
        raise PeftFtError(f"{path}: damaged checkpoint ({STATE}: {problem}); {DAMAGED}")
    return state


def _state_problem(state, full: bool) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    for key, kind in (_STATE_TYPES if full else _TENSOR_STATE).items():
        if key not in state:
            return f"no {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is {type(state[key]).__name__}"
    if not full:
        return None
    if state["step"] < 0 or state["epoch"] < 1 or state["batches_done"] < 0:
        return f"step {state['step']}, epoch {state['epoch']}, batches_done {state['batches_done']} out of range"
    if state["best"] is not None and (not state["best"].startswith("step-") or "/" in state["best"] or "\\" in state["best"]):
        return f"'best' {state['best']!r} names no checkpoint"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in state["epoch_losses"]):
        return "'epoch_losses' holds a non-number, NaN or inf"  # the loop stops before a non-finite loss is kept
    result = state["result"]
    if not isinstance(result.get("steps"), int) or not isinstance(result.get("history"), list):
        return "'result' lacks an integer 'steps' or a list 'history'"
    if result["steps"] != state["step"]:
        return f"'result' counts {result['steps']} steps, the checkpoint {state['step']}"
    # the schedule steps once per optimizer step (fewer where fp16 loss scaling skipped one): a position past the
    # checkpoint's step would resume with another learning rate than the straight run had
    position = state["scheduler"].get("last_epoch")
    if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position <= state["step"]:
        return f"'scheduler' is at step {position!r}, the checkpoint at {state['step']}"
    return None


def _tensors(path: Path) -> dict:
    """A safetensors file, read whole; a damaged one is named (safetensors' own error says little)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PeftFtError(f"{path.parent}: damaged checkpoint ({path.name} does not read: {e}); {DAMAGED}") from None


def load_weights(path: Path) -> dict:
    import torch

    tensors = _tensors(Path(path) / WEIGHTS)
    broken = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise PeftFtError(f"{path}: damaged checkpoint ({WEIGHTS}: NaN or inf in {', '.join(broken[:3])}); {DAMAGED}")
    return tensors


def trainable_tensors(model) -> dict:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def restore_weights(model, tensors: dict) -> None:
    """Copy saved trainable tensors into the model; names must match exactly (same recipe, same model)."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        extra, missing = sorted(set(tensors) - set(params))[:3], sorted(set(params) - set(tensors))[:3]
        raise PeftFtError(f"checkpoint does not fit the model built from the recipe (unexpected {extra}, missing {missing}); "
                          f"was the model folder or recipe.toml changed?")
    wrong = [f"{n} {tuple(tensors[n].shape)} vs {tuple(p.shape)}" for n, p in params.items() if tuple(p.shape) != tuple(tensors[n].shape)]
    if wrong:
        raise PeftFtError(f"checkpoint does not fit the model built from the recipe: {len(wrong)} tensor(s) of another shape "
                          f"(saved vs built: {'; '.join(wrong[:3])}); was adapter.r or the model folder changed? Put it back, "
                          f"or start a new run")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def prune(run_dir: Path, keep: int, protect: str | None) -> list[str]:
    """Delete all but the `keep` newest checkpoints, never `protect` (the best epoch's); returns the removed names."""
    checkpoints = listed(run_dir)
    newest = {p.name for p in checkpoints[-keep:]} if keep > 0 else set()
    removed = []
    for p in checkpoints:
        if p.name not in newest and p.name != protect:
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


# --- optimizer and RNG state as safetensors + JSON (no pickles) ---------------------------------


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """Tensors as `<param index>.<key>`; everything else (param groups, plain numbers) as JSON."""
    import torch

    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, saved: dict) -> dict:
    state: dict = {}
    for flat, value in [*tensors.items(), *saved["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    # JSON turned tuples (AdamW's betas) into lists; give them back their type.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict, dict]:
    import random

    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_rng_state(tensors: dict, saved: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
