"""Several trained adapters behind one loaded base: `peft-ft predict` (and the model side of `serve`).

Adapters are attached to a base with peft's own multi-adapter API (`load_adapter`, then
`set_adapter` per request): switching is a pointer change, not a reload. A model object has one
head class, and peft's per-adapter head copies must share one shape, so adapters are grouped by
(base model, head class, head size): each group is one base model in memory, with every adapter of
the group attached to it. Each group has its own tokenizer: a fast tokenizer keeps its truncation
setting as state, so two groups answering at once must not share one. Full (and merged) runs are
complete models: each is a group of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from peft_ft.data.files import TaskData, json_record, lines_of, parsed_json, read_delimited, read_text
from peft_ft.errors import DataError, PeftFtError
from peft_ft.models.loading import check_answer_device, quiet_transformers
from peft_ft.recipe.schema import Recipe
from peft_ft.rundir.layout import ADAPTER_CONFIG, read_info, read_recipe
from peft_ft.rundir.load import base_location, check_run_folder, load_run
from peft_ft.serving import mixed
from peft_ft.serving.combine import build_inference_combinations, parse_inference_combinations
from peft_ft.storage import unwritable, write_atomic
from peft_ft.tasks import TASKS
from peft_ft.tasks.base import Answers

NAME = re.compile(r"[A-Za-z0-9_-]+")  # used with fullmatch  # adapter names end up in URLs and peft module keys


@dataclass
class Group:
    """One model object in memory and the adapters attached to it; the lock serialises requests
    because the active adapter (and the label names the pipeline reads) is state of the model."""

    model: object
    tokenizer: object
    shared: bool  # a PeftModel with adapters to switch between (False: a full or merged run)
    lock: threading.Lock = field(default_factory=threading.Lock)
    members: set = field(default_factory=set)  # names of the adapters attached to `model`


@dataclass
class Adapter:
    name: str
    run_dir: Path
    info: dict
    recipe: Recipe
    answers: Answers
    group: Group
    pipe: object  # the answering callable over the group's model, built with this run's recipe


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    """`NAME=DIR` pairs (a bare DIR is named by its run name) -> {name: dir}, names checked."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = read_info(value).get("run_name", Path(value).name), value
        if not NAME.fullmatch(name):  # fullmatch: `$` would let a trailing newline through
            raise PeftFtError(f"--adapter {value}: name {name!r} may use only letters, digits, '_' and '-'")
        if not path.strip():  # Path("") is ".", which was then named as the folder that is no run folder
            raise PeftFtError(f"--adapter {value}: no run folder after '='; give NAME=RUN_DIR")
        if name in adapters:
            raise PeftFtError(f"--adapter {value}: the name {name!r} is given twice; give each adapter its own NAME=DIR")
        adapters[name] = path
    if not adapters:
        raise PeftFtError("no adapters: pass at least one --adapter NAME=RUN_DIR")
    return adapters


class AdapterSet:
    """Named runs loaded once, answering lists of request rows by adapter name."""

    def __init__(self, adapters: dict[str, str | Path], device: str = "cpu", batch_size: int = 32, allow_pickle: bool = False,
                 trust_remote_code: bool = False):
        """`allow_pickle` and `trust_remote_code` are the caller's say-so (command-line flags), never read
        from the folders being loaded (peft_ft.models.safety)."""
        self.device, self.batch_size, self.allow_pickle = device, batch_size, allow_pickle
        check_answer_device(device)
        for name, run_dir in adapters.items():  # every folder checked (no torch yet) before any model loads
            self._check(name, run_dir)
        quiet_transformers()
        self.trust_remote_code = trust_remote_code
        self.adapters: dict[str, Adapter] = {}
        self.groups: dict[tuple, Group] = {}
        for name, run_dir in adapters.items():
            self._add(name, run_dir)

    def add(self, name: str, run_dir: str | Path) -> Adapter:
        """Load one more run under `name` at runtime (`serve`'s POST /adapters): checked as at start, then
        onto the loaded base it shares with others when there is one."""
        self._check(name, run_dir)
        return self._add(name, run_dir)

    def _check(self, name: str, run_dir: str | Path) -> None:
        """The name, and the folder as far as it can be checked without torch (peft_ft.engine.run.check_run_folder)."""
        if not NAME.fullmatch(name):
            raise PeftFtError(f"adapter name {name!r} may use only letters, digits, '_' and '-'")
        check_run_folder(Path(run_dir), self.allow_pickle, f"adapter {name}: ")

    def _add(self, name: str, run_dir: str | Path) -> Adapter:
        """Attach a checked run folder; holds that base's lock while peft attaches the adapter."""
        if name in self.adapters:
            raise PeftFtError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        adapter = self._attach(name, Path(run_dir), self.groups)
        adapter.group.members.add(name)
        adapter.group.model.eval()
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        """Unload adapter `name` (peft's `delete_adapter`); a base left without adapters is dropped."""
        adapter = self.get(name)
        group = adapter.group
        with group.lock:
            del self.adapters[name]
            group.members.discard(name)
            if group.members and group.shared:
                if name in getattr(group.model, "active_adapters", [name]):
                    group.model.set_adapter(next(iter(group.members)), inference_mode=True)
                group.model.delete_adapter(name)
                mixed.install(group.model)  # drops the concatenated factors that held this adapter
            else:  # the last adapter of a base, or a full run: the whole model goes
                for key in [k for k, g in self.groups.items() if g is group]:
                    del self.groups[key]

    def _attach(self, name: str, run_dir: Path, groups: dict) -> Adapter:
        """Load `run_dir` with the one run-folder loader: onto the loaded base it shares with others when there is
        one (same base, head size and peft method), else on a base of its own."""
        info = read_info(run_dir)  # the folder was checked (check_run_folder) in __init__
        # load_run below makes (and reports) the remote-code decision: the command line's, never the folder's
        recipe = read_recipe(run_dir)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, trust_remote_code=self.trust_remote_code))
        task = TASKS[info["task"]]
        load = functools.partial(load_run, run_dir, self.device, self.allow_pickle, self.trust_remote_code,
                                 adapter_name=name, what=f"adapter {name}: ", checked=True)  # _check ran on it
        if not info["is_adapter"]:
            model, tokenizer, _ = load()
            group = groups[("run", str(run_dir.resolve()))] = Group(model, tokenizer, shared=False)
        else:
            kwargs = task.model_kwargs(TaskData(splits={}, labels=info["labels"]))
            key = (base_location(info), info["auto_class"], kwargs.get("num_labels"), share_key(run_dir))
            group = groups.get(key)
            if group is None:
                model, tokenizer, _ = load()
                group = groups[key] = Group(model, tokenizer, shared=True)
                mixed.install(group.model)
            else:
                with group.lock:  # a batch may be running on this base (runtime loads in `serve`)
                    load(onto=group.model)
                    mixed.install(group.model)  # LoRA layers this adapter added, where it targets new modules
        return Adapter(name, run_dir, info, recipe, task.answers, group, task.answers.build(group.model, group.tokenizer, recipe))

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def describe(self) -> dict:
        """What each adapter is, for GET /adapters and logs."""
        return {
            a.name: {"run_dir": str(a.run_dir), "task": a.info["task"], "pipeline_task": TASKS[a.info["task"]].pipeline_task,
                     "method": a.info["method"], "base_model": a.info["base_model"], "labels": a.info["labels"]}
            for a in list(self.adapters.values())  # runtime loads may add some meanwhile
        }

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise PeftFtError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters)}")
        return self.adapters[name]

    def answer(self, name: str, rows: list[dict], where: list[str] | None = None) -> list[dict]:
        """Answers of adapter `name` for request rows, in order, each saying which adapter answered and
        whether the input was cut to the run's `model.max_length` (`truncated`).
        `where` names each row for error messages (file and line, or request index)."""
        return self.run_inputs(name, self.inputs(name, rows, where))

    def inputs(self, name: str, rows: list[dict], where: list[str] | None = None) -> list:
        """Request rows as adapter `name`'s pipeline inputs (a DataError naming the row when one cannot be)."""
        adapter = self.get(name)
        where = where or [f"row {i}" for i in range(1, len(rows) + 1)]
        return [adapter.answers.to_input(row, adapter.recipe, w) for row, w in zip(rows, where)]

    def run_inputs(self, name: str, inputs: list) -> list[dict]:
        """Answer pipeline inputs with adapter `name` active. The whole call holds the group's lock:
        the active adapter, the label names and the tokenizer's truncation setting are shared state."""
        adapter = self.get(name)
        group = adapter.group
        with group.lock:
            if group.shared:
                activate(group.model, name, adapter.info["labels"])
            cut = [adapter.answers.truncated(group.tokenizer, item, adapter.recipe.model.max_length) for item in inputs]
            outputs: list = [None] * len(inputs)
            for chunk in _length_chunks(inputs, self.batch_size):
                for i, output in zip(chunk, adapter.pipe([inputs[i] for i in chunk], batch_size=len(chunk))):
                    outputs[i] = output
        return [{"adapter": name, **adapter.answers.to_answer(o), "truncated": c} for o, c in zip(outputs, cut)]

    def mix_key(self, name: str) -> tuple | None:
        """Adapters with equal keys can answer rows of one batch together (`run_mixed`); None: this one
        cannot. peft 0.21 takes per-row `adapter_names` in LoRA layers and `modules_to_save` heads
        only: IA3 ignores it silently, prompt/prefix methods and DoRA refuse it. Rows must also share
        what the pipeline reads from the model and recipe: label names (from the shared config) and
        the truncation length. NER gives each of its windows its text's adapter (`Answers.mixes`); QA windows and
        seq2seq generation do not mix."""
        adapter = self.get(name)
        config = getattr(adapter.group.model, "peft_config", {}).get(name)
        if (not adapter.group.shared or config is None or getattr(config.peft_type, "value", config.peft_type) != "LORA"
                or getattr(config, "use_dora", False) or not adapter.answers.mixes):
            return None
        return (id(adapter.group), adapter.answers, tuple(adapter.info["labels"] or ()), adapter.recipe.model.max_length)

    def run_mixed(self, names: list[str], inputs: list) -> list[dict]:
        """Answer pipeline inputs, input i with adapter names[i], in forwards that mix adapters (every
        name with the same `mix_key`). Inputs are cut into batches as in `run_inputs`; each batch is one
        pipeline call whose single forward gets its rows' adapter names."""
        first = self.get(names[0])
        group = first.group
        outputs: list = [None] * len(inputs)
        with group.lock:
            activate(group.model, first.name, first.info["labels"])  # a LoRA adapter active: peft then reads adapter_names
            cut = [first.answers.truncated(group.tokenizer, item, first.recipe.model.max_length) for item in inputs]
            for chunk in _length_chunks(inputs, self.batch_size):
                chunk_names = [names[i] for i in chunk]
                if first.answers.mixes == "argument":  # the answerer hands each of its forward rows its input's adapter
                    answered = first.pipe([inputs[i] for i in chunk], batch_size=len(chunk), adapter_names=chunk_names)
                else:
                    with _per_row_adapters(group.model, chunk_names):
                        answered = first.pipe([inputs[i] for i in chunk], batch_size=len(chunk))
                for i, output in zip(chunk, answered):
                    outputs[i] = output
        return [{"adapter": n, **first.answers.to_answer(o), "truncated": c} for n, o, c in zip(names, outputs, cut)]


@contextmanager
def _per_row_adapters(model, names: list[str]):
    """While active, every forward of `model` gets `adapter_names=names`: the stock pipelines call
    `model(**inputs)` and take no extra forward arguments. peft checks that the batch has one row per
    name (a ValueError, never a silent mix-up) and picks each row's LoRA weights and head."""
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "adapter_names": names}), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _length_chunks(inputs: list, batch_size: int):
    """Indices of `inputs` in batches for one forward each: sorted by length, at most `batch_size`, and cut
    where padding every row to the batch's longest would more than double its tokens. The pipeline pads a
    batch to its longest input: one long text must not pad 31 short ones to the model's maximum."""
    chunk, total = [], 0
    for i in sorted(range(len(inputs)), key=lambda i: _text_length(inputs[i])):
        n = max(1, _text_length(inputs[i]))
        if chunk and (len(chunk) >= batch_size or (len(chunk) + 1) * n > 2 * (total + n)):
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += n
    if chunk:
        yield chunk


def _text_length(item) -> int:
    """Characters of a pipeline input (a text, or a dict of texts): a cheap stand-in for its tokens."""
    if isinstance(item, str):
        return len(item)
    return sum(len(v) for v in item.values() if isinstance(v, str)) if isinstance(item, dict) else 0


def share_key(run_dir: Path) -> str:
    """Which adapters may share one loaded base: peft holds one method type per model (LoRA and LoHa
    cannot be combined), and PiSSA/OLoRA write their residual into the base weights as they load, so
    such an adapter gets a base of its own."""
    config = json.loads((run_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("init_lora_weights") in ("pissa", "olora") or str(config.get("init_lora_weights", "")).startswith("pissa_niter"):
        return f"own:{run_dir.resolve()}"
    return str(config.get("peft_type"))


def activate(model, name: str, labels: list[str]) -> None:
    """Make `name` the active adapter, frozen, and give the config its label names: adapters of one
    group share the base config, and the stock pipelines read label names from it."""
    if model.active_adapter != name:  # set_adapter walks every module (3 ms a batch on MiniLM, CPU): on a switch only
        model.set_adapter(name, inference_mode=True)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}


# Reading request rows: JSONL, CSV/TSV or plain text lines, from a file or stdin.

INPUT_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "text")


def read_inputs(path: str, fmt: str = "auto") -> tuple[list[dict], list[str]]:
    """Rows (dicts) and where each came from (`file: line N`). A text line becomes {"text": line}."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        text = _stdin_text()
    elif not Path(path).exists():
        raise DataError(f"{path}: input file not found")
    elif not Path(path).is_file() and not Path(path).is_fifo():  # a pipe is read as a file: `predict <(zcat rows.gz)`
        raise DataError(f"{path}: not a file (a folder or a device); give a JSONL, CSV, TSV or text file, or - for stdin")
    else:
        text = read_text(Path(path))
    chosen = _input_format(path, fmt, text)
    if path == "-" and fmt == "auto" and chosen == "text":  # stdin has no name to tell a table by: say what was assumed
        print("<stdin>: read as text lines, one text each (a CSV or TSV table: pass --format csv or --format tsv)",
              file=sys.stderr)
    try:
        return _parse_inputs(name, chosen, text)
    except DataError as e:  # say how the format was chosen, and the other one the content looks like
        raise DataError(f"{e}{_format_hint(path, fmt, chosen, text)}") from None


def _parse_inputs(name: str, fmt: str, text: str) -> tuple[list[dict], list[str]]:
    if fmt == "text":
        numbered = [(n, {"text": line}) for n, line in enumerate(lines_of(text), 1) if line.strip()]
    elif fmt == "jsonl":
        numbered = [(n, json_record(line, f"{name}: line {n}")) for n, line in enumerate(lines_of(text), 1) if line.strip()]
    elif fmt == "json":
        records = _json_records(name, text)
        return records, [f"{name}: record {n}" for n in range(1, len(records) + 1)]
    else:
        numbered = read_delimited(name, text, "," if fmt == "csv" else "\t")
    return [r for _, r in numbered], [f"{name}: line {n}" for n, _ in numbered]


def _format_hint(path: str, given: str, chosen: str, text: str) -> str:
    first = next((line for line in lines_of(text) if line.strip()), "").lstrip()
    objects = sum(1 for line in lines_of(text) if line.lstrip().startswith("{"))
    if chosen == "jsonl" and first.startswith("["):
        return " (it holds a JSON list: pass --format json, or name the file .json)"
    if chosen == "json" and objects > 1 and not first.startswith("["):
        return " (one JSON object per line is JSONL: pass --format jsonl, or name the file .jsonl)"
    if chosen == "json" and first.startswith("[") and re.match(r'\[\s*"', text.lstrip()):
        return ' (a list of plain texts: give objects, [{"text": ...}, ...], or one text per line with --format text)'
    if chosen == "jsonl" and given == "auto" and Path(path).suffix.lower() != ".jsonl":
        return " (read as JSONL as its first line opens with '{': pass --format text to read each line as a text)"
    return ""


def _json_records(name: str, text: str) -> list[dict]:
    """A JSON list of records (a training `.json` file), or of Label Studio tasks, whose `data` holds the fields
    (their task `id` kept as the answers' `id`). Read whole, not as lines: each line of it is no row."""
    records = parsed_json(text, name, document=True)
    if not isinstance(records, list):
        raise DataError(f"{name}: expected a JSON list of records ([{{\"text\": ...}}, ...]); for one record per line use JSONL")
    rows = []
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{name}: record {n}: expected a JSON object, got {type(record).__name__}")
        if isinstance(record.get("data"), dict) and "text" not in record:  # a Label Studio task
            record = {**({"id": record["id"]} if "id" in record else {}), **record["data"]}
        rows.append(record)
    return rows


def _stdin_text() -> str:
    """Standard input as UTF-8 (a byte-order mark dropped, as for files), read as bytes: the text layer would
    turn bytes that are not UTF-8 into lone surrogates under some locales, or fail in its own words."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream with no bytes under it (a program embedding peft-ft, a test)
        return sys.stdin.read().removeprefix("\ufeff")
    data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"<stdin>: line {line}: not UTF-8 ({e.reason}); send UTF-8 text") from None


def _input_format(path: str, fmt: str, text: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".tsv"):
        return suffix[1:]
    # stdin or another extension: JSON objects if the first line is one, a JSON list if the whole input is one (a
    # text line may well open with "["), else text lines
    first = next((line for line in lines_of(text) if line.strip()), "").lstrip()
    if first.startswith("{"):
        return "jsonl"
    return "json" if first.startswith("[") and _is_json_list(text) else "text"


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def route(rows: list[dict], where: list[str], names: list[str], use: str | None, field_name: str | None) -> list[str]:
    """The adapter answering each row: `use` for all, or the row's `field_name`; alone, the only one."""
    if use and field_name:
        raise PeftFtError("give either --use NAME or --adapter-field FIELD, not both")
    if use or (not field_name and len(names) == 1):
        chosen = use or names[0]
        if chosen not in names:
            raise PeftFtError(f"--use {chosen}: no adapter of that name; loaded: {', '.join(names)}")
        return [chosen] * len(rows)
    if not field_name:
        raise PeftFtError(f"{len(names)} adapters loaded ({', '.join(names)}): pick one with --use NAME, or per row with --adapter-field FIELD")
    picked = []
    for row, w in zip(rows, where):
        if field_name not in row:
            raise DataError(f"{w}: no field {field_name!r} (--adapter-field) to pick the adapter by; give every row one of: "
                            f"{', '.join(names)}")
        value = row[field_name]
        if value not in names:
            raise DataError(f"{w}: field {field_name!r} is {value!r}; expected one of the adapters: {', '.join(names)}")
        picked.append(value)
    return picked


def predict_rows(adapters: AdapterSet, rows: list[dict], where: list[str], routes: list[str]) -> list[dict]:
    """Every row answered by its adapter; rows of one adapter go together (one switch per adapter)."""
    results: list[dict] = [{} for _ in rows]
    for name in dict.fromkeys(routes):
        indices = [i for i, r in enumerate(routes) if r == name]
        answers = adapters.answer(name, [rows[i] for i in indices], [where[i] for i in indices])
        for i, a in zip(indices, answers):
            results[i] = {"row": i + 1, **({"id": rows[i]["id"]} if "id" in rows[i] else {}), **a}
    return results


def check_writable(path: Path) -> None:
    """--output must be a file (new or replaced) in an existing folder this process may write into, or a device or
    pipe it may write to (/dev/stdout). A symbolic link is judged by what it leads to: it is written through."""
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    if path.exists() and not path.is_file() and not path.is_dir():
        if not os.access(path, os.W_OK):
            raise PeftFtError(f"--output {path}: cannot write there (not writable); choose a path you can write")
        return
    folder = path.parent if str(path.parent) else Path(".")
    why = ("it is a folder" if path.is_dir() else "its folder does not exist" if not folder.exists()
           else f"its folder {unwritable(folder)}" if unwritable(folder)
           else "the file is not writable" if path.exists() and not os.access(path, os.W_OK) else None)
    if why:
        raise PeftFtError(f"--output {path}: cannot write there ({why}); choose a path in a folder you can write")


def run_predict(adapter_args: list[str], input_path: str, fmt: str, use: str | None, field_name: str | None,
                output: str | None, batch_size: int, device: str = "cpu", allow_pickle: bool = False,
                trust_remote_code: bool = False, combine: list[str] = (), how: str = "cat", density: float | None = None) -> int:
    """`peft-ft predict`: read every row (and route it) before loading any model, then answer as JSONL.
    `combine`: adapters stacked or averaged at start-up (peft_ft.serving.combine), answering under their own names."""
    specs = parse_adapter_args(adapter_args)
    combined = parse_inference_combinations(list(combine), specs, how, density)  # names known before the rows are routed
    if output:
        check_writable(Path(output))  # before any model loads: a wrong path costs no minutes
        if input_path != "-" and Path(output).is_file() and Path(input_path).is_file() and os.path.samefile(output, input_path):
            raise PeftFtError(f"--output {output}: is the input file; the answers would replace the rows. Choose another path")
    rows, where = read_inputs(input_path, fmt)
    routes = route(rows, where, [*specs, *(name for name, _ in combined)], use, field_name)
    answers = []
    if not rows:  # empty answers for empty input, as other filters give, with a word why; no model loads
        print(f"{'<stdin>' if input_path == '-' else input_path}: no rows to answer (the input is empty or blank)", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="peft-ft-combined-") as workdir:
            specs |= build_inference_combinations(combined, how, density, Path(workdir), allow_pickle)
            adapters = AdapterSet(specs, device, batch_size, allow_pickle, trust_remote_code)
            answers = predict_rows(adapters, rows, where, routes)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answers)
    if output:
        try:
            if Path(output).exists() and not Path(output).is_file():  # /dev/stdout, a named pipe: written through, in place
                with open(output, "w", encoding="utf-8") as stream:
                    stream.write(text)
            else:
                write_atomic(Path(output), text)
        except OSError as e:
            raise PeftFtError(f"--output {output}: cannot write it ({e.strerror or e}); choose a path in a folder you can write") from None
    else:
        sys.stdout.write(text)
    return len(rows)
