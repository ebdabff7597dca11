"""Reading a recipe: the TOML file, `--set` overrides, every field checked against the schema, then the
recipe as a whole (keys that apply to another method or family, several fields at once, and each family's and
method's own checks, asked of their registries). Every problem is collected and raised as one `RecipeError`.

The registries are light at import (no torch), so `peft-ft validate` answers at once.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from peft_ft.errors import RecipeError
from peft_ft.methods import METHODS
from peft_ft.recipe.schema import (
    SCHEDULERS,
    TRACKERS,
    Recipe,
    check_range,
    check_type,
    choice_error,
    section_fields,
    section_types,
    unknown_key,
)
from peft_ft.tasks import TASKS


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). The value is read as TOML; bare words stay strings."""
    if "=" not in text:
        raise RecipeError("--set", [f"{text!r}: expected key=value, for example train.lr=3e-4"])
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as model.name=bert-base-cased
    return key, value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides, validate everything, return a typed Recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found (give the path of a .toml recipe, e.g. recipes/scientsbank_lora.toml)"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: an editor's byte-order mark is no TOML
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start}); save the recipe as UTF-8"])
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"not valid TOML: {e}"])
    return build_recipe(raw, str(path), overrides)


def build_recipe(raw: dict, source: str, overrides: list[str] = ()) -> Recipe:
    problems: list[str] = []
    explicit = set()
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) != 2:
            problems.append(f"--set {key}: expected section.key, for example train.lr")
            continue
        section = raw.setdefault(parts[0], {})
        if isinstance(section, dict):
            section[parts[1]] = value
    sections = {}
    types = section_types()
    for name, value in raw.items():
        if name not in types:
            problems.append(unknown_key(name, list(types), f"[{name}]"))
        elif not isinstance(value, dict):
            problems.append(f"{name}: expected a [{name}] section, got {value!r}")
    for name, cls in types.items():
        values = raw.get(name, {}) if isinstance(raw.get(name, {}), dict) else {}
        sections[name] = build_section(name, cls, values, problems)
        explicit.update(f"{name}.{k}" for k in values)
    recipe = Recipe(**sections, source=source, explicit=frozenset(explicit))
    problems += _check_applicability(recipe)
    problems += _check_cross_field(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def build_section(name: str, cls: type, values: dict, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            problems.append(unknown_key(key, list(fields), dotted))
            continue
        error = check_type(value, hints[key])
        if error is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            error = check_range(value, fields[key].metadata)
        if error:
            problems.append(f"{dotted}: {error}")
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
    if task is not None:
        if recipe.data.format not in ("auto", *task.formats):
            problems.append(choice_error("data.format", recipe.data.format, ["auto", *task.formats]))
        if recipe.eval.metric and recipe.eval.metric not in task.metrics:
            problems.append(choice_error("eval.metric", recipe.eval.metric, list(task.metrics)))
        if recipe.data.predict and not getattr(task, "predicts_unlabelled", False):
            problems.append(f"data.predict: the {task.name} family does not read unlabelled splits; remove data.predict")
        problems += task.validate(recipe)
    if method is not None:
        problems += method.validate(recipe)
    return problems


def _check_train(recipe: Recipe) -> list[str]:
    """Choices of the training engine (peft_ft.engine.accelerator) that the types alone do not catch."""
    t, problems = recipe.train, []
    if t.scheduler not in SCHEDULERS:
        problems.append(choice_error("train.scheduler", t.scheduler, list(SCHEDULERS)))
    for name in t.report_to:
        if name not in TRACKERS:
            problems.append(choice_error("train.report_to", name, list(TRACKERS)))
    if len(set(t.report_to)) != len(t.report_to):
        problems.append("train.report_to: a tracker is named twice; name each once")
    if t.early_stopping_patience and not (recipe.data.validation or recipe.data.validation_fraction):
        problems.append("train.early_stopping_patience: needs a validation split to watch; set data.validation "
                        "(or data.validation_fraction), or remove the key")
    return problems
