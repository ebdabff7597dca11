"""Reading tagged sentences: CoNLL-style column files, JSONL token/tag lists, and BIO checks.

Pure Python (no torch, no seqeval) so every rule here is testable on a few lines of text. A
sentence is a dict: `tokens`, `tags` (strings), `line` (where it starts) and `lines` (the line of
each token, for messages). Every problem is a `DataError` naming the file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

from peft_ft.data.files import json_record, lines_of, read_text, unicode_text
from peft_ft.errors import DataError

DOCSTART = "-DOCSTART-"
SEPARATORS = {"whitespace": None, "tab": "\t", "space": " "}  # None: str.split() on any run of whitespace


def _columns(line: str, separator: str) -> list[str]:
    return _splitter(separator)(line)


def _splitter(separator: str):
    """The function that cuts a line into its columns; no columns for a blank line. Trailing spaces, tabs and \r
    are never part of a tag."""
    sep = SEPARATORS[separator]
    if sep is None:
        return str.split  # splits at any run of whitespace and drops it at both ends, in C (the CoNLL-2003 case)
    return lambda line: [c.strip() for c in line.strip().split(sep)] if line.strip() else []


def read_conll(path: Path | str, *, token_column: int = 0, tag_column: int = -1, separator: str = "whitespace",
               comment_prefix: str = "") -> list[dict]:
    """Sentences of a column file: one token per line, a blank line between sentences.

    `-DOCSTART-` lines (CoNLL-2003 document breaks) end a sentence and are dropped. Every line of a
    file must have the same number of columns as its first token line.

    The loop is kept tight (one split per line, the sentence's lists held locally): CoNLL-2003's training file has
    300,000 lines, and `validate` reads all of them within its second.
    """
    sentences: list[dict] = []
    tokens = tags = lines = None  # the open sentence's lists; None between sentences
    width = None
    split = _splitter(separator)
    for number, line in enumerate(lines_of(read_text(Path(path))), 1):
        columns = split(line)
        if comment_prefix and columns and line.lstrip().startswith(comment_prefix) and not _token_line(line, separator, width, tag_column):
            continue
        if not columns or DOCSTART in columns:
            tokens = None
            continue
        if len(columns) != width:
            if width is not None:
                raise DataError(f"{path}: line {number}: {len(columns)} column(s) where the file's first line has {width} "
                                f"({line.strip()!r}){_blank_column(line, separator, width)}; every token line needs the same "
                                f"columns (data.separator = {separator!r})")
            width = _check_width(path, number, columns, token_column, tag_column, separator)
        if tokens is None:
            tokens, tags, lines = [], [], []
            sentences.append({"tokens": tokens, "tags": tags, "line": number, "lines": lines})
        tokens.append(columns[token_column])
        tags.append(columns[tag_column])
        lines.append(number)
    return sentences


TAG_SHAPE = re.compile(r"O|[BIES]-\S+")


def _token_line(line: str, separator: str, width: int | None, tag_column: int) -> bool:
    """A line that opens with the comment prefix but is a token line: the file's columns and a tag in the tag column
    (a tweet's `#NBA B-ORG`). Skipped as a comment, its token vanished from training and its entity from scoring."""
    columns = _columns(line, separator)
    return width is not None and len(columns) == width and TAG_SHAPE.fullmatch(columns[tag_column]) is not None


def _blank_column(line: str, separator: str, width: int) -> str:
    """A hint when the line has its columns but one is blank (an empty token), which stripping the line hid."""
    sep = SEPARATORS[separator]
    if sep is None:
        return ""
    columns = line.rstrip("\r\n").split(sep)
    return " - one of its columns is blank (an empty token or tag?)" if len(columns) == width and not all(c.strip() for c in columns) else ""


def _check_width(path: Path, number: int, columns: list[str], token_column: int, tag_column: int, separator: str) -> int:
    width = len(columns)
    hint = f"check data.separator (now {separator!r}), data.token_column and data.tag_column"
    if width < 2:
        raise DataError(f"{path}: line {number}: one column ({columns[0]!r}); a token line needs a token and a tag; {hint}")
    for key, index in (("data.token_column", token_column), ("data.tag_column", tag_column)):
        if not -width <= index < width:
            raise DataError(f"{path}: line {number}: {key} = {index} but the line has {width} columns; {hint}")
    if token_column % width == tag_column % width:
        raise DataError(f"{path}: data.token_column and data.tag_column name the same column ({token_column % width})")
    return width


def read_tagged_rows(rows: list[tuple[int, dict]], where: str, *, tokens_field: str = "tokens", tags_field: str = "tags",
                     labels: list[str] = ()) -> tuple[list[dict], int]:
    """Sentences from (line or row number, record) pairs with a token list and a tag list (JSONL
    lines, hub rows). Integer tags (a hub dataset's `ner_tags`) are looked up in `labels`
    (task.labels). Returns the sentences and how many empty records were skipped.
    """
    sentences, empty = [], 0
    for number, row in rows:
        missing = [f for f in (tokens_field, tags_field) if not isinstance(row, dict) or f not in row]
        if missing:
            have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: line {number}: no field {', '.join(map(repr, missing))} (it has: {have}); "
                            f"set data.tokens_field / data.tags_field")
        tokens, tags = row[tokens_field], row[tags_field]
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{where}: line {number}: {tokens_field!r} and {tags_field!r} must be lists")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: line {number}: {len(tokens)} tokens but {len(tags)} tags")
        if not tokens:
            empty += 1
            continue
        odd = [t for t in tokens if isinstance(t, bool) or not isinstance(t, (str, int, float))]
        if odd:
            raise DataError(f"{where}: line {number}: token {odd[0]!r} is a {type(odd[0]).__name__}; every token is a string")
        tags = [_tag_name(t, labels, where, number) for t in tags]
        tokens = [unicode_text(str(t), f"{where}: line {number}: token {i + 1}") for i, t in enumerate(tokens)]
        sentences.append({"tokens": tokens, "tags": tags, "line": number, "lines": [number] * len(tokens)})
    return sentences, empty


def read_jsonl(path: Path | str, **fields) -> tuple[list[dict], int]:
    """Sentences of a JSONL file, one record per line (see `read_tagged_rows`); blank lines are skipped."""
    rows = []
    for number, line in enumerate(lines_of(read_text(Path(path))), 1):
        if line.strip():
            rows.append((number, json_record(line, f"{path}: line {number}")))
    return read_tagged_rows(rows, str(path), **fields)


def _tag_name(tag, labels, where: str, number: int) -> str:
    if isinstance(tag, int) and not isinstance(tag, bool):
        if not labels:
            raise DataError(f"{where}: line {number}: integer tag {tag}; list the tag names in id order in task.labels")
        if not 0 <= tag < len(labels):
            raise DataError(f"{where}: line {number}: tag id {tag} is outside task.labels ({len(labels)} names)")
        return labels[tag]
    return str(tag)


# --- BIO ----------------------------------------------------------------------------------------


def check_bio_tags(sentences: list[dict], where: str) -> None:
    """Every tag is O, B-TYPE or I-TYPE; other schemes (BIOES, bare types) would be mis-scored."""
    for s in sentences:
        for tag, line in zip(s["tags"], s["lines"]):
            if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
                raise DataError(f"{where}: line {line}: tag {tag!r} is not BIO (O, B-TYPE or I-TYPE); "
                                f"convert the file to BIO tags")


def iob1_positions(tags: list[str]) -> list[int]:
    """Where an I- tag opens an entity (the IOB1 way of starting one): it does not continue an entity of its own
    type. One comprehension, no call per tag: this runs on every tag of every file that `validate` reads."""
    return [i for i, tag in enumerate(tags)
            if tag.startswith("I-") and (i == 0 or tags[i - 1] == "O" or tags[i - 1][2:] != tag[2:])]


def to_bio2(tags: list[str]) -> list[str]:
    """IOB1 -> BIO2: an I- that opens an entity becomes B-; B- between two entities stays B-."""
    opening = set(iob1_positions(tags))
    return ["B-" + tag[2:] if i in opening else tag for i, tag in enumerate(tags)]


def fix_iob1(sentences: list[dict], where: str, convert: bool) -> int:
    """Convert (in place) or refuse I- tags that open an entity; returns how many were converted."""
    converted = 0
    for s in sentences:
        positions = iob1_positions(s["tags"])
        if not positions:
            continue
        if not convert:
            i = positions[0]
            raise DataError(f"{where}: line {s['lines'][i]}: tag {s['tags'][i]!r} opens an entity (IOB1, or a broken BIO "
                            f"sequence); set task.convert_iob1 = true to convert it to B-, or fix the file")
        s["tags"] = to_bio2(s["tags"])
        converted += len(positions)
    return converted


def label_list(tags: set[str]) -> list[str]:
    """A stable order independent of the file: O, then B-/I- per entity type, types sorted.

    A type seen in training gets both its B- and I- tag, so a one-word-only type in training
    does not make a longer entity of the same type in test an error.
    """
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_known_tags(sentences: list[dict], labels: list[str], where: str, fix: str) -> None:
    known = set(labels)
    for s in sentences:
        for tag, line in zip(s["tags"], s["lines"]):
            if tag not in known:
                raise DataError(f"{where}: line {line}: tag {tag!r} {fix}")
