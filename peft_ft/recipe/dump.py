"""Writing a recipe back as TOML: the resolved recipe a run folder keeps (every value written out)."""

from __future__ import annotations

import dataclasses

from peft_ft.recipe.schema import Recipe, section_fields


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe, every field written out, so a run folder says exactly what ran."""
    out = [f"# resolved from {recipe.source}"]
    for section in section_fields():
        out.append(f"\n[{section.name}]")
        for f in dataclasses.fields(getattr(recipe, section.name)):
            # Keys of other methods / task families are left out: they would not apply (and are rejected).
            if all(recipe.get(other) in allowed for other, allowed in f.metadata["only"].items()):
                out.append(f"{f.name} = {toml_value(recipe.get(section.name + '.' + f.name))}")
    return "\n".join(out) + "\n"
