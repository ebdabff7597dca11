"""`peft-ft compare`: the same recipe trained with several adapter methods (and seeds), side by side.

Each variant (recipe x method x seed) is written out as its own resolved recipe and trained in its
own subprocess (`python -m peft_ft.compare VARIANT.toml`), so that the peak memory each run reports
is its own: a process's peak RSS only ever grows. The child also times evaluation on a reloaded
model (`measure_latency`) and leaves `compare.json` in its run folder; a run folder holding both
`metrics.json` and `compare.json` is finished, and `--resume` skips it. The tables are computed
from the run folders' own files, never from numbers kept in memory.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from peft_ft.errors import PeftFtError, RecipeError
from peft_ft.storage import human_size, write_atomic, write_json

log = logging.getLogger("peft_ft")
MEASURE_FILE = "compare.json"
LATENCY_EXAMPLES = 256  # examples of the first test split timed per run
# Numbers of a run besides its task metrics: (column, where in metrics.json / compare.json).
RUN_NUMBERS = {
    "trainable_params": ("params", "trainable_params"),
    "trainable_percent": ("params", "trainable_percent"),
    "adapter_bytes": ("params", "weight_bytes"),
    "train_seconds": ("train", "seconds"),
    "train_samples_per_second": ("train", "samples_per_second"),
    "peak_memory_mib": ("measure", "peak_memory_mib"),
    "eval_latency_ms": ("measure", "eval_latency_ms"),
}


@dataclass
class Variant:
    label: str  # the method, or recipe stem and method when several recipes are compared
    recipe: str  # the recipe file it comes from
    method: str
    seed: int
    lr: float  # the resolved learning rate (0 in the recipe = the method's default)
    toml: str  # the variant's fully resolved recipe
    data_dir: str | None  # resolved once by the parent so every variant reads the same files

    @property
    def run_name(self) -> str:
        return f"{self.label}-seed{self.seed}"


# --- building the variants ----------------------------------------------------------------------


def parse_lrs(items: list[str], methods: list[str]) -> dict[str, float]:
    """`--lr lora=1e-3` -> {"lora": 0.001}."""
    lrs, problems = {}, []
    for item in items:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if name not in methods:
            problems.append(f"{item!r}: {name!r} is not among the compared methods ({', '.join(methods)})")
        elif lr <= 0:
            problems.append(f"{item!r}: expected METHOD=LEARNING_RATE with a positive number, e.g. lora=1e-3")
        else:
            lrs[name] = lr
    if problems:
        raise RecipeError("--lr", problems)
    return lrs


ALL = "all"  # --methods all: every registered method that applies to each recipe's task and model


def parse_methods(text: str | None) -> list[str] | None:
    from peft_ft.methods import METHODS

    if not text:
        return None
    if text.strip() == ALL:
        return [ALL]
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names or len(set(names)) != len(names):
        raise RecipeError("--methods", [f"{text!r}: expected `all` or distinct methods separated by commas, from: {', '.join(METHODS)}"])
    return names


def drop_other_method_keys(raw: dict, method: str) -> None:
    """Remove keys that apply only to other methods (adapter.r for `full`...): the schema rejects them."""
    from peft_ft.recipe.schema import section_types

    for section, cls in section_types().items():
        values = raw.get(section)
        if not isinstance(values, dict):
            continue
        for f in dataclasses.fields(cls):
            allowed = f.metadata["only"].get("adapter.method")
            if allowed is not None and method not in allowed:
                values.pop(f.name, None)


def variant_raw(raw: dict, method: str, seed: int, lr: float | None, name: str, out_dir: Path) -> dict:
    """The recipe's raw TOML (with --set applied) turned into one variant's."""
    from peft_ft.recipe.schema import AdapterSection

    raw = copy.deepcopy(raw)
    recipe_method = raw.get("adapter", {}).get("method", AdapterSection().method)
    drop_other_method_keys(raw, method)
    raw.setdefault("adapter", {})["method"] = method
    train = raw.setdefault("train", {})
    train["seed"] = seed
    if lr is not None:
        train["lr"] = lr
    elif method != recipe_method:
        train["lr"] = 0.0  # the recipe's rate was tuned for its own method: use this method's default
    raw["output"] = {"dir": str(out_dir), "name": name}
    return raw


def model_skeleton(recipe, location: str, auto_class: str):
    """The recipe's task model built on the meta device (no weights read): enough to ask which methods fit it."""
    import torch
    import transformers

    from peft_ft.models.loading import quiet_transformers

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(location, trust_remote_code=recipe.model.trust_remote_code)
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def applicable_methods(raw: dict, path: str, location: str, out_dir: Path) -> list[str]:
    """`--methods all` for one recipe: every registered method whose variant validates and that fits the
    model; each one left out is logged with the reason."""
    from peft_ft.methods import METHODS, unsupported
    from peft_ft.recipe.schema import build_recipe
    from peft_ft.tasks import TASKS

    chosen, skeleton = [], None
    for name, method in METHODS.items():
        try:
            recipe = build_recipe(variant_raw(raw, name, 0, None, name, out_dir), f"{path} [compare: {name}]")
        except RecipeError as e:
            log.info("--methods all: %s left out: %s", name, "; ".join(e.problems))
            continue
        task = TASKS[recipe.task.type]
        skeleton = skeleton or model_skeleton(recipe, location, task.auto_class)
        reason = unsupported(method, recipe, skeleton, location, task.auto_class, task.peft_task_type)
        if reason:
            log.info("--methods all: %s left out: %s", name, reason)
        else:
            chosen.append(name)
    log.info("--methods all for %s: %s", path, ", ".join(chosen))
    return chosen


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    from peft_ft.recipe.schema import parse_override

    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        section, _, field = key.partition(".")
        if field and isinstance(raw.setdefault(section, {}), dict):
            raw[section][field] = value
    return raw


def build_variants(recipes: list[str], methods: list[str] | None, seeds: int, lrs: dict[str, float],
                   overrides: list[str], out_dir: Path, data_dir: str | None) -> list[Variant]:
    """Every (recipe, method, seed), each validated by the schema before anything trains."""
    from peft_ft.methods import METHODS
    from peft_ft.data.files import resolve_data_dir, split_sources
    from peft_ft.models.loading import resolve_model, settle_hub_mode
    from peft_ft.recipe.schema import build_recipe, load_recipe, to_toml

    stems = [Path(r).stem for r in recipes]
    if len(set(stems)) != len(stems):
        raise PeftFtError(f"compare: several recipes share a file name ({', '.join(recipes)}); runs are named by it, rename one")
    first_seed = load_recipe(recipes[0], overrides).train.seed
    variants = []
    for path, stem in zip(recipes, stems):
        base = load_recipe(path, overrides)  # the recipe as written must be valid on its own
        settle_hub_mode(base)
        location = resolve_model(base)
        resolved_dir = None if base.data.hub else str(resolve_data_dir(base, data_dir))
        split_sources(base, None if base.data.hub else Path(resolved_dir))  # every file exists
        raw = with_overrides(tomllib.loads(Path(path).read_text(encoding="utf-8")), overrides)
        names = applicable_methods(raw, path, location, out_dir) if methods == [ALL] else methods or [base.adapter.method]
        for method in names:
            label = method if len(recipes) == 1 else f"{stem}-{method}"
            for seed in range(first_seed, first_seed + seeds):
                v_raw = variant_raw(raw, method, seed, lrs.get(method), f"{label}-seed{seed}", out_dir)
                recipe = build_recipe(v_raw, f"{path} [compare: {method}, seed {seed}]")
                lr = recipe.train.lr or METHODS[method].default_lr
                variants.append(Variant(label, path, method, seed, lr, to_toml(recipe), resolved_dir))
    return variants


def budget_differences(recipes: list[str], overrides: list[str]) -> list[str]:
    """Keys of data and budget that differ between recipes: their comparison is then not like for like."""
    from peft_ft.recipe.schema import load_recipe

    loaded = [load_recipe(r, overrides) for r in recipes]
    keys = [f"data.{f.name}" for f in dataclasses.fields(loaded[0].data)] + ["train.epochs", "train.max_steps", "task.type"]
    return [k for k in keys if len({repr(r.get(k)) for r in loaded}) > 1]


# --- running ------------------------------------------------------------------------------------


def finished_run(compare_dir: Path, run_name: str) -> Path | None:
    """The newest run folder of a variant that got to the end (an interrupted one lacks the files)."""
    done = [p.parent for p in sorted((compare_dir / run_name).glob(f"*/{MEASURE_FILE}")) if (p.parent / "metrics.json").is_file()]
    return done[-1] if done else None


def _recipe_body(text: str) -> str:
    from peft_ft.rundir.portable import portable_toml

    # the values in the form a finished run writes them (machine paths shortened), without the header
    # comments ("# resolved from ...", the run folder's "# fingerprint: ...")
    return "\n".join(line for line in portable_toml(text).splitlines() if not line.startswith("#"))


def check_resumable(compare_dir: Path, variants: list[Variant], resume: bool) -> dict[str, Path]:
    """Finished runs to keep: {run name: run folder}. Refuses a folder that `--resume` would misread."""
    if not resume:
        if compare_dir.exists() and any(compare_dir.iterdir()):
            raise PeftFtError(f"compare: {compare_dir} already holds a comparison; pass --resume to continue it "
                              f"(finished runs are skipped), or choose another folder with --out")
        return {}
    kept = {}
    for v in variants:
        run_dir = finished_run(compare_dir, v.run_name)
        if run_dir is None:
            continue
        if _recipe_body((run_dir / "recipe.toml").read_text(encoding="utf-8")) != _recipe_body(v.toml):
            raise PeftFtError(f"compare --resume: the finished run {run_dir} was trained from a different recipe than "
                              f"{v.run_name} now resolves to; compare into a new folder with --out, or remove that run folder")
        kept[v.run_name] = run_dir
    return kept


def run_variant(variant: Variant, recipe_file: Path, isolate: bool = True) -> int:
    """Train one variant, in a subprocess of its own unless `isolate` is off; returns its exit status."""
    args = [str(recipe_file)] + (["--data-dir", variant.data_dir] if variant.data_dir else [])
    if not isolate:  # quick (no second import of torch), but peak RSS is then this process's running maximum
        return child_main(args, shared_process=True)
    child = subprocess.Popen([sys.executable, "-m", "peft_ft.compare", *args])
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()  # it got the terminal's SIGINT too; make sure it is gone before we report
        child.wait()
        raise


def compare(recipes: list[str], methods: list[str] | None = None, seeds: int = 1, lrs: list[str] = (),
            overrides: list[str] = (), out: str | None = None, resume: bool = False, data_dir: str | None = None,
            isolate: bool = True) -> Path:
    """Train every variant not yet finished, then write comparison.{csv,md,png}; returns the folder.
    `isolate=False` trains in this process (tests): quicker to start, but peak memory is then cumulative."""
    from peft_ft.log import setup_logging
    from peft_ft.recipe.schema import load_recipe

    setup_logging(None)
    if seeds < 1:
        raise PeftFtError("compare: --seeds must be at least 1")
    first = load_recipe(recipes[0], list(overrides))
    stems = "+".join(Path(r).stem for r in recipes)
    compare_dir = Path(out) if out else Path(first.output.dir) / f"compare-{stems}"
    from peft_ft.methods import METHODS

    method_names = list(METHODS) if methods == [ALL] else methods or [load_recipe(r, list(overrides)).adapter.method for r in recipes]
    variants = build_variants(recipes, methods, seeds, parse_lrs(list(lrs), method_names), list(overrides),
                              compare_dir, data_dir)
    for key in budget_differences(recipes, list(overrides)) if len(recipes) > 1 else []:
        log.warning("recipes differ in %s: the comparison is not like for like", key)
    kept = check_resumable(compare_dir, variants, resume)
    (compare_dir / "recipes").mkdir(parents=True, exist_ok=True)
    failed = []
    for number, v in enumerate(variants, 1):
        if v.run_name in kept:
            log.info("[%d/%d] %s: finished in %s, skipped", number, len(variants), v.run_name, kept[v.run_name])
            continue
        recipe_file = compare_dir / "recipes" / f"{v.run_name}.toml"
        write_atomic(recipe_file, v.toml)
        log.info("[%d/%d] %s: training (lr %g)", number, len(variants), v.run_name, v.lr)
        try:
            status = run_variant(v, recipe_file, isolate)
        except KeyboardInterrupt:
            done = sum(finished_run(compare_dir, w.run_name) is not None for w in variants)
            log.warning("interrupted: %d finished run(s) kept in %s; run the same command with --resume to go on", done, compare_dir)
            raise
        if status != 0 or finished_run(compare_dir, v.run_name) is None:
            log.error("%s failed (exit status %d); see its train.log under %s", v.run_name, status, compare_dir / v.run_name)
            failed.append(v.run_name)
    rows = write_comparison(compare_dir, variants)
    print_table(rows)
    if failed:
        raise PeftFtError(f"compare: {len(failed)} run(s) failed: {', '.join(failed)}; the tables in {compare_dir} "
                          f"hold the others. Fix the cause and run again with --resume")
    return compare_dir


# --- the child: one variant ---------------------------------------------------------------------


def measure_latency(run_dir: Path, data_dir: str | None, rows: int = LATENCY_EXAMPLES) -> dict:
    """Milliseconds per example to predict the first test split's first `rows` examples (or
    validation's), on the reloaded model, batched as in evaluation, after one warm-up batch."""
    import torch

    from peft_ft.data.files import resolve_data_dir
    from peft_ft.engine.run import load_run
    from peft_ft.recipe.schema import load_recipe
    from peft_ft.tasks import TASKS, Split
    from peft_ft.engine.train import setup_torch

    recipe = load_recipe(run_dir / "recipe.toml")
    task = TASKS[recipe.task.type]
    device = setup_torch(recipe)
    data = task.load(recipe, None if recipe.data.hub else resolve_data_dir(recipe, data_dir))
    name = next((n for n in data.eval_names if n != "validation"), None) or next(iter(data.eval_names), "train")
    split = Split(name, data.splits[name].source, data.splits[name].examples[:rows])
    # A run this comparison trained from the recipe given on its command line: that recipe's own say on remote code.
    model, tokenizer, _ = load_run(run_dir, str(device), trust_remote_code=recipe.model.trust_remote_code)
    features = task.encode(split, tokenizer, recipe, data)
    pad_id, batch_size = tokenizer.pad_token_id or 0, recipe.eval.batch_size
    task.predict(model, features[:batch_size], pad_id, batch_size, device)  # warm-up: first-call allocations
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    task.predict(model, features, pad_id, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"eval_latency_ms": round(1000 * seconds / len(split.examples), 4), "latency_split": name,
            "latency_examples": len(split.examples), "latency_batch_size": batch_size, "device": device.type}


def child_main(argv: list[str], shared_process: bool = False) -> int:
    """Train one variant recipe, then record its peak memory and eval latency beside its metrics."""
    import argparse

    from peft_ft.engine.run import run
    from peft_ft.recipe.schema import load_recipe

    parser = argparse.ArgumentParser(prog="python -m peft_ft.compare", description="one variant of peft-ft compare")
    parser.add_argument("recipe")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    try:
        import torch

        if shared_process and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier one's
        run_dir = run(load_recipe(args.recipe), data_dir=args.data_dir)

        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            memory = {"peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "memory_kind": "cuda max allocated"}
        else:  # measured at the end of training, before the test splits and the latency run below
            kind = "peak RSS (shared process: cumulative)" if shared_process else "peak RSS"
            memory = {"peak_memory_mib": metrics["train"]["peak_rss_mib"], "memory_kind": kind}
        write_json(run_dir / MEASURE_FILE, {**memory, **measure_latency(run_dir, args.data_dir)})
    except PeftFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {run_dir}")
    return 0


# --- the tables and the plot --------------------------------------------------------------------


def run_numbers(run_dir: Path, task_metrics: tuple[str, ...]) -> dict[str, float]:
    """One run's numbers, read from its own metrics.json and compare.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    sources = {**metrics, "measure": json.loads((run_dir / MEASURE_FILE).read_text(encoding="utf-8"))}
    numbers = {}
    for split, values in metrics.items():
        if split in ("train", "params", "validation") or not isinstance(values, dict):
            continue
        numbers.update({f"{split}/{m}": values[m] for m in task_metrics if isinstance(values.get(m), (int, float))})
    if not numbers and isinstance(metrics.get("validation"), dict):  # no test split: validation is all there is
        numbers.update({f"validation/{m}": metrics["validation"][m] for m in task_metrics if m in metrics["validation"]})
    numbers.update({column: sources[a][b] for column, (a, b) in RUN_NUMBERS.items()})
    return numbers


def aggregate(variants: list[Variant], compare_dir: Path) -> list[dict]:
    """One row per label: mean and sample std over its finished seeds (std empty for one seed)."""
    from peft_ft.recipe.schema import load_recipe
    from peft_ft.tasks import TASKS

    rows = []
    for label in dict.fromkeys(v.label for v in variants):
        group = [v for v in variants if v.label == label]
        runs = [(v, finished_run(compare_dir, v.run_name)) for v in group]
        runs = [(v, d) for v, d in runs if d is not None]
        row = {"variant": label, "method": group[0].method, "recipe": group[0].recipe, "lr": group[0].lr,
               "seeds": " ".join(str(v.seed) for v, _ in runs), "n_runs": len(runs), "failed": len(group) - len(runs)}
        if runs:
            task = TASKS[load_recipe(runs[0][1] / "recipe.toml").task.type]
            per_run = [run_numbers(d, task.metrics) for _, d in runs]
            measure = json.loads((runs[0][1] / MEASURE_FILE).read_text(encoding="utf-8"))
            row.update({"memory_kind": measure["memory_kind"], "device": measure["device"], "task_metric": task.default_metric,
                        "run_dirs": " ".join(str(d.relative_to(compare_dir)) for _, d in runs)})
            for column in per_run[0]:
                values = [n[column] for n in per_run if column in n]
                # equal values (parameter counts, sizes) stay as they are: 3906, not 3906.0
                row[column] = values[0] if len(set(values)) == 1 else statistics.fmean(values)
                row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def metric_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if "/" in k and not k.endswith("_std")))


def _cell(row: dict, column: str, fmt) -> str:
    if row.get(column) is None:
        return "-"
    std = row.get(f"{column}_std")
    return fmt(row[column]) + (f" ± {fmt(std)}" if std is not None else "")


def display_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells, shared by comparison.md and the console table."""
    metrics = metric_columns(rows)
    header = ["variant", "lr", "runs", *metrics, "trainable", "trainable %", "saved", "train s", "samples/s", "peak MiB", "ms/example"]
    body = []
    for r in rows:
        body.append([
            r["variant"], f"{r['lr']:g}", f"{r['n_runs']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            *[_cell(r, m, lambda x: f"{x:.4f}") for m in metrics],
            _cell(r, "trainable_params", lambda x: f"{x:,.0f}"), _cell(r, "trainable_percent", lambda x: f"{x:.3f}"),
            _cell(r, "adapter_bytes", lambda x: human_size(int(x))), _cell(r, "train_seconds", lambda x: f"{x:.1f}"),
            _cell(r, "train_samples_per_second", lambda x: f"{x:.1f}"), _cell(r, "peak_memory_mib", lambda x: f"{x:.0f}"),
            _cell(r, "eval_latency_ms", lambda x: f"{x:.3f}"),
        ])
    return header, body


def comparison_markdown(rows: list[dict], variants: list[Variant]) -> str:
    header, body = display_rows(rows)
    kinds = sorted({r.get("memory_kind", "") for r in rows} - {""})
    lines = [
        "# Comparison",
        "",
        f"Recipes: {', '.join(f'`{r}`' for r in dict.fromkeys(v.recipe for v in variants))}; "
        f"seeds: {', '.join(map(str, sorted({v.seed for v in variants})))}. Same data and budget for every method. Cells with ± are mean ± sample standard deviation over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(cells) + " |" for cells in body],
        "",
        f"- metrics: each test split of the run folders' `metrics.json` (validation only when there is no test split)",
        "- trainable: parameters that received gradients; saved: the weight files on disk (adapter + head, or the whole model for `full`)",
        "- train s, samples/s: the training loop only (no evaluation), from `metrics.json`",
        f"- peak MiB: {' / '.join(kinds) or '-'} (CPU: the peak RSS of the run's own process at the end of training; GPU: torch.cuda.max_memory_allocated)",
        f"- ms/example: the model reloaded from its run folder predicts up to {LATENCY_EXAMPLES} examples of the first test split "
        "in evaluation batches after one warm-up batch; wall time divided by examples",
        "",
    ]
    return "\n".join(lines)


def comparison_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows])
    return buffer.getvalue()


def plotted_metrics(rows: list[dict]) -> list[str]:
    """The task's default metric on every test split (validation when there is none): `split/metric` columns."""
    rows = [r for r in rows if r["n_runs"]]
    if not rows:
        return []
    return [c for c in metric_columns(rows) if c.endswith("/" + rows[0]["task_metric"])]


def metric_axis(values: list[float]) -> tuple[float, float]:
    """From 0 (or below, for a metric that went negative) to at least 1 for metrics on a 0-1 scale: a gap
    of 0.009 is then drawn as the small gap it is."""
    low = min([0.0, *values])
    high = max([*values, 0.0])
    return low, (1.0 if high <= 1.0 else high * 1.05)


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Left: every test split's task metric per variant, bars from 0 with the seed spread (sample std) as
    error bars. Middle and right: the mean over test splits against trainable parameters (log) and
    training time, on the same axis from 0."""
    import statistics as stats

    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["n_runs"]]
    columns = plotted_metrics(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True, gridspec_kw={"width_ratios": [1.6, 1, 1]})
    width = 0.8 / max(1, len(columns))
    values = [r[c] for r in rows for c in columns if r.get(c) is not None]
    low, high = metric_axis([v + (r.get(f"{c}_std") or 0) for r in rows for c in columns if (v := r.get(c)) is not None])
    bars = axes[0]
    for j, column in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        spread = [r.get(f"{column}_std") for r in rows]
        bars.bar(xs, [r.get(column) or 0.0 for r in rows], width, label=column.split("/")[0],
                 yerr=[x or 0.0 for x in spread] if any(x is not None for x in spread) else None, capsize=2)
    bars.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=40, ha="right", fontsize=8)
    bars.set_ylim(low, high)
    bars.set_ylabel(rows[0]["task_metric"] if rows else "no finished runs")
    bars.grid(True, axis="y", alpha=0.3)
    if columns:
        bars.legend(fontsize=8, title="split", title_fontsize=8)
    for ax, x, xlabel in ((axes[1], "trainable_params", "trainable parameters (log)"), (axes[2], "train_seconds", "train time (s)")):
        for r in rows:
            split_values = [r[c] for c in columns if r.get(c) is not None]
            if not split_values:
                continue
            y = stats.fmean(split_values)
            ax.errorbar(r[x], y, xerr=r.get(f"{x}_std") or 0, fmt="o", capsize=3)
            ax.annotate(r["variant"], (r[x], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_ylim(low, high)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean {rows[0]['task_metric']} over {len(columns)} split(s)" if rows else "")
        ax.grid(True, alpha=0.3)
    axes[1].set_xscale("log")
    title = f"{rows[0]['task_metric']} by method (axis from {low:g})" if values else "no finished runs"
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(compare_dir: Path, variants: list[Variant]) -> list[dict]:
    """comparison.csv (one row per variant), runs.csv (one per run), comparison.md and comparison.png."""
    rows = aggregate(variants, compare_dir)
    per_run = [aggregate([v], compare_dir)[0] | {"variant": v.run_name} for v in variants]
    write_atomic(compare_dir / "comparison.csv", comparison_csv(rows))
    write_atomic(compare_dir / "runs.csv", comparison_csv([r for r in per_run if r["n_runs"]]))
    write_atomic(compare_dir / "comparison.md", comparison_markdown(rows, variants))
    plot_comparison(rows, compare_dir / "comparison.png")
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    from peft_ft.log import console

    header, body = display_rows(rows)
    # One column per variant: a handful of methods fit a terminal's width, a dozen measures do not.
    table = Table(title="peft-ft compare")
    table.add_column(header[0])
    for cells in body:
        table.add_column(cells[0], justify="right")
    for i, name in enumerate(header[1:], 1):
        table.add_row(name, *[cells[i] for cells in body])
    console().print(table)


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
