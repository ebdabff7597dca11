"""`peft-ft compare`: train every variant not finished yet, each in its own process, then write the tables."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

from peft_ft.compare.child import child_main
from peft_ft.compare.report import print_table, write_comparison
from peft_ft.compare.variants import ALL, Variant, budget_differences, build_variants, finished_run, load_base, parse_lrs
from peft_ft.engine import checkpoint
from peft_ft.errors import PeftFtError
from peft_ft.log import setup_logging
from peft_ft.methods import METHODS
from peft_ft.rundir.layout import METRICS, RECIPE, read_info_raw
from peft_ft.rundir.portable import data_dir_of, portable_toml
from peft_ft.storage import write_atomic

log = logging.getLogger("peft_ft")


def _recipe_body(text: str) -> dict:
    """The values in the form a finished run writes them (machine paths shortened), without [output]: compare sets it
    itself (--out, the run name), and the same folder may be spelled another way on resume (relative, absolute)."""
    values = tomllib.loads(portable_toml(text))
    values.pop("output", None)
    return values


def _recipe_file(path: Path, fix: str) -> dict:
    """`_recipe_body` of a recipe file compare wrote (or a run folder's), a damaged one named with what to do."""
    try:
        return _recipe_body(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PeftFtError(f"compare --resume: {path}: unreadable ({e}); {fix}") from None


def check_resumable(compare_dir: Path, variants: list[Variant], resume: bool) -> dict[str, Path]:
    """Finished runs to keep: {run name: run folder}. Refuses a folder that `--resume` would misread."""
    if not resume:
        if compare_dir.exists() and any(compare_dir.iterdir()):
            raise PeftFtError(f"compare: {compare_dir} already holds a comparison; pass --resume to continue it "
                              f"(finished runs are skipped), or choose another folder with --out")
        return {}
    if compare_dir.exists() and any(compare_dir.iterdir()):
        _check_same_comparison(compare_dir, variants)
    kept = {}
    for v in variants:
        run_dir = finished_run(compare_dir, v.run_name)
        if run_dir is None:
            continue
        if _recipe_file(run_dir / RECIPE, f"remove {run_dir} to train that run again") != _recipe_body(v.toml):
            raise PeftFtError(f"compare --resume: the finished run {run_dir} was trained from a different recipe than "
                              f"{v.run_name} now resolves to; compare into a new folder with --out, or remove that run folder")
        _check_same_data(run_dir, v)
        kept[v.run_name] = run_dir
    return kept


def _check_same_comparison(compare_dir: Path, variants: list[Variant]) -> None:
    """`--resume` continues the comparison in the folder: the variants it planned (recipes/, written before any
    training) must be among this command's, each resolving to the same recipe. A folder of other recipes, methods,
    seeds or settings would have its tables rewritten without the rows of its finished variants."""
    planned = compare_dir / "recipes"
    if not planned.is_dir():
        raise PeftFtError(f"compare --resume: {compare_dir} holds no comparison (no recipes/ folder, which compare writes "
                          f"before training); give the folder a comparison was made in, or compare into a new folder with --out")
    names = {v.run_name for v in variants}
    others = sorted(p.stem for p in planned.glob("*.toml") if p.stem not in names)
    if others:
        raise PeftFtError(f"compare --resume: {compare_dir} compares variants this command does not plan "
                          f"({', '.join(others)}); resume with the recipes, --methods and --seeds it was started with, "
                          f"or compare into a new folder with --out")
    for v in variants:
        recorded = planned / f"{v.run_name}.toml"
        if recorded.is_file() and _recipe_file(recorded, "remove it (compare writes it again before training)") != _recipe_body(v.toml):
            raise PeftFtError(f"compare --resume: {v.run_name} was planned from a different recipe than it now resolves to "
                              f"(another recipe file, --set or --lr; see {recorded}); resume with the same recipes and "
                              f"settings, or compare into a new folder with --out")


def _check_same_data(run_dir: Path, variant: Variant) -> None:
    """Seeds of one variant make one mean ± std: a finished run trained on another data folder (--data-dir) must not
    be averaged with runs trained now."""
    recorded = data_dir_of(run_dir, read_info_raw(run_dir))
    if variant.data_dir and recorded and Path(recorded) != Path(variant.data_dir).resolve():
        raise PeftFtError(f"compare --resume: the finished run {run_dir} was trained on the data in {recorded}, not "
                          f"{variant.data_dir}; resume with --data-dir {recorded}, or compare the other data into a new "
                          f"folder with --out")


def unfinished_run(compare_dir: Path, variant: Variant) -> Path | None:
    """The variant's newest run folder that `--resume` completes rather than training the variant again: one that
    stopped with a checkpoint (Ctrl-C, killed), or one trained to its end outside compare (`peft-ft run --resume`,
    as its Ctrl-C message says) that lacks compare's measurements. Only one started from the recipe the variant
    resolves to now."""
    folders = sorted(p for p in (compare_dir / variant.run_name).glob("*") if p.is_dir())
    if not folders or not ((folders[-1] / METRICS).is_file() or checkpoint.listed(folders[-1])):
        return None
    recipe = folders[-1] / RECIPE
    if not recipe.is_file() or _recipe_file(recipe, f"remove {folders[-1]} to train that run again") != _recipe_body(variant.toml):
        log.warning("%s: %s stopped, but from another recipe than the variant now resolves to; training it anew",
                    variant.run_name, folders[-1])
        return None
    return folders[-1]


def refused_before_training(compare_dir: Path, variant: Variant, status: int) -> bool:
    """Exit 2 (a message for the user) with no run folder: the variant's recipe, model or data was refused, and
    every other seed of it would be refused the same way."""
    return status == 2 and not any(p.is_dir() for p in (compare_dir / variant.run_name).glob("*"))


# After Ctrl-C the child (which got it too) finishes its step and writes a checkpoint: it is given this long
CHILD_STOP_SECONDS = 60


def run_variant(variant: Variant, recipe_file: Path, isolate: bool = True, resume: Path | None = None) -> int:
    """Train one variant (or continue its interrupted run folder `resume`), in a subprocess of its own unless
    `isolate` is off; returns its exit status."""
    args = [str(recipe_file)] + (["--data-dir", variant.data_dir] if variant.data_dir else []) + \
        (["--resume", str(resume)] if resume else [])
    if not isolate:  # quick (no second import of torch), but peak RSS is then this process's running maximum
        return child_main(args, shared_process=True)
    child = subprocess.Popen([sys.executable, "-m", "peft_ft.compare.child", *args])
    try:
        return child.wait()
    except KeyboardInterrupt:
        # It got the terminal's Ctrl-C too and stops after its step with a checkpoint (`--resume` continues from
        # it): wait for that; a second Ctrl-C, or a child still running after CHILD_STOP_SECONDS, ends it now.
        try:
            child.wait(timeout=CHILD_STOP_SECONDS)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            child.kill()
            child.wait()
        raise


MAX_SEEDS = 1000  # a typo (--seeds 10000) would otherwise plan a month of runs before anyone notices


def compare(recipes: list[str], methods: list[str] | None = None, seeds: int = 1, lrs: list[str] = (),
            overrides: list[str] = (), out: str | None = None, resume: bool = False, data_dir: str | None = None,
            isolate: bool = True) -> Path:
    """Train every variant not yet finished, then write comparison.{csv,md,png}; returns the folder.
    `isolate=False` trains in this process (tests): quicker to start, but peak memory is then cumulative."""

    setup_logging(None)
    if not 1 <= seeds <= MAX_SEEDS:
        raise PeftFtError(f"compare: --seeds {seeds}: give 1 to {MAX_SEEDS} runs per variant")
    first = load_base(recipes[0], list(overrides))
    stems = "+".join(Path(r).stem for r in recipes)
    compare_dir = Path(out) if out else Path(first.output.dir) / f"compare-{stems}"

    method_names = list(METHODS) if methods == [ALL] else methods or [load_base(r, list(overrides)).adapter.method for r in recipes]
    variants = build_variants(recipes, methods, seeds, parse_lrs(list(lrs), method_names), list(overrides),
                              compare_dir, data_dir)
    for key in budget_differences(recipes, list(overrides)) if len(recipes) > 1 else []:
        log.warning("recipes differ in %s: the comparison is not like for like", key)
    kept = check_resumable(compare_dir, variants, resume)
    (compare_dir / "recipes").mkdir(parents=True, exist_ok=True)
    failed, refused = [], set()
    for number, v in enumerate(variants, 1):
        if v.run_name in kept:
            log.info("[%d/%d] %s: finished in %s, skipped", number, len(variants), v.run_name, kept[v.run_name])
            continue
        if v.label in refused:
            log.error("[%d/%d] %s: not started (an earlier seed of %s was refused before training)",
                      number, len(variants), v.run_name, v.label)
            failed.append(v.run_name)
            continue
        recipe_file = compare_dir / "recipes" / f"{v.run_name}.toml"
        write_atomic(recipe_file, v.toml)
        stopped = unfinished_run(compare_dir, v) if resume else None
        doing = "training" if not stopped else f"measuring {stopped} (trained outside compare)" \
            if (stopped / METRICS).is_file() else f"resuming {stopped} from its checkpoint"
        log.info("[%d/%d] %s: %s (lr %g)", number, len(variants), v.run_name, doing, v.lr)
        try:
            status = run_variant(v, recipe_file, isolate, resume=stopped)
        except KeyboardInterrupt:
            done = sum(finished_run(compare_dir, w.run_name) is not None for w in variants)
            log.warning("interrupted: %d finished run(s) kept in %s; run the same command with --resume to go on", done, compare_dir)
            raise
        if status != 0 or finished_run(compare_dir, v.run_name) is None:
            log.error("%s failed (exit status %d); see its train.log under %s", v.run_name, status, compare_dir / v.run_name)
            failed.append(v.run_name)
            if refused_before_training(compare_dir, v, status):
                refused.add(v.label)
    rows = write_comparison(compare_dir, variants)
    print_table(rows)
    if failed:
        raise PeftFtError(f"compare: {len(failed)} run(s) failed: {', '.join(failed)}; the tables in {compare_dir} "
                          f"hold the others. Fix the cause and run again with --resume")
    return compare_dir
