"""What makes a run folder travel: no path of the training machine in it, a base named so that stock
loaders find it, and the label names in a plain file.

- The base model, in `adapter_config.json` (`base_model_name_or_path`, which `peft.AutoPeftModel*`
  and `transformers.pipeline(model=DIR)` load): the embedded MiniLM by its hub id
  `sentence-transformers/all-MiniLM-L6-v2` (resolvable offline once registered in the hub cache:
  peft_ft.models.hub_cache), a hub model by its id, a local folder by its folder name only. A local folder
  is no name another machine can resolve: its card says so, and the snippets then take the folder's
  path (`PeftModel.from_pretrained(AutoModelFor...from_pretrained(PATH), DIR)`). `peft_ft.json`
  keeps the local folder's path relative to the run folder, which peft-ft's own loaders resolve
  while the two stay where they were (or move together).
- `labels.json`: the label names in id order, a plain JSON list. Not `config.json` (transformers would
  take the folder for a full model) and not a dict with string keys (transformers keeps the string
  keys of an `id2label` passed to `from_pretrained`, and its pipelines then fail on integer ids).
- `peft_ft.json` and `recipe.toml`: data files relative to the data folder, absolute paths (output
  folder, data folder, a local base) shortened to their last part in recipe.toml; peft_ft.json keeps
  the data folder's and a local base's paths relative to the run folder (`data_dir`, `base_model`), so
  tools on the same machine still find them; the run folder's own path is not recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from pathlib import Path

from peft_ft.models.hub_cache import EMBEDDED_HUB_ID
from peft_ft.models.loading import EMBEDDED_NAME
from peft_ft.recipe.dump import to_toml, toml_value
from peft_ft.recipe.load import build_recipe
from peft_ft.recipe.schema import Recipe
from peft_ft.rundir.layout import ADAPTER_CONFIG, LABELS, LOG, RECIPE, read_info_raw, with_fingerprint
from peft_ft.storage import write_atomic, write_json

SOURCES = ("embedded", "hub", "local folder")


def base_fields(recipe: Recipe, location: str, run_dir: Path) -> dict:
    """peft_ft.json's fields naming the base: `base_model` (what peft-ft loads: the embedded marker,
    a hub id, or a local folder's path relative to the run folder), `base_model_id` (the name written
    into adapter_config.json) and `base_model_source`."""
    name = recipe.model.name
    if not name:
        return {"base_model": EMBEDDED_NAME, "base_model_id": EMBEDDED_HUB_ID, "base_model_source": "embedded"}
    if Path(location).is_dir():
        folder = Path(location).resolve()
        return {"base_model": os.path.relpath(folder, run_dir.resolve()), "base_model_id": folder.name,
                "base_model_source": "local folder"}
    return {"base_model": name, "base_model_id": name, "base_model_source": "hub",
            **({"base_model_revision": recipe.model.revision} if recipe.model.revision else {})}


def finish_adapter_config(run_dir: Path, info: dict) -> None:
    """Point adapter_config.json at the base's portable name (peft wrote the path it was loaded from)."""
    path = run_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = info["base_model_id"]
    config["revision"] = info.get("base_model_revision") or None
    write_json(path, config)


def write_labels(run_dir: Path, labels: list[str]) -> Path | None:
    """labels.json: the head's label names in id order (none for QA and seq2seq)."""
    if not labels:
        return None
    path = run_dir / LABELS
    write_json(path, list(labels))
    return path


def shorten(value: str) -> str:
    """An absolute path becomes its last part; anything else stays."""
    path = Path(value).expanduser() if value else None
    return path.name if path is not None and path.is_absolute() else value


def data_sources(sources: dict[str, str], data_dir: Path | None) -> dict[str, str]:
    """Split sources (`/data/conll2003/train.txt`, `10% of /data/x.parquet`, `hub:...`) relative to the
    data folder; another absolute path keeps only its file name."""
    prefix = f"{Path(data_dir).resolve()}{os.sep}" if data_dir else None

    def portable(text: str) -> str:
        if prefix:
            text = text.replace(prefix, "")
        return re.sub(r"(?<![\w.])/\S+", lambda m: Path(m.group(0)).name, text)

    return {name: portable(source) for name, source in sources.items()}


def scrub_log(run_dir: Path, data_dir: str | None) -> None:
    """train.log of a finished run: the run folder's path becomes `.`, data files relative to the data
    folder, any other absolute path its last part."""
    path = run_dir / LOG
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    for folder in dict.fromkeys([str(run_dir.resolve()), str(run_dir)]):
        text = text.replace(folder, ".")
    text = "\n".join(data_sources({"": line}, Path(data_dir) if data_dir else None)[""] for line in text.split("\n"))
    write_atomic(path, text)


def portable_recipe(recipe: Recipe) -> Recipe:
    """The recipe with absolute paths shortened to their last part (what the card shows)."""
    d = recipe.data
    return dataclasses.replace(
        recipe,
        source=_source_name(recipe.source),
        model=dataclasses.replace(recipe.model, name=shorten(recipe.model.name)),
        data=dataclasses.replace(d, dir=shorten(d.dir), train=shorten(d.train), validation=shorten(d.validation),
                                 test=[shorten(t) for t in d.test], predict=[shorten(p) for p in d.predict]),
        output=dataclasses.replace(recipe.output, dir=shorten(recipe.output.dir)),
    )


def recipe_text(recipe: Recipe, run_dir: Path | None = None) -> str:
    """recipe.toml of a finished run: the resolved recipe (`to_toml`) made portable by `portable_toml`;
    its `# resolved from` header names the recipe relative to the working folder, else to the run folder.
    The fingerprint line is that of the values as now written."""
    text = portable_toml(to_toml(dataclasses.replace(recipe, source=_source_name(recipe.source, run_dir))))
    return with_fingerprint(text, build_recipe(tomllib.loads(text), RECIPE))


def portable_toml(text: str) -> str:
    """A resolved recipe's text with every absolute path value (a string, or strings in a list) shortened
    to its last part, and the keys that changed named in a comment under the first line (not silently:
    the values differ). Idempotent, so two texts can be compared in this form."""
    lines, changed, section = [], [], ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        key, sep, _ = line.partition(" = ")
        if sep and not line.startswith("#"):
            value = tomllib.loads(line)[key]
            short = [shorten(v) for v in value] if isinstance(value, list) else shorten(value) if isinstance(value, str) else value
            if short != value:
                changed.append(f"{section}.{key}")
                line = f"{key} = {toml_value(short)}"
        lines.append(line)
    if changed:
        lines.insert(1, f"{SHORTENED}{', '.join(changed)}")
    return "\n".join(lines) + "\n"


SHORTENED = "# absolute paths of the training machine shortened to their last part: "


def data_dir_of(run_dir: Path, info: dict) -> str | None:
    """The data folder a run was trained on, from peft_ft.json's path relative to the run folder
    (None when not recorded or no longer there)."""
    relative = info.get("data_dir")
    if not relative:
        return None
    path = (Path(run_dir) / relative).resolve()
    return str(path) if path.is_dir() else None


def moved_info(run_dir: Path, out: Path) -> dict:
    """A run folder's peft_ft.json as a folder made from it elsewhere (merge, export, combine) writes it: the
    paths kept relative to the run folder (a local base, the data folder) made relative to `out`, so that they
    still lead there, and no run folder path."""
    info = {k: v for k, v in read_info_raw(run_dir).items() if k != "run_dir"}
    moved = ["data_dir"] + (["base_model"] if info.get("base_model_source") == "local folder" else [])
    for key in moved:
        if info.get(key) and not Path(info[key]).is_absolute():
            info[key] = os.path.relpath((Path(run_dir) / info[key]).resolve(), Path(out).resolve())
    return info


def _source_name(source: str, run_dir: Path | None = None) -> str:
    path, _, note = source.partition(" [")  # "variant.toml [compare: lora, seed 42]"
    note = f" [{note}" if note else ""
    if not Path(path).is_absolute():
        return source
    try:
        return str(Path(path).relative_to(Path.cwd())) + note
    except ValueError:
        return (os.path.relpath(path, Path(run_dir).resolve()) if run_dir else Path(path).name) + note
