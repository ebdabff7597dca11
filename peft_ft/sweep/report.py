"""What a sweep leaves besides its trials: trials.csv, sweep.md, pareto.png and best.toml.

Everything is computed from the study (values, parameters and the numbers each trial recorded from
its own run folder), so any machine sharing the study writes the same tables.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from peft_ft.recipe.dump import to_toml
from peft_ft.recipe.load import build_recipe
from peft_ft.storage import save_figure, write_atomic
from peft_ft.sweep.space import trial_raw

log = logging.getLogger("peft_ft")
PARETO_AXES = (("trainable_params", "trainable parameters (log)"), ("train_seconds", "training time (s)"))


def trial_rows(study) -> list[dict]:
    """One row per trial, best first: finished trials by value, then pruned, then failed."""
    from optuna.trial import TrialState

    params = list(dict.fromkeys(k for t in study.trials for k in t.params))
    reruns = {t.system_attrs["failed_trial"]: t.number for t in study.trials if "failed_trial" in t.system_attrs}
    rows = []
    for t in study.trials:
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({
            "trial": t.number,
            "state": _state(t, reruns),
            "value": t.value,
            **{k: t.params.get(k) for k in params},
            "epochs": t.user_attrs.get("epochs_run", last),
            "best_epoch": t.user_attrs.get("best_epoch"),
            "trainable_params": t.user_attrs.get("trainable_params"),
            "train_seconds": t.user_attrs.get("train_seconds"),
            "host": t.user_attrs.get("host"),
            "run_dir": t.user_attrs.get("run_dir"),
        })
    order = {"complete": 0, "pruned": 1, "fail": 2}
    rows.sort(key=lambda r: (order.get(r["state"], 3), -(r["value"] or 0.0), r["trial"]))
    for x, _ in PARETO_AXES:
        front = pareto_front([r for r in rows if r["state"] == "complete" and r[x] is not None], x)
        for r in rows:
            r[f"front_{x}"] = r["trial"] in front
    return rows


INTERRUPTED = "interrupted"


def _state(trial, reruns: dict[int, int]) -> str:
    """complete, pruned, fail; or interrupted (Ctrl-C): not a result of its values, and --resume runs it again as
    another trial, so it neither counts as ended nor as failed."""
    from optuna.trial import TrialState

    if trial.state != TrialState.FAIL or not trial.user_attrs.get("interrupted"):
        return trial.state.name.lower()
    rerun = reruns.get(trial.number)
    return f"{INTERRUPTED}, rerun as trial {rerun}" if rerun is not None else f"{INTERRUPTED}, runs again on --resume"


def ended(rows: list[dict]) -> int:
    """Trials that count towards --trials: all but the interrupted ones (their reruns count)."""
    return sum(1 for r in rows if not r["state"].startswith(INTERRUPTED))


def pareto_front(rows: list[dict], x: str) -> set[int]:
    """Trials no other trial beats on both: a higher value with at most the cost, or less cost with at least the value."""
    front = set()
    for r in rows:
        dominated = any(o["value"] >= r["value"] and o[x] <= r[x] and (o["value"] > r["value"] or o[x] < r[x]) for o in rows)
        if not dominated:
            front.add(r["trial"])
    return front


def importances(study) -> tuple[dict[str, float], str]:
    """Optuna's parameter-importance ranking over finished trials, or why there is none. fANOVA (a
    seeded random forest over the trials) rather than Optuna 5's default PED-ANOVA, which ranks
    every parameter equal until there are ~10 finished trials and a sweep on a CPU often has fewer."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials (there are {len(done)})"
    if len({t.value for t in done}) == 1:
        return {}, f"every finished trial has the same value ({done[0].value:.4f}): no parameter explains anything"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator), ""
    except (RuntimeError, ValueError) as e:  # e.g. no parameter varied across finished trials
        return {}, str(e).splitlines()[0]


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    return buffer.getvalue()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def sweep_markdown(rows: list[dict], plan, ranking: dict[str, float], why_no_ranking: str, best_file: Path | None) -> str:
    params = [k for k in (rows[0] if rows else {}) if "." in k]
    header = ["trial", "state", f"validation {plan.metric}", *params, "epochs", "trainable", "train s", "Pareto (params/time)"]
    lines = [
        f"# Sweep of `{plan.recipe}`",
        "",
        f"Space `{plan.space}`; study `{plan.study}` in `{plan.storage}`; {ended(rows)} trial(s) ended of {plan.trials}. "
        f"Value: the best epoch's validation {plan.metric} (test splits are left out of every trial).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        front = "/".join("yes" if r[f"front_{x}"] else "-" for x, _ in PARETO_AXES) if r["state"] == "complete" else ""
        cells = [str(r["trial"]), r["state"], _cell(r["value"]), *[_cell(r[p]) for p in params], _cell(r["epochs"]),
                 _cell(r["trainable_params"]), "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}", front]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Parameter importance (Optuna)", ""]
    if ranking:
        lines += ["| parameter | importance |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in ranking.items()]]
    else:
        lines.append(f"Not computed: {why_no_ranking}.")
    lines += ["", "fANOVA (Optuna's `FanovaImportanceEvaluator`, seed 0): the share of the validation value's variance "
              "over finished trials that each parameter explains; with few trials, a rough guide."]
    lines += [
        "",
        "## Best trial",
        "",
        f"Recipe: `{best_file}` (run it with `peft-ft run` to train it again, with its test splits)." if best_file
        else "No trial finished.",
        "",
        "- pruned: stopped after the epoch shown, its validation value below the median of earlier trials at that epoch",
        "- interrupted: stopped by Ctrl-C; not counted, and `peft-ft sweep --resume` runs it again with its values as "
        "the trial named",
        "- run_dir (trials.csv): the trial's run folder, relative to the sweep folder",
        "- trainable, train s: the trial's trainable parameters and training-loop seconds (no evaluation), from its metrics.json",
        "- Pareto: no other finished trial has a higher value with at most as many parameters (or as little time)",
        "",
    ]
    return "\n".join(lines)


def plot_pareto(rows: list[dict], metric: str, path: Path) -> None:
    """Validation value against trainable parameters and against training time; the front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "complete"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, (x, label) in zip(axes, PARETO_AXES):
        points = [r for r in done if r[x] is not None]
        front = sorted((r for r in points if r[f"front_{x}"]), key=lambda r: r[x])
        ax.scatter([r[x] for r in points], [r["value"] for r in points], color="0.6", label="trial")
        ax.plot([r[x] for r in front], [r["value"] for r in front], "o-", color="C3", drawstyle="steps-post", label="Pareto front")
        for r in front:
            ax.annotate(str(r["trial"]), (r[x], r["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if x == "trainable_params" and points:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{len(done)} finished trial(s)")
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def best_recipe_text(study, plan, base: dict, space) -> str | None:
    """The best trial's recipe in full: the recipe with the trial's values, test splits and output as
    the recipe has them; validated before it is written."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    by_key = {p.key: p for p in space.params}
    values = {k: by_key[k].from_choice(v) if k in by_key else v for k, v in best.params.items()}
    recipe = build_recipe(trial_raw(base, values), plan.recipe)
    body = to_toml(recipe).split("\n", 1)[1]  # drop "# resolved from ...": said below
    return (f"# best trial ({best.number}) of a peft-ft sweep of {plan.recipe}: validation {plan.metric} "
            f"{best.value:.4f}\n# swept values: {', '.join(f'{k} = {v}' for k, v in values.items())}\n" + body)


def write_reports(sweep_dir: Path, study, plan, base: dict, space) -> None:
    rows = trial_rows(study)
    ranking, why = importances(study)
    text = best_recipe_text(study, plan, base, space)
    best_file = sweep_dir / "best.toml" if text else None
    if text:
        write_atomic(best_file, text)
    write_atomic(sweep_dir / "trials.csv", rows_csv(rows))
    write_atomic(sweep_dir / "sweep.md", sweep_markdown(rows, plan, ranking, why, best_file))
    plot_pareto(rows, plan.metric, sweep_dir / "pareto.png")
    log.info("sweep %s: %d trial(s); tables trials.csv, sweep.md; plot pareto.png%s", sweep_dir, ended(rows),
             f"; best recipe {best_file}" if best_file else "")
