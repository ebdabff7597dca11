"""The tables and the plot of `peft-ft compare`, computed from the run folders' own files (metrics.json,
compare.json), never from numbers kept in memory."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from peft_ft.compare.variants import LATENCY_EXAMPLES, MEASURE_FILE, Variant, finished_run
from peft_ft.log import console
from peft_ft.models.integrity import read_json_object
from peft_ft.rundir.layout import read_metrics, read_recipe
from peft_ft.storage import human_size, save_figure, write_atomic
from peft_ft.tasks import TASKS

# Numbers of a run besides its task metrics: (column, where in metrics.json / compare.json).
MEASURED = "compare writes it (its measurements) when a run ends: remove that run folder to train it again"
RUN_NUMBERS = {
    "trainable_params": ("params", "trainable_params"),
    "trainable_percent": ("params", "trainable_percent"),
    "adapter_bytes": ("params", "weight_bytes"),
    "train_seconds": ("train", "seconds"),
    "train_samples_per_second": ("train", "samples_per_second"),
    "peak_memory_mib": ("measure", "peak_memory_mib"),
    "eval_latency_ms": ("measure", "eval_latency_ms"),
}


def run_numbers(run_dir: Path, task_metrics: tuple[str, ...]) -> dict[str, float]:
    """One run's numbers, read from its own metrics.json and compare.json."""
    metrics = read_metrics(run_dir)
    sources = {**metrics, "measure": read_json_object(run_dir / MEASURE_FILE, MEASURED)}
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

    rows = []
    for label in dict.fromkeys(v.label for v in variants):
        group = [v for v in variants if v.label == label]
        runs = [(v, finished_run(compare_dir, v.run_name)) for v in group]
        runs = [(v, d) for v, d in runs if d is not None]
        row = {"variant": label, "method": group[0].method, "recipe": group[0].recipe, "lr": group[0].lr,
               "seeds": " ".join(str(v.seed) for v, _ in runs), "n_runs": len(runs), "failed": len(group) - len(runs)}
        if runs:
            task = TASKS[read_recipe(runs[0][1]).task.type]
            per_run = [run_numbers(d, task.metrics) for _, d in runs]
            measure = read_json_object(runs[0][1] / MEASURE_FILE, MEASURED)
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
        "- metrics: each test split of the run folders' `metrics.json` (validation only when there is no test split)",
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
            y = statistics.fmean(split_values)
            ax.errorbar(r[x], y, xerr=r.get(f"{x}_std") or 0, fmt="o", capsize=3)
            ax.annotate(r["variant"], (r[x], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_ylim(low, high)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean {rows[0]['task_metric']} over {len(columns)} split(s)" if rows else "")
        ax.grid(True, alpha=0.3)
    axes[1].set_xscale("log")
    title = f"{rows[0]['task_metric']} by method (axis from {low:g})" if values else "no finished runs"
    fig.suptitle(title)
    save_figure(fig, path, dpi=120)
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

    header, body = display_rows(rows)
    # One column per variant: a handful of methods fit a terminal's width, a dozen measures do not.
    table = Table(title="peft-ft compare")
    table.add_column(header[0])
    for cells in body:
        table.add_column(cells[0], justify="right")
    for i, name in enumerate(header[1:], 1):
        table.add_row(name, *[cells[i] for cells in body])
    console().print(table)
