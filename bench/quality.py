"""Quality of the adapter methods against full fine-tuning on the full data sets, with the embedded
MiniLM-L6: CoNLL-2003 (entity F1), SciEntsBank (test_ua / test_uq / test_ud accuracy and macro-F1)
and SQuAD v1.1 (EM / F1 on the held-out articles 39-48, split test_validation), with trainable
parameters, weights on disk and training time.

    python bench/quality.py --data conll scientsbank squad --methods full,lora,ia3,prompt_tuning,prefix_tuning
    python bench/quality.py --collect /work/final_runs/conll_lora /work/final_runs/conll_full ...

Training goes through `peft_ft.compare` (one subprocess per run, `--resume` semantics: a second call
skips finished runs). Every number of the table is read back from the run folders' own files
(metrics.json, peft_ft.json, recipe.toml), so `--collect` builds the same table from runs trained
elsewhere. The table is written into RESULTS.md between its own markers; the rest of the file stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common import non_negative_int, positive_int, run_main, write_smoke_inputs

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def markers(section: str) -> tuple[str, str]:
    """The lines that enclose a table section in RESULTS.md: the default one, or `--section NAME`'s own."""
    return (BEGIN, END) if not section else (f"<!-- quality:{section}:begin -->", f"<!-- quality:{section}:end -->")
METHODS = ("full", "lora", "ia3", "prompt_tuning", "prefix_tuning")  # the order of the table's rows
GOAL_POINTS, GOAL_TRAINABLE = 1.0, 2.0  # LoRA at most 1.0 point below full, with <= 2 % trainable


@dataclass
class DataSet:
    name: str
    title: str
    marker: str  # a part of the training file's path that identifies the data set
    splits: tuple[str, ...]  # the splits the table shows
    metrics: tuple[tuple[str, str], ...]  # (metrics.json key, column name)
    main: str  # the metric "vs full" and the goal are measured on
    scale: float  # metric value -> points (fractions x 100; SQuAD reports percent already)
    goal: bool  # whether the goal applies
    published: str
    smoke: tuple[str, ...] = field(default=())  # extra --set for the tiny smoke data


DATASETS = {d.name: d for d in [
    DataSet("conll", "CoNLL-2003 English NER", "conll2003/", ("test",),
            (("f1", "F1"), ("precision", "P"), ("recall", "R")), "f1", 100, True,
            "the seeds' BERT-base-cased, full fine-tuning on 1,000 training sentences: test entity F1 0.868 "
            "(another model and 1/14 of the data: for orientation only)"),
    DataSet("scientsbank", "SciEntsBank 5-way (SemEval-2013 Task 7)", "scientsbank/", ("test_ua", "test_uq", "test_ud"),
            (("accuracy", "acc"), ("macro_f1", "macro-F1")), "macro_f1", 100, True,
            "the seeds' RoBERTa-large (15x MiniLM's parameters), full fine-tuning: test_ua accuracy 0.72, macro-F1 0.63 "
            "(for orientation only)"),
    DataSet("squad", "SQuAD v1.1 extractive QA", "squad", ("test_validation",),
            (("exact_match", "EM"), ("f1", "F1")), "f1", 1, False,
            "none from the seeds. The official train set is not available offline: training uses the dev set's "
            "articles 1-38 (8,582 questions; whole articles of them held out to pick the best epoch), the reported split "
            "its articles 39-48 (1,988; named test_validation)",
            ("model.max_length=64", "task.doc_stride=16")),
]}


# --- training -----------------------------------------------------------------------------------


def shipped_lrs(data: str, methods: list[str]) -> list[str]:
    """`METHOD=LR` from the shipped recipes/<data>_<method>.toml: each method's rate as tuned there
    (compare gives a method without one its default rate)."""
    lrs = []
    for method in methods:
        path = REPO / "recipes" / f"{data}_{method}.toml"
        lr = tomllib.loads(path.read_text(encoding="utf-8")).get("train", {}).get("lr") if path.is_file() else None
        if lr:
            lrs.append(f"{method}={lr}")
    return lrs


def write_smoke_data(root: Path) -> tuple[str, str]:
    """bench/common's tiny BERT and 48-row files, plus the evaluation files the shipped recipes name
    (copies of the training files) and a tiny SQuAD in the official JSON layout."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)  # rebuilt identically, so a second --smoke call resumes
    model_dir, data_dir = write_smoke_inputs(root)
    data = Path(data_dir)
    for name in ("valid.txt", "test.txt"):
        shutil.copy(data / "conll2003" / "train.txt", data / "conll2003" / name)
    for name in ("test_ua", "test_uq", "test_ud"):
        shutil.copy(data / "scientsbank" / "train.parquet", data / "scientsbank" / f"{name}.parquet")
    (data / "squad_v1.1").mkdir()
    people = [("john", "paris"), ("mary", "london"), ("google", "paris"), ("acme", "london")]
    for name, rows in (("train", 24), ("validation", 8)):
        articles = {}
        for i in range(rows):
            who, where = people[i % len(people)]
            context = f"the plant needs water . {who} lives in {where} because it is light ."
            # Several articles: the recipe holds whole articles of train out for validation.
            articles.setdefault(f"smoke_{i % 4}", []).append(
                {"context": context, "qas": [{"id": f"{name}-{i}", "question": f"{who} lives in",
                                              "answers": [{"text": where, "answer_start": context.index(where)}]}]})
        squad = {"version": "1.1", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}
        (data / "squad_v1.1" / f"{name}.json").write_text(json.dumps(squad), encoding="utf-8")
    return model_dir, data_dir


def train_all(args, out_dir: Path) -> list[Path]:
    """One `peft_ft.compare` per data set into OUT_DIR/<data>; returns those folders."""
    from peft_ft.compare.runner import compare
    from peft_ft.compare.variants import parse_methods

    methods = parse_methods(args.methods)
    overrides = [f"train.threads={args.threads}", *([f"train.epochs={args.epochs}"] if args.epochs else []), *args.set]
    if args.smoke:
        model_dir, data_dir = write_smoke_data(out_dir / "smoke-inputs")
        overrides = [f'model.name="{model_dir}"', f'data.dir="{data_dir}"', "train.epochs=1", "train.batch_size=8",
                     "model.max_length=64", "eval.predictions=false", *overrides]
    folders = []
    for data in args.data:
        spec = DATASETS[data]
        given = {item.partition("=")[0] for item in args.lr}
        lrs = [lr for lr in shipped_lrs(data, methods) if lr.partition("=")[0] not in given] + list(args.lr)
        folder = out_dir / data
        # resume=True on every call: a first call finds the folder empty, a second skips finished runs.
        compare([str(REPO / "recipes" / f"{data}_lora.toml")], methods, lrs=lrs,
                overrides=overrides + list(spec.smoke if args.smoke else ()), out=str(folder), resume=True,
                isolate=not args.smoke)  # smoke: in this process (a subprocess per run spends seconds importing torch)
        folders.append(folder)
    return folders


# --- reading run folders ------------------------------------------------------------------------


@dataclass
class Run:
    folder: Path
    data: str
    method: str
    metrics: dict
    info: dict
    recipe: dict  # the run's resolved recipe.toml
    source: str  # the hand-written recipe it was resolved from
    overrides: list[str]  # KEY=VALUE where the run's recipe differs from its source recipe as it is now
    dropped: list[str]  # keys of the source recipe the run's recipe lacks (compare drops other methods' keys)
    compare_notes: list[str]  # "ia3, seed 42" when peft-ft compare made the variant

    @property
    def subset(self) -> str:
        d = self.recipe.get("data", {})
        parts = [f"{d[k]:,} {w}" for k, w in (("max_train_samples", "training"), ("max_eval_samples", "evaluation"))
                 if d.get(k)]
        return f"subset: first {' and '.join(parts)} examples" if parts else ""

    @property
    def trained(self) -> str:
        stamp = re.fullmatch(r"(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)\d\d", self.folder.name)
        if stamp:
            return "{}-{}-{} {}:{}".format(*stamp.groups())
        mtime = (self.folder / "metrics.json").stat().st_mtime
        return datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M")


def find_run_folders(paths: list[str]) -> list[Path]:
    """Each path is a finished run folder, or a folder holding some below it (a compare folder,
    runs/<name>): every folder with metrics.json, peft_ft.json and recipe.toml counts."""
    from peft_ft.errors import PeftFtError

    found = []
    for path in map(Path, paths):
        if not path.is_dir():  # the user's to fix: `error:` and exit 2 (run_main)
            raise PeftFtError(f"--collect {path}: not a folder")
        here = [p.parent for p in sorted(path.rglob("peft_ft.json"))
                if (p.parent / "metrics.json").is_file() and (p.parent / "recipe.toml").is_file()]
        if not here:
            raise PeftFtError(f"--collect {path}: no finished run folder (metrics.json + peft_ft.json + recipe.toml) in it")
        found += here
    return list(dict.fromkeys(found))


def flat(raw: dict) -> dict:
    return {f"{s}.{k}": v for s, values in raw.items() if isinstance(values, dict) for k, v in values.items()}


def original_source(run_text: str, folder: Path | None = None) -> tuple[str, list[str]]:
    """The hand-written recipe a run's recipe.toml comes from, following `# resolved from` headers
    (a compare run was resolved from its variant file, which was resolved from the recipe), and the
    compare notes found on the way (`ia3, seed 42`)."""
    notes = []
    header = run_text.splitlines()[0] if run_text else ""
    for _ in range(5):  # recipe -> variant file -> run: two steps; more would be a loop
        if not header.startswith("# resolved from "):
            break
        source = header.removeprefix("# resolved from ").strip()
        compare_note = re.search(r" \[compare: (.*)\]$", source)
        if compare_note:
            notes.append(compare_note.group(1))
            source = source[:compare_note.start()]
        path = _source_path(source, folder)
        header = path.read_text(encoding="utf-8").splitlines()[0] if path.is_file() else ""
    return source, notes


def _source_path(source: str, folder: Path | None) -> Path:
    """A recipe file named in a header: absolute, relative to the repo, or relative to the run folder
    (a finished run's recipe.toml keeps no absolute path: a compare variant file outside the repo is
    named relative to the run folder)."""
    path = Path(source) if Path(source).is_absolute() else REPO / source
    if path.is_file() or folder is None or path.is_absolute() and Path(source).is_absolute():
        return path
    return (folder / source) if (folder / source).is_file() else path


def recipe_differences(run_text: str, folder: Path | None = None) -> tuple[str, list[str], list[str], list[str]]:
    """(source, overrides, dropped keys, compare notes) of a run's recipe.toml against its original
    recipe file as it is now; output.* is left out (where a run is written changes nothing it learns)."""
    from peft_ft.errors import PeftFtError
    from peft_ft.recipe.dump import to_toml, toml_value
    from peft_ft.recipe.load import load_recipe
    from peft_ft.recipe.schema import section_types

    source, notes = original_source(run_text, folder)
    path = _source_path(source, folder)
    try:
        base = flat(tomllib.loads(to_toml(load_recipe(path))))
    except PeftFtError:
        return source, ["(source recipe not found or no longer valid: overrides unknown)"], [], notes
    run = flat(tomllib.loads(run_text))
    overrides = [f"{k}={toml_value(v)}" for k, v in run.items() if base.get(k, object()) != v and not k.startswith("output.")]
    # Keys the run lacks because they belong to another method; others it lacks are newer than the run.
    method_keys = {f"{section}.{f.name}" for section, cls in section_types().items() for f in dataclasses.fields(cls)
                   if "adapter.method" in f.metadata["only"]}
    dropped = [k for k in base if k not in run and k in method_keys]
    return source, overrides, dropped, notes


def read_run(folder: Path) -> Run | None:
    info = json.loads((folder / "peft_ft.json").read_text(encoding="utf-8"))
    train_file = str(info.get("data", {}).get("train", ""))
    data = next((d.name for d in DATASETS.values() if d.marker in train_file), None)
    if data is None:
        print(f"skipped {folder}: its training file {train_file} is none of {', '.join(DATASETS)}", file=sys.stderr)
        return None
    text = (folder / "recipe.toml").read_text(encoding="utf-8")
    source, overrides, dropped, notes = recipe_differences(text, folder)
    return Run(folder, data, info["method"], json.loads((folder / "metrics.json").read_text(encoding="utf-8")), info,
               tomllib.loads(text), source, overrides, dropped, notes)


def pick_runs(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """One run per (data set, method): the newest, by its folder name (a timestamp)."""
    chosen = {}
    for run in sorted(runs, key=lambda r: r.folder.name):
        key = (run.data, run.method)
        if key in chosen:
            print(f"note: {run.data} {run.method}: {run.folder} replaces the older {chosen[key].folder}", file=sys.stderr)
        chosen[key] = run
    return chosen


# --- the markdown -------------------------------------------------------------------------------


# Runs made before a recipe renamed its reported split: SQuAD's articles 39-48 were `validation` until
# recipes/squad_*.toml held out articles of train for validation and named them `test_validation`.
EARLIER_NAMES = {"test_validation": "validation"}


def value(run: Run, split: str, metric: str) -> float | None:
    if split not in run.metrics and split in EARLIER_NAMES:
        split = EARLIER_NAMES[split]
    v = run.metrics.get(split, {}).get(metric)
    return v if isinstance(v, (int, float)) else None


def metric_text(spec: DataSet, v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if spec.scale == 1 else f"{v:.4f}")


def gaps(spec: DataSet, run: Run, full: Run | None) -> list[float | None]:
    """Points of the main metric above full fine-tuning, per split."""
    if full is None:
        return [None for _ in spec.splits]
    out = []
    for split in spec.splits:
        a, b = value(run, split, spec.main), value(full, split, spec.main)
        out.append(None if a is None or b is None else (a - b) * spec.scale)
    return out


def row_cells(spec: DataSet, run: Run, full: Run | None) -> list[str]:
    from peft_ft.storage import human_size

    params, train = run.metrics["params"], run.metrics["train"]
    diffs = gaps(spec, run, full)
    vs_full = " / ".join("-" if d is None else f"{d:+.2f}" for d in diffs) if run.method != "full" else "(ref)"
    return [
        run.method + (" (subset)" if run.subset else ""),
        *[metric_text(spec, value(run, split, m)) for split in spec.splits for m, _ in spec.metrics],
        vs_full, f"{params['trainable_params']:,}", f"{params['trainable_percent']:.3f}", human_size(params["weight_bytes"]),
        lr_text(run), f"{train['epochs_run']} (best {train.get('best_epoch', '-')})",
        f"{train['seconds'] / 60:.1f} min", peak_text(train),
    ]


def peak_text(train: dict) -> str:
    """The run's peak resident memory (the whole process: training and evaluation), from metrics.json."""
    peak = train.get("peak_rss_mib")
    return f"{peak / 1024:.2f} GiB" if peak else "-"


def goal_line(spec: DataSet, rows: dict[str, Run]) -> str:
    lora, full = rows.get("lora"), rows.get("full")
    head = f"Goal: LoRA within {GOAL_POINTS:.1f} point of full fine-tuning on {dict(spec.metrics)[spec.main]} with <= {GOAL_TRAINABLE:g} % trainable"
    if lora is None or full is None:
        return f"{head}: cannot be checked here ({'no LoRA run' if lora is None else 'no full run'})."
    diffs = gaps(spec, lora, full)
    percent = lora.metrics["params"]["trainable_percent"]
    ok = all(d is not None and d >= -GOAL_POINTS for d in diffs) and percent <= GOAL_TRAINABLE
    detail = ", ".join(f"{s} {'-' if d is None else f'{d:+.2f}'} points" for s, d in zip(spec.splits, diffs))
    subset = " (on subsets, not the full data)" if lora.subset or full.subset else ""
    return f"{head}: **{'met' if ok else 'not met'}**{subset} ({detail}; LoRA trains {percent:.2f} % of the parameters)."


def command_line(run: Run) -> str:
    shown = Path(run.source).relative_to(REPO) if Path(run.source).is_relative_to(REPO) else run.source  # recipes/x.toml
    text = f"peft-ft run {shown}" + "".join(f" --set {shlex.quote(o)}" for o in run.overrides if not o.startswith("("))
    notes = [o.strip("()") for o in run.overrides if o.startswith("(")]
    if run.dropped:
        notes.append(f"keys of the source left out for this method: {', '.join(run.dropped)}")
    notes += [f"trained by peft-ft compare ({n})" for n in run.compare_notes]
    return f"`{text}`" + (f" ({'; '.join(notes)})" if notes else "")


def lr_text(run: Run) -> str:
    from peft_ft.methods import METHODS as ADAPTER_METHODS

    lr = run.recipe.get("train", {}).get("lr")
    if lr:
        return f"{lr:g}"
    method = ADAPTER_METHODS.get(run.method)
    return f"{method.default_lr:g} (default)" if method else "default"


def method_order(method: str) -> tuple[int, str]:
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def table_markdown(spec: DataSet, rows: dict[str, Run]) -> str:
    metric_columns = [f"{split} {label}" for split in spec.splits for _, label in spec.metrics]
    main_label = dict(spec.metrics)[spec.main]
    vs_full = f"vs full ({main_label} points{': ' + ' / '.join(s.removeprefix('test_') for s in spec.splits) if len(spec.splits) > 1 else ''})"
    header = ["method", *metric_columns, vs_full, "trainable", "trainable %", "weights on disk", "lr", "epochs", "train time", "peak RSS"]
    lines = [f"### {spec.title}", ""]
    subsets = sorted({r.subset for r in rows.values() if r.subset})
    if subsets:
        lines += [f"**Subset runs, not the full-data benchmark** ({'; '.join(subsets)}).", ""]
    lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for method in sorted(set(METHODS) | set(rows), key=method_order):
        if method in rows:
            lines.append("| " + " | ".join(row_cells(spec, rows[method], rows.get("full"))) + " |")
        else:
            lines.append(f"| {method} | not run |" + " |" * (len(header) - 2))
    lines += [""]
    if spec.goal:
        lines += [f"- {goal_line(spec, rows)}"]
    lines += [f"- Published for orientation: {spec.published}."]
    for method, run in sorted(rows.items(), key=lambda item: method_order(item[0])):
        threads = run.recipe.get("train", {}).get("threads")
        lines.append(f"- {method}: `{run.folder}` (trained {run.trained}, {threads or 'all'} torch thread(s), "
                     f"peft-ft {run.info.get('peft_ft_version', '?')}): {command_line(run)}")
    return "\n".join(lines) + "\n"


def machine_text(threads: str) -> str:
    """CPU, cores, threads and versions, without importing torch or peft (--collect stays quick;
    bench/common's `machine_line` imports them)."""
    import os
    import platform
    from importlib.metadata import version

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else None
    packages = ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "peft-ft"))
    return (f"{cpu.group(1) if cpu else platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s) per run; "
            f"{packages}; python {platform.python_version()}")


def section_markdown(chosen: dict[tuple[str, str], Run], data_sets: list[str], command: str, left_out: str,
                     section: str = "") -> str:
    begin, end = markers(section)
    threads = sorted({str(r.recipe.get("train", {}).get("threads") or "all") for r in chosen.values()}) or ["-"]
    machine = machine_text("/".join(threads))
    models = sorted({r.info.get("base_model", "?") for r in chosen.values()}) or ["-"]
    lines = [
        begin,
        "## Quality: full fine-tuning vs adapter methods" + (f" ({section})" if section else ""),
        "",
        f"Base model: {', '.join(models)}.",
        f"Table built {datetime.date.today().isoformat()} with `{command}`, from the run folders named under each table "
        "(their metrics.json, peft_ft.json and recipe.toml; nothing is retyped).",
        f"Machine: {machine}. The run folders do not record their machine: this is the one that built the table.",
        "",
        "- metrics: each test split of the run (SQuAD: test_validation, articles 39-48; `validation` in runs made before "
        "2026-12-01), from the best epoch's weights "
        "(the epoch with the best validation metric); fractions, except SQuAD's EM/F1 in percent",
        "- vs full: the method's main metric minus full fine-tuning's, in points (x100 for fractions)",
        "- trainable: parameters that receive gradients, and their share of all the model's parameters; weights on "
        "disk: the saved .safetensors (adapter + task head, or the whole model for full)",
        "- train time: the training loop only (per-epoch validation and the test splits not counted), from "
        "metrics.json; epochs: run (best); peak RSS: the run process's peak resident memory (training and evaluation)",
        "- one run per method (the recipe's seed): no spread across seeds is measured; `peft-ft compare --seeds N` "
        "measures it",
        "- command: `peft-ft run` with the differences between the run's resolved recipe.toml and its source recipe "
        "as that file is now (output.* left out)",
        "",
    ]
    for data in data_sets:
        rows = {method: run for (d, method), run in chosen.items() if d == data}
        lines.append(table_markdown(DATASETS[data], rows))
    missing = [d for d in DATASETS if d not in data_sets]
    if missing:
        lines.append(f"Not in this table: {', '.join(missing)} ({left_out}).\n")
    lines.append(end)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section_text: str, section: str = "") -> None:
    """Replace the text between the section's markers (markers included), or append the section when the
    file has none; everything else in the file stays as it is."""
    begin, end = markers(section)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    begins, ends = text.count(begin), text.count(end)
    if (begins, ends) == (0, 0):
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section_text
    elif (begins, ends) == (1, 1) and text.index(begin) < text.index(end):
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + section_text.rstrip("\n") + text[stop:]
    else:
        from peft_ft.errors import PeftFtError

        raise PeftFtError(f"{path}: expected one {begin} line followed by one {end} line (found {begins} and {ends}); "
                          f"fix the file by hand")  # run_main: one line, exit 2
    path.write_text(text, encoding="utf-8")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--out-dir", default="", help="run folders go to OUT_DIR/<data>/<method>-seed42/<time>/ "
                        "(default bench/quality_runs; with --smoke a new temporary folder)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per run (default 1: the machine is shared)")
    parser.add_argument("--epochs", type=non_negative_int, default=0, help="override train.epochs of every run (default: the recipes' 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="learning rate of one method (default: recipes/<data>_<method>.toml's, else the method's default)")
    parser.add_argument("--collect", nargs="+", metavar="RUN_DIR", help="build the table from finished run folders; no training")
    parser.add_argument("--results", default="", help="markdown file to write the section into (default bench/RESULTS.md; "
                        "with --smoke OUT_DIR/RESULTS.md)")
    parser.add_argument("--section", default="", help="write into RESULTS.md's section of this name (its own markers), "
                        "e.g. a smaller budget beside the full-data table (default: the full-data table)")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT and tiny data in the real formats; seconds")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif args.smoke:
        import tempfile

        out_dir = Path(tempfile.mkdtemp(prefix="quality-smoke-"))
    else:
        out_dir = REPO / "bench" / "quality_runs"
    if args.collect:
        folders = find_run_folders(args.collect)
    else:
        from peft_ft.errors import PeftFtError

        try:
            folders = train_all(args, out_dir)
        except PeftFtError as e:
            print(f"error: {e}\n(quality.py: a changed --set/--epochs needs another --out-dir)", file=sys.stderr)
            return 2
        folders = find_run_folders([str(f) for f in folders if f.is_dir()])
    runs = [r for r in map(read_run, folders) if r is not None]
    chosen = pick_runs(runs)
    data_sets = [d for d in DATASETS if any(k[0] == d for k in chosen)] if args.collect else args.data
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in argv)
    left_out = "no run folder of it among those collected" if args.collect else "not asked for with --data"
    section = section_markdown(chosen, data_sets, command, left_out, args.section)
    results = Path(args.results) if args.results else (out_dir / "RESULTS.md" if args.smoke else REPO / "bench" / "RESULTS.md")
    write_section(results, section, args.section)
    print(section)
    print(f"written: {results}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
