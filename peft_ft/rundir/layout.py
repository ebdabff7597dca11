"""The run folder's layout: every file name in it, creating it, locking it while a run works in it, its
recipe.toml's fingerprint, and reading its records back. The one owner of that layout: other modules name
these constants and call these functions rather than spelling file names out.

    <output.dir>/<name>/<timestamp>/
      recipe.toml        the resolved recipe (portable once finished) with its fingerprint
      peft_ft.json       what loaders need: task, base model, head, labels, method (INFO_KEYS), provenance
      metrics.json       every split's scores       splits.json   rows and labels per split
      labels.json        label names in id order    train.log     the run's log
      README.md          the model card             adapter_config.json + *.safetensors: peft's adapter
      predictions_*.jsonl, checkpoints/ (while training), tracking/ (train.report_to)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from peft_ft.data.files import split_summary
from peft_ft.errors import PeftFtError
from peft_ft.models.integrity import DAMAGED, read_json_object
from peft_ft.recipe.dump import to_toml
from peft_ft.recipe.load import load_recipe
from peft_ft.recipe.schema import Recipe
from peft_ft.storage import advice_for, disk_full, lock_folder, unwritable, write_json
from peft_ft.tasks import TASKS

RECIPE = "recipe.toml"
INFO = "peft_ft.json"
METRICS = "metrics.json"
SPLITS = "splits.json"
LABELS = "labels.json"
LOG = "train.log"
CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file of an adapter (and its trained heads)
CHECKPOINTS = "checkpoints"  # resumable checkpoints while training (peft_ft.engine.checkpoint writes inside)
TRACKING = "tracking"  # where each tracker writes (so a run folder carries its own curves)
log = logging.getLogger("peft_ft")
# Keys of peft_ft.json that loaders use, with their types.
INFO_KEYS = {"task": str, "is_adapter": bool, "base_model": str, "auto_class": str, "labels": list, "method": str}


def runs_parent(recipe: Recipe) -> Path:
    """`<output.dir>/<name>/`, the folder of this recipe's runs (`~` in output.dir is the user's home, as in a shell)."""
    return Path(recipe.output.dir).expanduser() / (recipe.output.name or Path(recipe.source).stem)


def check_output_place(recipe: Recipe) -> None:
    """Before anything loads: run folders can be made under output.dir (the nearest folder that exists above
    them is a folder this user can write), so a typo in output.dir fails at once, and in `validate`."""
    parent = runs_parent(recipe)
    try:
        existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    except OSError as e:  # a part of the path too long for the file system
        raise PeftFtError(f"{recipe.source}: output.dir: cannot use {parent} ({e.strerror}); choose a shorter output.dir / output.name") from None
    dangling = next((p for p in (parent, *parent.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise PeftFtError(f"{recipe.source}: output.dir: cannot make run folders under {parent} ({dangling} is a symbolic "
                          f"link that leads nowhere: a loop, or its target is missing); fix the link or set another output.dir")
    if existing is None:
        return
    why = unwritable(existing)
    if why:
        raise PeftFtError(f"{recipe.source}: output.dir: cannot make run folders under {parent} ({existing} {why}); "
                          f"set output.dir to a folder you can write")


def create_run_dir(recipe: Recipe, now: datetime.datetime | None = None) -> Path:
    """`<output.dir>/<name>/<timestamp>/`, never an existing folder: a second run started in the same second
    (a script, compare or sweep starting runs back to back) gets `<timestamp>-2`, and so on."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent = runs_parent(recipe)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            run_dir = parent / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                run_dir.mkdir()  # not exist_ok: atomic, so two processes never share a folder
                return run_dir
            except FileExistsError:
                continue
    except OSError as e:
        blocking = next((p for p in (parent, *parent.parents) if p.is_file()), None)
        why = f"{blocking} is a file" if blocking else e.strerror
        advice = advice_for(e, parent) if disk_full(e) else "set output.dir to a folder you can write"
        raise PeftFtError(f"{recipe.source}: output.dir: cannot make the run folder under {parent} ({why}); {advice}") from None
    raise PeftFtError(f"output: 999 run folders named {stamp} already exist under {parent}; set output.name")


FINGERPRINT = "# fingerprint: "
# What `--resume` lets differ from the run's recorded recipe: only a longer run (documented in README).
RAISABLE_ON_RESUME = ("train.epochs", "train.max_steps")


def fingerprint(recipe: Recipe) -> str:
    """sha256 of the resolved recipe's values (not its comments or layout)."""
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def with_fingerprint(text: str, values: Recipe) -> str:
    """A recipe.toml's text with the fingerprint line of `values` after its header comments (the first line stays
    "# resolved from ...", which tools follow back to the recipe file)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines.insert(at, f"{FINGERPRINT}{fingerprint(values)} (sha256 of the values below; --resume refuses other values)")
    return "\n".join(lines) + "\n"


def recipe_text(recipe: Recipe) -> str:
    """recipe.toml of a run in progress: every resolved value, and the fingerprint `--resume` checks
    (`peft_ft.rundir.portable.recipe_text` writes a finished run's)."""
    return with_fingerprint(to_toml(recipe), recipe)


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
        defaults = _section_defaults(now, section)
        for key, value in values.items():
            dotted, old = f"{section}.{key}", recorded.get(section, {}).get(key)
            if old == value:
                continue
            if key not in recorded.get(section, {}) and key in defaults and value == defaults[key]:
                continue  # a key newer than the run, at its default: the run started with what it does now
            if dotted in RAISABLE_ON_RESUME and isinstance(old, int) and _raised(dotted, old, value):
                continue
            changes.append(f"{dotted}: was {old!r}, now {value!r}")
    return changes


def _section_defaults(recipe: Recipe, section: str) -> dict:
    """A section's default values: every recipe section is a dataclass whose fields all have defaults."""
    return dataclasses.asdict(type(getattr(recipe, section))())


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
        self.fd = lock_folder(self.run_dir)
        if self.fd is None:
            raise PeftFtError(f"{self.run_dir}: another peft-ft process is training in this run folder (it holds its lock); "
                              f"wait for it to finish or stop it, then resume")
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


def _stale(run_dir: Path) -> list[Path]:
    """What a killed save left: hidden `.saving-*` folders (a save_pretrained cut short), `.NAME.*.tmp` files (a
    write_atomic cut short), and hidden folders in checkpoints/ (a checkpoint cut short: with full fine-tuning, a
    model and its optimizer state)."""
    found = [p for p in Path(run_dir).glob(".*") if (p.is_dir() and p.name.startswith(".saving-"))
             or (p.is_file() and p.name.endswith(".tmp"))]
    return found + [p for p in (Path(run_dir) / CHECKPOINTS).glob(".*") if p.is_dir()]


def clean_stale_saves(run_dir: Path) -> list[str]:
    """Remove what a killed save left (`_stale`) in a run folder nobody works in. Returns their paths in it."""
    removed = []
    for p in _stale(run_dir):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(run_dir)))
    return removed


def clean_stale_siblings(recipe: Recipe) -> list[str]:
    """Before a new run: the stale saves in earlier runs of the same name that no process works in."""
    parent = runs_parent(recipe)
    removed = []
    if parent.is_dir():
        for run_dir in sorted(p for p in parent.iterdir() if p.is_dir()):
            if _stale(run_dir) and not in_use(run_dir):
                removed += [f"{run_dir}/{name}" for name in clean_stale_saves(run_dir)]
    return removed


def record_splits(splits: dict, labels: list[str], run_dir: Path, sources: dict[str, str] | None = None) -> None:
    """Log every split's size and label counts and write them to <run>/splits.json. `sources`: each split's
    source as the folder may show it (relative to the data folder: no path of this machine travels with it)."""
    summary = split_summary(splits, labels)
    for name, source in (sources or {}).items():
        summary[name]["source"] = source
    for name, s in summary.items():
        counts = s.get("labels", s.get("entities", {}))
        what = "entities" if "entities" in s else "labels"
        shown = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
        log.info("%s: %d rows; %s: %s", name, s["size"], what, shown)
    write_json(run_dir / SPLITS, summary)


# --- reading a run folder back ------------------------------------------------------------------


def read_info(run_dir: str | Path) -> dict:
    """`peft_ft.json` of a run folder, checked, with a local base's relative path resolved for loading; a clear
    error when the folder is not a run folder."""
    path = Path(run_dir) / INFO
    if not path.is_file():
        what = "has adapter_config.json but" if (Path(run_dir) / ADAPTER_CONFIG).is_file() else "has"
        raise PeftFtError(
            f"{run_dir}: not a peft-ft run folder: it {what} no peft_ft.json (the task, base model and label names "
            f"are read from it). Point at a folder written by `peft-ft run` or `peft-ft merge`{_runs_inside(Path(run_dir))}."
        )
    info = check_info(path, read_json_object(path, "a run folder holds peft_ft.json"))
    if info.get("format") == "onnx":  # its weights are model.onnx: no torch loader reads it (it was asked for a base)
        raise PeftFtError(f"{run_dir}: an ONNX export (peft-ft export --onnx of {info.get('exported_from', 'a run')}): "
                          f"answer with onnxruntime (model.onnx and its tokenizer are in it); predict, serve, merge and "
                          f"export take the run folder it came from, or a merged folder")
    return resolve_base(info, Path(run_dir))


def _runs_inside(folder: Path) -> str:
    """A recipe's folder (runs/<name>/) holds its timestamped runs: name them, the newest last."""
    try:
        runs = sorted(p.name for p in folder.iterdir() if (p / INFO).is_file())
    except OSError:
        return ""
    if not runs:
        return ""
    shown = ", ".join(runs[-3:])
    return f"; it holds run folder(s) {'... ' if len(runs) > 3 else ''}{shown}: give one of them, e.g. {folder / runs[-1]}"


def resolve_base(info: dict, run_dir: Path) -> dict:
    """`info` with a local base folder's relative path resolved against the run folder (peft-ft's
    loaders take `base_model` as a loadable location)."""
    if info.get("base_model_source") == "local folder" and not Path(info["base_model"]).is_absolute():
        return {**info, "base_model": str((Path(run_dir) / info["base_model"]).resolve())}
    return info


def read_info_raw(run_dir: Path) -> dict:
    """peft_ft.json as written (read_info resolves a local base's relative path for loading)."""
    return read_json_object(Path(run_dir) / INFO, "a run folder holds peft_ft.json")


def read_metrics(run_dir: Path) -> dict:
    return read_json_object(Path(run_dir) / METRICS, "a finished run folder holds metrics.json")


def read_recipe(run_dir: Path) -> Recipe:
    """The run's own recipe.toml, validated like any recipe."""
    if not (Path(run_dir) / RECIPE).is_file():  # the recipe loader's advice (give a recipe's path) does not fit here
        raise PeftFtError(f"{run_dir}: this run folder lacks its {RECIPE} (the task settings are read from it); copy "
                          f"the whole folder again")
    return load_recipe(Path(run_dir) / RECIPE)


def finished(run_dir: Path) -> bool:
    """A run that saved its results (metrics.json is written after the weights and peft_ft.json)."""
    return (Path(run_dir) / METRICS).is_file()


def check_info(path: Path, info: dict) -> dict:
    """peft_ft.json's keys that loaders use: present, of the right type, and naming a known task family
    whose own model class is the one named (a file cannot pick an arbitrary transformers attribute)."""
    problems = [f"{k} must be {t.__name__}" for k, t in INFO_KEYS.items() if not isinstance(info.get(k), t)]
    if not problems:
        task = TASKS.get(info["task"])
        if task is None:
            problems.append(f"task {info['task']!r} is not one of {', '.join(TASKS)}")
        elif info["auto_class"] != task.auto_class:
            problems.append(f"auto_class {info['auto_class']!r} is not the {task.name} family's {task.auto_class}")
        if not all(isinstance(label, str) for label in info["labels"]):
            problems.append("labels must be a list of strings")
    if problems:
        raise PeftFtError(f"{path}: {'; '.join(problems)}; {DAMAGED}")
    return info
