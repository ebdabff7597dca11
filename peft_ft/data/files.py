"""Finding and reading data files: the data directory setting, table readers, the hub path.

Every reader returns plain rows (list of dicts) and raises `DataError` naming the file (and the
row or line) on anything it cannot read. Task families turn rows into their own examples.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from peft_ft.errors import DataError
from peft_ft.recipe.schema import Recipe


@dataclass
class Split:
    name: str  # "train", "validation", "test_ua", ...
    source: str  # the file (or hub split) it came from, for messages and the model card
    examples: list[dict]


def cap_splits(splits: dict[str, "Split"], recipe: Recipe) -> None:
    """data.max_train_samples / max_eval_samples: keep the first N examples of each split.
    Splits marked `capped = False` (unlabelled predict splits: a submission answers every row) stay whole."""
    for name, split in splits.items():
        cap = recipe.data.max_train_samples if name == "train" else recipe.data.max_eval_samples
        if cap and getattr(split, "capped", True):
            split.examples = split.examples[:cap]


@dataclass
class TaskData:
    splits: dict[str, Split]  # train first, then validation, then the test splits
    labels: list[str]
    notes: list[str] = field(default_factory=list)  # what the reader dropped or converted, for the log

    @property
    def eval_names(self) -> list[str]:
        return [n for n in self.splits if n != "train"]


DATA_DIR_ENV = "PEFT_FT_DATA_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir_candidates(recipe: Recipe, cli_dir: str | None = None) -> list[tuple[Path, str]]:
    """Where to look, most specific first: --data-dir, data.dir, $PEFT_FT_DATA_DIR, ../shared/data.
    A recipe that names its folder means that folder: the environment variable is only the default."""
    if cli_dir:
        return [(Path(cli_dir), "--data-dir")]
    if recipe.data.dir:
        given = Path(recipe.data.dir).expanduser()
        if given.is_absolute():
            return [(given, "data.dir")]
        return [(Path.cwd() / given, "data.dir"), (Path(recipe.source).resolve().parent / given, "data.dir")]
    if os.environ.get(DATA_DIR_ENV):
        return [(Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}")]
    # A checkout beside shared/ just works, whether run from the repo root or from elsewhere (one entry when both
    # are the same folder: the repo root is the working folder).
    defaults = dict.fromkeys(os.path.abspath(p) for p in (Path.cwd() / "../shared/data", PROJECT_ROOT / "../shared/data"))
    return [(Path(p), "default") for p in defaults]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder above it that we may not enter: not a data folder we can use
        return False


def resolve_data_dir(recipe: Recipe, cli_dir: str | None = None) -> Path:
    candidates = data_dir_candidates(recipe, cli_dir)
    for path, _ in candidates:
        if _is_dir(path):
            return path.resolve()
    d = recipe.data
    files = [d.train, d.validation, *d.test, *d.predict]
    if not cli_dir and all(Path(f).expanduser().is_absolute() for f in files if f):
        # Every file named by its full path: no folder to look them up in is needed. The training file's folder
        # stands for it (what the run folder records, relative to itself, so the run can find them again).
        return Path(d.train).expanduser().parent
    # abspath, not resolve(): resolving a symlink loop raises instead of naming the path.
    looked = ", ".join(f"{os.path.abspath(p)} ({why})" for p, why in candidates)
    raise DataError(
        f"{recipe.source}: data directory not found; looked in {looked}. "
        f"Set data.dir in the recipe, pass --data-dir, or set ${DATA_DIR_ENV}."
    )


def resolve_file(data_dir: Path, name: str, key: str, source: str) -> Path:
    path = Path(name).expanduser()
    path = path if path.is_absolute() else data_dir / path
    try:
        if path.is_file():
            return path
        if path.is_dir():
            raise DataError(f"{source}: {key}: {path} is a folder; name a data file in it")
        if path.exists():  # reading a pipe waits for a writer; a device never ends (/dev/zero)
            raise DataError(f"{source}: {key}: {path} is a pipe, socket or device, not a file; name a data file")
        if path.is_symlink():  # a link whose target is missing, or a loop of links
            raise DataError(f"{source}: {key}: {path} is a symbolic link that leads to no file; fix the link or name the file")
        near = sorted(p.name for p in path.parent.glob("*"))[:20] if path.parent.is_dir() else []
    except OSError as e:  # a folder on the way that we may not enter
        raise DataError(f"{source}: {key}: cannot look up {path} ({e.strerror}); check the folder's permissions") from None
    hint = f" Files there: {', '.join(near)}." if near else f" Folder {path.parent} does not exist."
    raise DataError(f"{source}: {key}: file not found: {path}.{hint} Fix the name or data.dir.")


FORMATS_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def table_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() not in FORMATS_BY_SUFFIX:
        raise DataError(f"{path}: cannot tell the format from the extension; set data.format ({', '.join(FORMATS_BY_SUFFIX.values())})")
    return FORMATS_BY_SUFFIX[path.suffix.lower()]


def read_text(path: Path) -> str:
    """A text file as UTF-8; a leading byte-order mark (Excel's "CSV UTF-8" writes one) is dropped, not read as text."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
    except OSError as e:  # no permission, a folder, a link loop
        raise DataError(f"{path}: cannot read the file ({e.strerror}); check that it is a readable file") from None


def unicode_text(text: str, where: str) -> str:
    """`text`, refused when it holds a lone UTF-16 surrogate: JSON can spell one (\\ud800) but it is no character,
    and the tokenizer raises a TypeError on it deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: character {e.start} is a lone UTF-16 surrogate ({text[e.start]!r}), not text; "
                        f"send UTF-8 (a \\uD800-\\uDFFF escape must be one half of a pair)") from None
    return text


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object whose keys are unique: with a key twice, json.loads keeps the last value and drops the
    first without a word."""
    obj = dict(pairs)
    if len(obj) < len(pairs):  # a set, not keys.count per key: an object of 100,000 keys is a second, not an hour
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object; keep one")
    return obj


def _no_constant(name: str):
    """NaN and Infinity are no JSON (Python's json reads them, then writes them back as invalid JSON)."""
    raise ValueError(f"{name} is not a JSON value; write null or a number")


def _finite_float(text: str) -> float:
    """A number past float's range (1e999) would be read as infinity, and written back as invalid JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of the range of a float; write a smaller one, or a string")
    return value


def _bounded_int(text: str) -> int:
    """An integer of more digits than Python converts (sys.get_int_max_str_digits), refused in words for the sender."""
    if len(text.lstrip("-")) > INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is too long (at most {INT_DIGITS}); send it as a string")
    return int(text)


INT_DIGITS = 4300  # Python's default limit on int() of a string
LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON spells a UTF-16 surrogate (raw UTF-8 cannot hold one)


def _lone_surrogate(value, path: str = "") -> tuple[str, str] | None:
    """(path, the string) of the first string, value or key, holding a lone UTF-16 surrogate (`inputs[0].id`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the document", value
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            found = _lone_surrogate(key, f"{inner} (its name)") or _lone_surrogate(item, inner)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def strict_json(text: str | bytes):
    """json.loads, refusing (ValueError, in words) what it would take silently, or what could not be written back: a
    key twice in one object, NaN and Infinity, numbers past float's range or int's digits, lone UTF-16 surrogates."""
    value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite_float,
                       parse_int=_bounded_int)
    raw = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
    if LONE_SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape can make one: no walk for other texts
        found = _lone_surrogate(value)
        if found:
            try:
                unicode_text(found[1], f"field {found[0]!r}")
            except DataError as e:  # its words, as the ValueError of strict_json's other refusals
                raise ValueError(str(e)) from None
    return value


def parsed_json(text: str, where: str, document: bool = False):
    """strict_json, its problems a DataError naming `where` (a `document` of many lines: and the line)."""
    try:
        return strict_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {f'line {e.lineno}: ' if document else ''}not valid JSON ({e.msg})") from None
    except ValueError as e:  # from the hooks: the problem in words
        raise DataError(f"{where}: {e}") from None


def json_record(line: str, where: str) -> dict:
    """One JSONL line as a record; `where` names the file and line in the error."""
    row = parsed_json(line, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    return row


def read_table(path: Path, fmt: str = "auto") -> list[dict]:
    """Rows of a CSV / TSV / JSONL / JSON-list / parquet file, as dicts."""
    fmt = table_format(path, fmt)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose import pulls in
            # pandas (a second on every `validate`) for a single file that needs neither.
            return pq.ParquetFile(path).read().to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    text = read_text(path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, text, "," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        rows = []
        for number, line in enumerate(lines_of(text), 1):
            if line.strip():
                rows.append(json_record(line, f"{path}: line {number}"))
        return rows
    if fmt == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records; for one record per line use .jsonl")
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {number}: expected a JSON object ({{\"column\": value, ...}}), got {type(row).__name__}")
        return rows
    raise DataError(f"{path}: unknown data.format {fmt!r}; use one of {', '.join(FORMATS_BY_SUFFIX.values())}")


def lines_of(text: str) -> list[str]:
    """A file's lines, split at "\n" (a "\r" before it dropped) only: `str.splitlines` also splits at U+2028,
    U+0085, form feeds and other characters that JSON strings and texts may hold as they are."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _read_delimited(path: Path, text: str, delimiter: str) -> list[dict]:
    return [row for _, row in read_delimited(str(path), text, delimiter)]


def read_delimited(source: str, text: str, delimiter: str) -> list[tuple[int, dict]]:
    """CSV/TSV rows as (first line, dict). Every row must have the header's fields: a short row is refused, not read
    as unlabelled, because an unclosed quote makes one (it runs on to the next quote and swallows the lines between).
    A quoted field with text after its closing quote is refused too: the default reader drops the quotes silently."""
    import csv
    import io

    # The whole file is in memory already; csv's default 128 KiB field limit would refuse one long text.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    strict = _strict_error(text, delimiter)
    if strict is not None and "expected after" in strict[0]:  # `"Hello," he said` would read as `Hello, he said`
        raise DataError(f"{source}: line {strict[1]}: a quoted field has text after its closing quote (as in "
                        f"\"Hello,\" he said); quote the whole field and double the quotes inside it "
                        f"(\"\"\"Hello,\"\" he said\"), or leave the field unquoted")
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = reader.fieldnames or []
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"{source}: line 1: the header names column(s) {', '.join(map(repr, twice))} more than once; "
                        f"give every column its own name")
    rows, last = [], reader.line_num
    for row in reader:
        values = [v for v in row.values() if v is not None]
        # The row's first line: after the last row (blank lines are skipped), and a line above each line break its
        # quoted fields hold (the field an unclosed quote runs to the end of the file on also holds the last newline).
        breaks = sum(v.count("\n") for v in values if isinstance(v, str))
        first, last = max(last + 1, reader.line_num - breaks), reader.line_num
        lines = f"line {first}" if first == last else f"lines {first}-{last}"
        if None in row:  # more fields than the header has
            raise DataError(f"{source}: {lines}: more fields than the header's {len(header)}; quote a field that holds "
                            f"the {'comma' if delimiter == ',' else 'tab'}")
        if None in row.values():
            if not any(v.strip() for v in values):
                continue  # a line of spaces: as blank as an empty line
            quote = (f"; a quote opened there is not closed, so the field ran on over {last - first + 1} lines: close it, "
                     f"or double a quote inside a field (\"\")" if last > first else "")
            raise DataError(f"{source}: {lines}: {len(values)} field(s) where the header has {len(header)}{quote}")
        rows.append((first, row))
    if rows and last > first and strict is not None and "unexpected end of data" in strict[0]:
        raise DataError(f"{source}: {lines}: a quote opened on line {first} is never closed, so every line "
                        f"after it was read into one field; close it, or double a quote inside a field (\"\")")
    return rows


def _strict_error(text: str, delimiter: str) -> tuple[str, int] | None:
    """What a strict reader says of the file, and at which line: the default reader quietly drops the quotes of
    `"Hello," he said` and takes the rest of a file whose quote never closes as one field."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as e:
        return str(e), reader.line_num
    return None


def read_hub_split(recipe: Recipe, split: str) -> list[dict]:
    """A split of a hub dataset (users with internet). Offline, one clear error."""
    try:
        import datasets

        ds = datasets.load_dataset(recipe.data.hub, recipe.data.hub_config or None, split=split)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError... by version
        raise DataError(
            f"{recipe.source}: data.hub: cannot load {recipe.data.hub!r}"
            f"{' (' + recipe.data.hub_config + ')' if recipe.data.hub_config else ''} split {split!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Offline, the dataset must already be in "
            f"the Hugging Face cache ({os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')}); "
            f"otherwise download the files and point data.train/validation/test at them."
        ) from None
    return ds.to_list()


def require_columns(rows: list[dict], columns: dict[str, str], path: str):
    """`columns` maps recipe key -> column name; one error listing every missing column."""
    if not rows:
        raise DataError(f"{path}: the split is empty; check the file or the split name")
    have = list(rows[0].keys())
    missing = [f"{key} = {name!r}" for key, name in columns.items() if name and name not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the file has: {', '.join(map(str, have))}")
    # JSON records need not share keys: every row must have the columns, not only the first.
    names = [name for name in columns.values() if name]
    for number, row in enumerate(rows, 1):
        lacking = [name for name in names if name not in row]
        if lacking:
            raise DataError(f"{path}: record {number}: no {', '.join(map(repr, lacking))} (it has: {', '.join(map(str, row))}); "
                            f"every record needs the columns the recipe names (null leaves a label empty)")


ROLE_SPLITS = ("train", "validation")


def split_name(key: str, value: str, hub: bool) -> str:
    name = value if hub else Path(value).stem
    return f"{key}_{name}" if name in ROLE_SPLITS else name


def split_sources(recipe: Recipe, data_dir: Path | None) -> list[tuple[str, str, str]]:
    """(split name, recipe key, file path or hub split) for train, validation, each test split and
    each unlabelled predict split (key `data.predict[i]`).

    Test and predict splits are named by file stem (`test_ua.parquet` -> `test_ua`) or by hub split name;
    a name that is a role (`train`, `validation`) gets the key in front (`validation.json` as a test file ->
    `test_validation`), so a test file can never be taken for the split that picks the best epoch.
    """
    d = recipe.data
    entries = [("train", "data.train", d.train)]
    if d.validation:
        entries.append(("validation", "data.validation", d.validation))
    for key in ("test", "predict"):
        entries += [(split_name(key, t, bool(d.hub)), f"data.{key}[{i}]", t) for i, t in enumerate(getattr(d, key))]
    names = [name for name, _, _ in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{recipe.source}: data.test / data.predict: several splits would be named {', '.join(dupes)}; give the files distinct names")
    if d.hub:
        return [(name, key, f"{d.hub}:{value}") for name, key, value in entries]
    return [(name, key, str(resolve_file(data_dir, value, key, recipe.source))) for name, key, value in entries]


def read_split_rows(recipe: Recipe, location: str) -> list[dict]:
    if recipe.data.hub:
        return read_hub_split(recipe, location.split(":", 1)[1])
    return read_table(Path(location), recipe.data.format)


def carve_fractions(examples: list[dict], fractions: list[float], seed: int, stratify_key: str | None) -> list[list]:
    """Hold out each of `fractions` of the rows, seeded, keeping each label's share when
    `stratify_key` is set. Returns [kept, part 1, part 2, ...], each in the input order.

    Part k takes the next round(n * fraction_k) shuffled rows of every label group, so the first
    part is the same whether or not later parts are asked for. A part that rounds to no row at
    all gets one (the next shuffled row of the largest group), so a small file still gives every split."""
    import random

    rng = random.Random(seed)
    groups: dict = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex[stratify_key] if stratify_key else None, []).append(i)
    part_of: dict[int, int] = {}
    rest: dict = {}
    for key in sorted(groups, key=str):
        members = groups[key]
        rng.shuffle(members)
        start = 0
        for k, fraction in enumerate(fractions, 1):
            count = round(len(members) * fraction)
            part_of.update((i, k) for i in members[start:start + count])
            start += count
        rest[key] = members[start:]
    for k, fraction in enumerate(fractions, 1):
        largest = max(rest.values(), key=len, default=[])
        if fraction and k not in part_of.values() and len(largest) > 1:
            part_of[largest.pop(0)] = k
    parts: list[list] = [[] for _ in range(len(fractions) + 1)]
    for i, ex in enumerate(examples):
        parts[part_of.get(i, 0)].append(ex)
    return parts


def carve_validation(examples: list[dict], fraction: float, seed: int, stratify_key: str | None) -> tuple[list, list]:
    """Hold out `fraction` of the rows, seeded, keeping each label's share when `stratify_key` is set."""
    keep, held = carve_fractions(examples, [fraction], seed, stratify_key)
    return keep, held


def carve_groups(examples: list[dict], fraction: float, seed: int, group_of) -> tuple[list, list, int]:
    """Hold out whole groups of rows (a SQuAD article: every question on its paragraphs), seeded, until at
    least `fraction` of the rows are held out, so no group lands on both sides; one group always stays.
    Returns (kept, held, groups held), each list in the input order."""
    import random

    groups: dict = {}
    for i, ex in enumerate(examples):
        groups.setdefault(group_of(ex), []).append(i)
    order = sorted(groups, key=str)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    taken = 0
    for key in order[:-1]:
        if len(held) >= fraction * len(examples):
            break
        held.update(groups[key])
        taken += 1
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held], taken


def carve_splits(splits: dict, recipe: Recipe, stratify_key: str | None, unit: str) -> tuple[dict, list[str]]:
    """Carve `validation` (data.validation_fraction) and `test` (data.test_fraction) out of the
    training split, seeded by train.seed. Returns the splits in order (train, validation, test,
    the rest) and a note per carved split."""
    d, seed = recipe.data, recipe.train.seed
    wanted = {n: f for n, f in (("validation", d.validation_fraction), ("test", d.test_fraction)) if f}
    if not wanted:
        return splits, []
    train = splits["train"]
    keep, *parts = carve_fractions(train.examples, list(wanted.values()), seed, stratify_key)
    total, how = len(train.examples), f", stratified by {stratify_key}" if stratify_key else ""
    carved, notes = {}, []
    for (name, fraction), held in zip(wanted.items(), parts):
        if not held:
            raise DataError(f"{train.source}: data.{name}_fraction = {fraction} of {total} training {unit} holds out none; "
                            f"raise the fraction or add data")
        carved[name] = Split(name, f"{fraction:.0%} of {train.source}", held)
        notes.append(f"{name}: held out {len(held)} of {total} training {unit}{how} (seed {seed})")
    if not keep:
        raise DataError(f"{train.source}: the held-out fractions leave no training {unit}; lower data.validation_fraction / data.test_fraction")
    ordered = {"train": Split("train", train.source, keep)}
    for name in ("validation", "test"):
        if name in carved or name in splits:
            ordered[name] = carved.get(name) or splits[name]
    return {**ordered, **{n: s for n, s in splits.items() if n not in ordered}}, notes


def split_summary(splits: dict, labels: list[str]) -> dict:
    """Each split's source, size and label counts: classes (classification) or entities by type (NER)."""
    from collections import Counter

    summary = {}
    for name, split in splits.items():
        counts, key = Counter(), "labels"
        for e in split.examples:
            if "tags" in e:
                key = "entities"
                counts.update(labels[t][2:] for t in e["tags"] if labels[t].startswith("B-"))
            elif isinstance(e.get("label"), int) and not isinstance(e.get("label"), bool):
                counts[labels[e["label"]]] += 1
        summary[name] = {"source": split.source, "size": len(split.examples), key: dict(sorted(counts.items()))}
    return summary
