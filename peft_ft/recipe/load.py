"""Reading a recipe: the TOML file, `--set` overrides, every field checked against the schema, then the
recipe as a whole (keys that apply to another method or family, several fields at once, and each family's and
method's own checks, asked of their registries). Every problem is collected and raised as one `RecipeError`.

The registries are light at import (no torch), so `peft-ft validate` answers at once.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from peft_ft.errors import RecipeError
from peft_ft.methods import METHODS
from peft_ft.recipe.schema import (
    SCHEDULERS,
    SCHEDULERS_WITHOUT_KEYS,
    TRACKERS,
    Recipe,
    check_range,
    check_type,
    choice_error,
    home_of,
    section_fields,
    section_types,
    unknown_key,
)
from peft_ft.tasks import TASKS


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). The value is read as TOML; bare words stay strings."""
    if "=" not in text:
        raise RecipeError("--set", [f"--set {text}: expected key=value, for example train.lr=3e-4"])
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as model.name=bert-base-cased
    return key, value


def override_value(raw: str, value: Any, tp) -> Any:
    """A `--set` value as its field reads it: the shell has no TOML, so `output.name=2024` is the string
    "2024", `data.test=a.jsonl,b.jsonl` a list (`data.test=` the empty list) and `train.fast_kernels=False` a bool."""
    if tp is str and not isinstance(value, str):
        return raw
    if typing.get_origin(tp) is list and isinstance(value, str):
        return [_unquoted(part.strip()) for part in value.split(",")] if value else []
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _unquoted(item: str) -> str:
    """One item of a comma list as the user meant it: `a.jsonl,"b c.jsonl"` quotes the item with a space (the
    whole value is no TOML list, so TOML did not take the quotes off)."""
    return item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, dict[str, str], list[str]]:
    """`--set` values written into the raw recipe (in place). Returns it, {dotted key: the --set text} (so a
    problem names what the user typed, not the file) and the problems of the keys themselves."""
    set_by, problems = {}, []
    types = section_types()
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            home = home_of(key) if len(parts) == 1 else None
            problems.append(f"--set {text}: expected section.key, for example train.lr" + (f" (did you mean `{home}`?)" if home else ""))
            continue
        if key in set_by and set_by[key] != text:  # which one wins is no guess to leave to argument order
            problems.append(f"--set {set_by[key]} and --set {text}: two values for {key}; give it once")
            continue
        name, field_name = parts
        cls = types.get(name)
        if cls is None:
            problems.append(unknown_key(name, list(types), f"--set {text}", what="section"))
            continue
        hints = typing.get_type_hints(cls)
        if field_name in hints:
            value = override_value(text.split("=", 1)[1].strip(), value, hints[field_name])
        section = raw.setdefault(name, {})
        if isinstance(section, dict):
            section[field_name] = value
            set_by[key] = text
    return raw, set_by, problems


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides, validate everything, return a typed Recipe."""
    return build_recipe(read_recipe_file(path), str(path), overrides)


def read_recipe_file(path: str | Path) -> dict:
    """A recipe file's TOML as a dict; an unreadable file is a RecipeError naming it."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(str(path), ["is a folder, not a recipe file (give the path of a .toml recipe, e.g. "
                                      "recipes/scientsbank_lora.toml)"])
    if not path.is_file():
        raise RecipeError(str(path), ["file not found (give the path of a .toml recipe, e.g. recipes/scientsbank_lora.toml)"])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: an editor's byte-order mark is no TOML
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start}); save the recipe as UTF-8"])
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"not valid TOML: {e}"])
    except OSError as e:
        raise RecipeError(str(path), [f"cannot be read ({e.strerror}); check its permissions"])


def build_recipe(raw: dict, source: str, overrides: list[str] = ()) -> Recipe:
    raw, set_by, problems = apply_overrides(raw, overrides)
    explicit = set()
    sections = {}
    types = section_types()
    for name, value in raw.items():
        if name not in types:
            if isinstance(value, dict):
                problems.append(unknown_key(name, list(types), f"[{name}]", what="section"))
            else:  # `lr = 1e-4` above every section header
                home = home_of(name)
                hint = f"did you mean `{home}`? Write it under [{home.split('.')[0]}]" if home else \
                    f"every key belongs under a section: {', '.join(f'[{t}]' for t in types)}"
                problems.append(f"{name}: a key outside any section ({hint})")
        elif not isinstance(value, dict):
            problems.append(f"{name}: expected a [{name}] section, got {value!r}")
    for name, cls in types.items():
        values = raw.get(name, {}) if isinstance(raw.get(name, {}), dict) else {}
        sections[name] = build_section(name, cls, values, problems, set_by)
        explicit.update(f"{name}.{k}" for k in values)
    recipe = Recipe(**sections, source=source, explicit=frozenset(explicit))
    problems += [_named_as_typed(p, set_by) for p in _check_applicability(recipe) + _check_cross_field(recipe)]
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _named_as_typed(problem: str, set_by: dict[str, str]) -> str:
    """A whole-recipe problem that starts with a key given by `--set` names the --set text instead."""
    dotted = problem.split(":", 1)[0]
    return f"--set {set_by[dotted]}{problem[len(dotted):]}" if dotted in set_by else problem


def build_section(name: str, cls: type, values: dict, problems: list[str], set_by: dict[str, str] | None = None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        where = f"--set {set_by[dotted]}" if set_by and dotted in set_by else dotted
        if key not in fields:
            problems.append(unknown_key(key, list(fields), where, section=name))
            continue
        error = check_type(value, hints[key])
        if error is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            error = check_range(value, fields[key].metadata)
        if error:
            problems.append(f"{where}: {error}")
        else:
            kwargs[key] = float(value) if hints[key] is float else value
    return cls(**kwargs)


def _check_applicability(recipe: Recipe) -> list[str]:
    """A key set for another method or task family would be silently ignored: refuse it instead."""
    problems = []
    for section in section_fields():
        for f in dataclasses.fields(getattr(recipe, section.name)):
            dotted = f"{section.name}.{f.name}"
            for other, allowed in f.metadata["only"].items():
                if dotted in recipe.explicit and recipe.get(other) not in allowed:
                    problems.append(
                        f"{dotted}: applies only when {other} is {' or '.join(map(repr, allowed))} "
                        f"(it is {recipe.get(other)!r}); remove the key or change {other}"
                    )
    return problems


def _check_cross_field(recipe: Recipe) -> list[str]:
    """Checks that need the registries (task families, adapter methods) and several fields at once."""
    problems = []
    task = TASKS.get(recipe.task.type)
    if task is None:
        problems.append(choice_error("task.type", recipe.task.type, list(TASKS)))
    method = METHODS.get(recipe.adapter.method)
    if method is None:
        problems.append(choice_error("adapter.method", recipe.adapter.method, list(METHODS)))
    if not recipe.data.train:
        problems.append("data.train: required; name the training file (relative to data.dir) or hub split")
    if recipe.data.validation and recipe.data.validation_fraction:
        problems.append("data.validation_fraction: set either data.validation or data.validation_fraction, not both")
    if recipe.data.test and recipe.data.test_fraction:
        problems.append("data.test_fraction: set either data.test or data.test_fraction, not both")
    if recipe.data.validation_fraction + recipe.data.test_fraction >= 1:
        problems.append("data.test_fraction: data.validation_fraction + data.test_fraction must leave some training data (sum below 1)")
    if recipe.data.hub and recipe.data.format == "label_studio":
        problems.append("data.format: \"label_studio\" reads an exported file; remove data.hub and name the export in data.train")
    problems += _check_train(recipe)
    problems += _check_lists(recipe)
    problems += _check_text(recipe)
    problems += _check_output(recipe)
    if task is not None:
        if recipe.data.format not in ("auto", *task.formats):
            problems.append(choice_error("data.format", recipe.data.format, ["auto", *task.formats]))
        if recipe.eval.metric and recipe.eval.metric not in task.metrics:
            problems.append(choice_error("eval.metric", recipe.eval.metric, list(task.metrics)))
        if recipe.data.predict and not getattr(task, "predicts_unlabelled", False):
            problems.append(f"data.predict: the {task.name} family does not read unlabelled splits; remove data.predict")
        # Only a value other than the default: run folders made before the check hold every key at its default.
        problems += [f"{key}: the {task.name} family does not read it (it would be ignored); remove the key"
                     for key in task.unread_keys if key in recipe.explicit and recipe.get(key) != Recipe().get(key)]
        problems += task.validate(recipe)
    if method is not None:
        problems += method.validate(recipe)
    return problems


def _check_train(recipe: Recipe) -> list[str]:
    """Choices of the training engine (peft_ft.engine.accelerator) that the types alone do not catch."""
    t, problems = recipe.train, []
    if t.scheduler in SCHEDULERS_WITHOUT_KEYS:
        problems.append(f"train.scheduler: {t.scheduler!r} would run as {SCHEDULERS_WITHOUT_KEYS[t.scheduler]}: recipes have no "
                        f"key for its setting; use {SCHEDULERS_WITHOUT_KEYS[t.scheduler].split()[0]!r}")
    elif t.scheduler not in SCHEDULERS:
        problems.append(choice_error("train.scheduler", t.scheduler, list(SCHEDULERS)))
    if t.scheduler == "constant" and "train.warmup" in recipe.explicit and t.warmup:
        problems.append(f"train.warmup: {t.warmup:g} with train.scheduler \"constant\", which has no warmup; use "
                        f"\"constant_with_warmup\", or remove train.warmup")
    for name in t.report_to:
        if name not in TRACKERS:
            problems.append(choice_error("train.report_to", name, list(TRACKERS)))
    if len(set(t.report_to)) != len(t.report_to):
        problems.append("train.report_to: a tracker is named twice; name each once")
    if t.early_stopping_patience and not (recipe.data.validation or recipe.data.validation_fraction):
        problems.append("train.early_stopping_patience: needs a validation split to watch; set data.validation "
                        "(or data.validation_fraction), or remove the key")
    return problems


def _check_lists(recipe: Recipe) -> list[str]:
    """List keys hold names: an empty item (`["a", ""]`, a trailing comma in --set) or a label named twice
    would reach the data readers as a file "" or a class with two ids."""
    problems = []
    for section in section_fields():
        for f in dataclasses.fields(getattr(recipe, section.name)):
            value, dotted = getattr(getattr(recipe, section.name), f.name), f"{section.name}.{f.name}"
            if not isinstance(value, list):
                continue
            if any(not item.strip() for item in value):
                problems.append(f"{dotted}: an empty item in {value!r}; remove it")
    labels = recipe.task.labels
    twice = sorted(label for label, n in Counter(labels).items() if n > 1)  # not labels.count each: 40,000 labels took 89 s
    if twice:
        problems.append(f"task.labels: {', '.join(map(repr, twice))} listed twice; each label once, in id order")
    return problems


def _check_text(recipe: Recipe) -> list[str]:
    """Text values must be writable as UTF-8: a name with bytes that are not (a folder made on another system, read
    back by Python as lone surrogates) would stop the run when it writes recipe.toml, after training."""
    problems = []
    for section in section_fields():
        for f in dataclasses.fields(getattr(recipe, section.name)):
            value = recipe.get(f"{section.name}.{f.name}")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and _not_utf8(item):
                    shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    problems.append(f"{section.name}.{f.name}: {shown!r} holds bytes that are not UTF-8; rename that file or "
                                    f"folder (or give another path)")
    if not recipe.output.name and _not_utf8(Path(recipe.source).stem):
        problems.append("output.name: unset, so runs are named after the recipe file, whose name holds bytes that are not "
                        "UTF-8; rename the recipe, or set output.name")
    return problems


def _not_utf8(text: str) -> bool:
    """Lone surrogates: how Python reads back bytes of a file name that are not UTF-8."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _check_output(recipe: Recipe) -> list[str]:
    """output.name is one folder name under output.dir: `a/b`, `..` or `.` would put runs elsewhere (or
    above output.dir); an empty output.dir would mean the working directory without saying so."""
    problems, name = [], recipe.output.name
    if name and (name.strip() in (".", "..") or any(c in name for c in "/\\") or not name.isprintable() or name != name.strip()):
        problems.append(f"output.name: {name!r} is not a plain folder name (no / or \\, not . or .., no spaces around "
                        f"it); runs are written to <output.dir>/<output.name>/<timestamp>")
    if len(name.encode("utf-8", "surrogatepass")) > 200:  # a folder name past the file system's 255 bytes fails when the run starts
        problems.append(f"output.name: {len(name.encode('utf-8', 'surrogatepass'))} bytes long; keep it under 200")
    if "output.dir" in recipe.explicit and not recipe.output.dir.strip():
        problems.append('output.dir: empty; name the folder that holds run folders (default "runs")')
    return problems
