"""`peft-ft explain`: every recipe field with its type, default and help, read from the schema, then the
registered task families and adapter methods."""

from __future__ import annotations

import dataclasses
import typing

from peft_ft.errors import PeftFtError
from peft_ft.methods import explain_methods
from peft_ft.recipe.dump import toml_value
from peft_ft.recipe.schema import did_you_mean, home_of, homes_of, section_types, type_name, unknown_key
from peft_ft.tasks import TASKS


def explain(section: str | None = None) -> str:
    """Every field with its type, default and help, read from the dataclasses above. `section` may be a
    section (`train`, `[train]`) or one key (`train.lr`, or a name from transformers such as `learning_rate`)."""
    types = section_types()
    key = None
    if section is not None:
        asked = section
        section = section.strip().strip("[]").strip()
        if not section.strip("."):
            raise PeftFtError(f"explain {asked!r}: give a section (train), a key (train.lr), or nothing for every field")
        if section.lower() in types:
            section = section.lower()  # TRAIN is the section, not data.train's key
        elif "." not in section and home_of(section):
            section = home_of(section)  # learning_rate -> train.lr
        elif "." not in section and homes_of(section.lower()):
            return "\n\n".join(explain(home) for home in homes_of(section.lower()))  # dir: data.dir and output.dir
        section, _, key = section.partition(".")
        if section not in types:
            raise PeftFtError(f"explain {_unknown_word(section, types)}")
        fields = [f.name for f in dataclasses.fields(types[section])]
        if key and key not in fields:
            raise PeftFtError(f"explain {unknown_key(key, fields, f'{section}.{key}', section=section)}")
    lines = []
    for name, cls in types.items():
        if section and name != section:
            continue
        lines.append(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if key and f.name != key:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            only = "".join(f" (only when {k} = {' | '.join(v)})" for k, v in f.metadata["only"].items())
            lines.append(f"  {f.name} : {type_name(hints[f.name])} = {toml_value(default)}")
            lines.append(f"      {f.metadata['help']}{only}")
        lines.append("")
    if key:
        return "\n".join(lines).rstrip()
    if section in (None, "task"):
        lines.append("task.type values:")
        for t in TASKS.values():
            lines.append(f"  {t.name}: data.format {', '.join(t.formats)}; eval.metric {', '.join(t.metrics)} (default {t.default_metric})")
    if section in (None, "adapter"):
        lines.append(explain_methods())
    return "\n".join(lines)


def _unknown_word(word: str, types: dict) -> str:
    """A word that is neither a section nor a key: the closest section or key name (`tarin` -> train, `lrr` ->
    train.lr), else the sections."""
    keys = {f.name: f"{name}.{f.name}" for name, cls in types.items() for f in dataclasses.fields(cls)}
    close = did_you_mean(word, [*types, *keys])
    if close is None:
        return f"{word}: unknown section or key (sections: {', '.join(types)})"
    return f"{word}: unknown section or key (did you mean `{close if close in types else ' or '.join(homes_of(close))}`?)"
