"""The search space of `peft-ft sweep`: a TOML file naming recipe keys with ranges or choices.

    [train]
    lr = {low = 1e-4, high = 3e-3, log = true}    # a float range (log-uniform)
    epochs = {low = 1, high = 4}                   # an integer range; {low, high, step} also works
    [adapter]
    method = ["lora", "ia3"]                       # choices
    r = [4, 8, 16, 32]                             # sampled only in trials where adapter.method is lora
    [sweep]                                        # how to search (all optional)
    seed = 0

Every key is checked against the recipe schema the way a recipe is: unknown keys, wrong types, values
out of a field's bounds and keys that are not recipe fields are collected and reported together, each
with the file and the dotted key. A key that applies only to some methods or task families (adapter.r)
is sampled only in trials where it applies. Light at import: optuna is imported where it samples.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft_ft.errors import RecipeError
from peft_ft.recipe.load import build_recipe, build_section
from peft_ft.recipe.schema import Recipe, check_range, check_type, describe_type, opt, section_types

# Keys a sweep may not vary, and why: the sweep owns them, or trials would stop being comparable.
FIXED = {
    "output": "the sweep names and places each trial's run folder itself",
    "data": "every trial must train and be judged on the same data; set data keys in the recipe",
    "task.type": "trials of different task families cannot be compared",
    "task.labels": "every trial must predict the same labels",
    "task.glue": "every trial must solve the same task",
    "eval.metric": "every trial must be judged on one metric; set eval.metric in the recipe",
}
RANGE_KEYS = ("low", "high", "log", "step")


class SpaceError(RecipeError):
    """Every problem found in one space file, reported together."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(source, problems)
        noun = "problem" if len(problems) == 1 else "problems"
        self.args = (f"{len(problems)} {noun} in the sweep space:\n  " + "\n  ".join(f"{source}: {p}" for p in problems),)


@dataclass
class SweepSection:
    sampler: Literal["tpe", "random"] = opt("tpe", "How trials pick their values: tpe (Optuna's TPE) or random.")
    seed: int = opt(0, "Seed of the sampler (each worker process derives its own from it).", min=0)
    startup_trials: int = opt(10, "TPE: trials sampled at random before TPE models the results.", min=1)
    pruner: Literal["median", "none"] = opt(
        "median", "median: stop a trial after an epoch whose validation value is below the median of earlier "
        "trials at the same epoch; none: every trial runs all its epochs.")
    pruner_startup_trials: int = opt(5, "Median pruner: finished trials needed before any trial is stopped.", min=0)
    pruner_warmup_epochs: int = opt(0, "Median pruner: epochs every trial runs before it may be stopped.", min=0)


@dataclass(frozen=True)
class Param:
    """One swept recipe key."""

    key: str
    kind: Literal["float", "int", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    only: tuple = ()  # ((other key, allowed values), ...) from the schema: where the key applies

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        picked = trial.suggest_categorical(self.key, [_as_choice(c) for c in self.choices])
        return self.from_choice(picked)

    def from_choice(self, value):
        """Optuna stores choices as plain scalars: a list choice (target_modules) travels as "a,b"."""
        if self.kind == "choice" and self.choices and isinstance(self.choices[0], list):
            return value.split(",") if value else []
        return value

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(map(str, self.choices))
        scale = ", log" if self.log else (f", step {self.step}" if self.step else "")
        return f"{self.low} .. {self.high}{scale}"


@dataclass
class Space:
    source: str
    params: list[Param]
    settings: SweepSection = field(default_factory=SweepSection)
    enqueue: list[dict] = field(default_factory=list)  # trials to run first: {key: value}

    def sample(self, trial, base: dict) -> dict:
        """Values for one trial: keys that always apply first, then the conditional ones that apply
        given those (adapter.r only when this trial's adapter.method is lora)."""
        values: dict[str, Any] = {}
        for param in sorted(self.params, key=lambda p: bool(p.only)):  # stable: file order within each group
            if all(current_value(base, values, other) in allowed for other, allowed in param.only):
                values[param.key] = param.suggest(trial)
        return values


    def probes(self, base: dict) -> list[tuple[str, Any, dict]]:
        """(key, value, trial values) for each choice and each end of each range; a key that applies only with
        another swept value (adapter.r with adapter.method) comes with the first choice of it that takes the key."""
        by_key, out = {p.key: p for p in self.params}, []
        for p in self.params:
            needs = {}
            for other, allowed in p.only:
                if current_value(base, {}, other) in allowed:
                    continue
                swept = by_key.get(other)
                enabling = [c for c in swept.choices if c in allowed] if swept and swept.kind == "choice" else []
                if not enabling:
                    break  # never applies: refused by the space check
                needs[other] = enabling[0]
            else:
                out += [(p.key, value, {**needs, p.key: value}) for value in (p.choices if p.kind == "choice" else (p.low, p.high))]
        return out


def _as_choice(value):
    return ",".join(value) if isinstance(value, list) else value


# --- building a trial's recipe ------------------------------------------------------------------


def current_value(raw: dict, values: dict, key: str):
    """A key's value in a trial: sampled, else the recipe's, else the schema default."""
    if key in values:
        return values[key]
    section, name = key.split(".", 1)
    if name in raw.get(section, {}):
        return raw[section][name]
    return getattr(section_types()[section](), name)


def trial_raw(base: dict, values: dict) -> dict:
    """The recipe's raw TOML with a trial's values set, and keys that no longer apply removed
    (adapter.r when the trial trains IA3). A trial whose method differs from the recipe's, with
    train.lr not swept, uses that method's default rate (0): the recipe's rate was tuned for its own."""
    raw = copy.deepcopy(base)
    method_before = current_value(base, {}, "adapter.method")
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    if current_value(raw, {}, "adapter.method") != method_before and "train.lr" not in values:
        raw.setdefault("train", {})["lr"] = 0.0
    for section, cls in section_types().items():
        for f in dataclasses.fields(cls):
            if f.name in raw.get(section, {}) and any(current_value(raw, {}, o) not in a for o, a in f.metadata["only"].items()):
                del raw[section][f.name]
    return raw


# --- reading and checking the space file --------------------------------------------------------


def load_space(path: str | Path, recipe: Recipe, base: dict) -> Space:
    """Read and check a space file against the recipe it sweeps (`base` is the recipe's raw TOML)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SpaceError(source, ["file not found (give the path of a .toml space file; see `peft-ft sweep --help`)"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: an editor's byte-order mark, as in recipes
    except UnicodeDecodeError as e:
        raise SpaceError(source, [f"not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"])
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(source, [f"not valid TOML: {e}"])
    problems: list[str] = []
    raw = _nest_dotted_keys(raw, problems)
    sweep_raw = raw.pop("sweep", {})
    if not isinstance(sweep_raw, dict):
        problems.append(f"sweep: expected a [sweep] section, got {sweep_raw!r}")
        sweep_raw = {}
    enqueue_raw = sweep_raw.pop("enqueue", [])
    settings = build_section("sweep", SweepSection, sweep_raw, problems)
    params = _read_params(raw, problems)
    by_key = {p.key: p for p in params}
    problems += _check_conditions(params, by_key, base)
    problems += _probe(params, recipe, base)
    enqueue = _read_enqueue(enqueue_raw, by_key, problems)
    if not params and not problems:
        problems.append("no recipe keys to sweep; name some, e.g. [train] lr = {low = 1e-4, high = 3e-3, log = true}")
    if problems:
        raise SpaceError(source, problems)
    return Space(source, params, settings, enqueue)


def _nest_dotted_keys(raw: dict, problems: list[str]) -> dict:
    """A quoted dotted key at the top ("train.lr" = [...]) is the key train.lr, as the bare train.lr = [...] is
    (TOML nests that one itself). The same key both ways is a problem: one of the two would win without a word."""
    nested: dict = {}
    for key, value in raw.items():
        section, dot, name = key.partition(".")
        if dot and section and name and isinstance(nested.get(section, {}), dict):
            entries = {name: value}
        elif isinstance(value, dict) and isinstance(nested.get(key), dict):
            section, entries = key, value
        else:
            nested[key] = value
            continue
        table = nested.setdefault(section, {})
        problems += [f"{section}.{k} is given twice (as \"{section}.{k}\" and in [{section}]); keep one" for k in entries if k in table]
        table.update(entries)
    return nested


def _read_params(raw: dict, problems: list[str]) -> list[Param]:
    types = section_types()
    params = []
    for section, values in raw.items():
        if section not in types:
            known = [*types, "sweep"]
            close = difflib.get_close_matches(section, known, n=1, cutoff=0.6)
            hint = f" (did you mean [{close[0]}]?)" if close else f" (recipe sections: {', '.join(known)})"
            problems.append(f"[{section}]: not a recipe section{hint}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a [{section}] section of keys to sweep, got {values!r}")
            continue
        fields = {f.name: f for f in dataclasses.fields(types[section])}
        hints = typing.get_type_hints(types[section])
        for name, spec in values.items():
            key = f"{section}.{name}"
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
                hint = f" (did you mean `{section}.{close[0]}`?)" if close else f" (see `peft-ft explain {section}`)"
                problems.append(f"{key}: not a recipe field{hint}")
                continue
            why = FIXED.get(key) or FIXED.get(section)
            if why:
                problems.append(f"{key}: cannot be swept: {why}")
                continue
            param = _read_param(key, spec, hints[name], fields[name].metadata, problems)
            if param is not None:
                params.append(param)
    return params


def _read_param(key: str, spec, tp, meta: dict, problems: list[str]) -> Param | None:
    only = tuple(meta["only"].items())
    if isinstance(spec, list):
        return _read_choices(key, spec, tp, meta, only, problems)
    if not isinstance(spec, dict):
        problems.append(f"{key}: expected a list of choices or a range {{low = ..., high = ...}}, got {spec!r}")
        return None
    if tp not in (int, float):
        problems.append(f"{key}: a range needs a number field; {key} is {describe_type(tp)}: give a list of choices instead")
        return None
    errors = [f"{key}.{k}: unknown range key (a range has {', '.join(RANGE_KEYS)})" for k in spec if k not in RANGE_KEYS]
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)):
        if value is None:
            errors.append(f"{key}: the range needs `{name}`")
        else:
            error = check_type(value, tp) or check_range(value, meta)
            if error:
                errors.append(f"{key}.{name}: {error}")
    if type(log) is not bool:
        errors.append(f"{key}.log: expected true or false, got {log!r}")
    if step is not None and (check_type(step, tp) or step <= 0):
        errors.append(f"{key}.step: expected a positive {'integer' if tp is int else 'number'}, got {step!r}")
    if errors:
        problems.extend(errors)
        return None
    if low >= high:
        problems.append(f"{key}: low ({low}) must be below high ({high})")
    elif log and step is not None:
        problems.append(f"{key}: a range is either log or stepped, not both; remove `log` or `step`")
    elif log and low <= 0:
        problems.append(f"{key}: a log range needs low above 0, got {low}")
    elif step is not None and step > high - low:  # 0 steps fit: every trial would draw low
        problems.append(f"{key}: step ({step:g}) is larger than high - low ({high - low:g}); only low would be drawn")
    elif step is not None and not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
        problems.append(f"{key}: high - low ({high - low:g}) must be a whole number of steps of {step}")
    else:
        kind = "int" if tp is int else "float"
        return Param(key, kind, float(low) if kind == "float" else low, float(high) if kind == "float" else high,
                     log, step, only=only)
    return None


def _read_choices(key: str, spec: list, tp, meta: dict, only: tuple, problems: list[str]) -> Param | None:
    if not spec:
        problems.append(f"{key}: the list of choices is empty")
        return None
    errors = []
    for i, value in enumerate(spec):
        error = check_type(value, tp)
        if error is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            error = check_range(value, meta)
        if error is None and isinstance(value, list) and any("," in v for v in value):
            error = "names in a list choice cannot contain commas"
        if error:
            errors.append(f"{key}[{i}]: {error}")
    if len({repr(float(v) if tp is float and _is_number(v) else v) for v in spec}) != len(spec):  # 0 and 0.0 are one rate
        errors.append(f"{key}: the choices repeat a value")
    if errors:
        problems.extend(errors)
        return None
    return Param(key, "choice", choices=tuple(float(v) if tp is float else v for v in spec), only=only)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_conditions(params: list[Param], by_key: dict[str, Param], base: dict) -> list[str]:
    """A key that applies only to some methods or families must apply in at least one trial."""
    problems = []
    for p in params:
        for other, allowed in p.only:
            swept = by_key.get(other)
            reachable = set(swept.choices) & set(allowed) if swept and swept.kind == "choice" else None
            if swept is None and current_value(base, {}, other) not in allowed:
                problems.append(f"{p.key}: applies only when {other} is {' or '.join(map(repr, allowed))}, and the recipe "
                                f"has {current_value(base, {}, other)!r} (not swept); remove {p.key} or sweep {other}")
            elif swept is not None and not reachable:
                problems.append(f"{p.key}: applies only when {other} is {' or '.join(map(repr, allowed))}, which none of "
                                f"the choices of {other} is; remove {p.key}")
    return problems


def _probe(params: list[Param], recipe: Recipe, base: dict) -> list[str]:
    """Each choice and each end of each range, set alone in the recipe, must make a valid recipe
    (an adapter method that does not exist, a method the recipe's model cannot train...)."""
    problems = []
    for p in params:
        if any(current_value(base, {}, o) not in a for o, a in p.only):
            continue  # applies only with another swept value: its type and bounds were checked above
        for value in p.choices if p.kind == "choice" else (p.low, p.high):
            try:
                build_recipe(trial_raw(base, {p.key: value}), recipe.source)
            except RecipeError as e:
                problems += [f"{p.key} = {value!r} makes the recipe invalid: {problem}" for problem in e.problems]
    return problems


def _read_enqueue(items, by_key: dict[str, Param], problems: list[str]) -> list[dict]:
    """`[sweep] enqueue = [{"train.lr" = 1e-3}, ...]`: trials run first, with these values (the rest sampled)."""
    if not isinstance(items, list):
        problems.append(f'sweep.enqueue: expected a list of tables, e.g. enqueue = [{{"train.lr" = 1e-3}}], got {items!r}')
        return []
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f'sweep.enqueue[{n}]: expected a table of swept keys, e.g. {{"train.lr" = 1e-3}}, got {item!r}')
            continue
        twice: list[str] = []
        flat = _flatten(item, twice)
        problems += [f"sweep.enqueue[{n}]: {key} is given twice (dotted and in a table); keep one" for key in twice]
        for key, value in flat.items():
            p = by_key.get(key)
            if p is None:
                problems.append(f"sweep.enqueue[{n}]: {key!r} is not a swept key ({', '.join(by_key) or 'none'})")
            elif p.kind == "choice" and value not in p.choices:
                problems.append(f"sweep.enqueue[{n}]: {key} = {value!r} is not one of its choices ({p.describe()})")
            elif p.kind != "choice" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high):
                problems.append(f"sweep.enqueue[{n}]: {key} = {value!r} is outside its range ({p.describe()})")
            elif p.kind == "int" and not isinstance(value, int):  # Optuna would warn and run another value
                problems.append(f"sweep.enqueue[{n}]: {key} = {value!r} is not an integer; its range ({p.describe()}) holds integers")
            elif p.step and not math.isclose((value - p.low) / p.step, round((value - p.low) / p.step), abs_tol=1e-9):
                problems.append(f"sweep.enqueue[{n}]: {key} = {value!r} is not on its range's steps ({p.describe()}): "
                                f"give low plus a whole number of steps")
        out.append({k: _as_choice(v) for k, v in flat.items()})
    return out


def _flatten(item: dict, twice: list[str], prefix: str = "") -> dict:
    """{"train": {"lr": 1}} and {"train.lr": 1} both become {"train.lr": 1}; a key given both ways goes to `twice`."""
    flat = {}
    for k, v in item.items():
        inner = _flatten(v, twice, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        twice += [key for key in inner if key in flat]
        flat.update(inner)
    return flat
