"""Writing a recipe back as TOML: the resolved recipe a run folder keeps (every value written out)."""

from __future__ import annotations

import dataclasses

from peft_ft.recipe.schema import Recipe, section_fields


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _control(c: str) -> bool:
    """Characters a TOML basic string must escape (controls), and line separators other than "\\n" that a reader
    splitting lines (str.splitlines) would break a value at."""
    return c < " " or c == "\x7f" or c in "\x85\u2028\u2029"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if _control(c) else c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def comment_text(text: str) -> str:
    """`text` fit for one comment line: controls escaped, bytes that are not UTF-8 (a file name's) as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name gives (\ud800, from JSON)
        raw = text.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return toml_value(text)[1:-1]


def to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe, every field written out, so a run folder says exactly what ran."""
    out = [f"# resolved from {comment_text(recipe.source)}"]
    for section in section_fields():
        out.append(f"\n[{section.name}]")
        for f in dataclasses.fields(getattr(recipe, section.name)):
            # Keys of other methods / task families are left out: they would not apply (and are rejected). A family's
            # unread keys (Task.unread_keys) stay: at their defaults, as a loaded recipe has them, they load again.
            if all(recipe.get(other) in allowed for other, allowed in f.metadata["only"].items()):
                out.append(f"{f.name} = {toml_value(recipe.get(section.name + '.' + f.name))}")
    return "\n".join(out) + "\n"
