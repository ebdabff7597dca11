"""The benchmark scripts run end to end (`--smoke`: tiny BERT and tiny data built in code) and
print a table with every configuration and positive numbers. No timings are asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_ft.tasks import TASKS

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_smoke(script: str, tmp_path: Path, *args: str) -> list[dict]:
    """Run `bench/<script> --smoke`, return the rows of its markdown table as dicts."""
    out = tmp_path / f"{script}.md"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def number(text: str) -> float:
    return float(text.rstrip("x").replace(",", ""))


def expected(configs) -> set[tuple]:
    return {c for c in configs if not (c[0] == "conll" and c[1] == "peft-ft" and "ner" not in TASKS)}


def test_throughput_smoke(tmp_path):
    rows = run_smoke("throughput.py", tmp_path)
    keys = {(r["data"], r["runner"], r["method"], r["batches"]) for r in rows}
    want = expected((data, runner, method, batches) for data in ("scientsbank", "conll") for runner, method, batches in [
        ("peft-ft", "lora", "grouped"), ("peft-ft", "full", "grouped"), ("peft-ft", "lora", "stock-layers"),
        ("trainer", "lora", "random"),
        ("trainer", "lora", "grouped"), ("trainer", "lora", "pad512"), ("trainer", "full", "random"),
        ("trainer", "full", "grouped")])
    assert keys == want and len(rows) == len(want)
    for r in rows:
        assert number(r["steps"]) == 2
        for column in ("s/step", "samples/s", "real tok/s", "real/computed tokens"):
            assert number(r[column]) > 0, (r, column)
        assert number(r["real/computed tokens"]) <= 1
        if r["runner"] == "peft-ft" and r["batches"] == "grouped":  # the rows the ratios divide by
            assert r["tok/s vs peft-ft"] == "1.00x"
    # padding every row to 512 computes far more tokens than it uses
    pad512 = [r for r in rows if r["batches"] == "pad512"]
    assert pad512 and all(number(r["real/computed tokens"]) < 0.2 for r in pad512)


def test_memory_smoke(tmp_path):
    rows = run_smoke("memory.py", tmp_path)
    keys = {(r["data"], r["runner"], r["method"]) for r in rows}
    want = expected((data, runner, method) for data in ("scientsbank", "conll")
                    for runner in ("peft-ft", "trainer") for method in ("lora", "full"))
    assert keys == want and len(rows) == len(want)
    for r in rows:
        for column in ("trainable params", "steps", "widest batch", "RSS before (MiB)", "peak RSS (MiB)"):
            assert number(r[column]) > 0, (r, column)
        assert number(r["peak RSS (MiB)"]) >= number(r["RSS before (MiB)"])
    by_key = {(r["data"], r["runner"], r["method"]): r for r in rows}
    for (data, runner, method), r in by_key.items():
        if method == "lora":  # LoRA trains a small fraction of what full fine-tuning trains
            assert number(r["trainable params"]) < number(by_key[(data, runner, "full")]["trainable params"]) / 2



def test_scaling_smoke(tmp_path):
    """bench/scaling.py --smoke: a tiny config, LoRA and full side by side for each cell, every cell measured,
    the ratio columns filled, and the PNG written."""
    plot = tmp_path / "scaling.png"
    rows = run_smoke("scaling.py", tmp_path, "--plot", str(plot), "--variants")  # no extra variants: 4 cells
    cells = [(r["seq len"], r["batch"], r["method"], r["variant"]) for r in rows]
    assert cells == [(s, "4", m, "plain") for s in ("16", "32") for m in ("lora", "full")]
    for r in rows:
        assert number(r["steps"]) == 1 and number(r["real tok/s"]) > 0 and number(r["peak (MiB)"]) > 0, r
        assert number(r["peak vs full"]) > 0
        if r["method"] == "full":
            assert r["peak vs full"] == "1.00x"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_steps_smoke():
    """bench/recipe_steps.py --smoke: an NER recipe built as `peft-ft run` builds it (here with a bf16 frozen
    base) trains 2 steps and prints the time of each and the loop's speed."""
    proc = subprocess.run([sys.executable, str(BENCH / "recipe_steps.py"), "--smoke", "--set", "train.mixed_precision=bf16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps 1-1: " in proc.stdout and "steps 2-2: " in proc.stdout, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("bf16: 2 steps in "), last
    assert number(last.rsplit(", ", 1)[1].split()[0]) > 0


# --- bad input: one `error:` line, exit 2, no traceback (no model is loaded: each takes well under a second) -------

ROOT = BENCH.parent
SCRIPTS = ROOT / "scripts"


def run_script(path: Path, *args: str, cwd: Path | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    command = ["bash", str(path)] if path.suffix == ".sh" else [sys.executable, str(path)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_refused(proc: subprocess.CompletedProcess, *named: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in named:
        assert text in proc.stderr, (text, proc.stderr)


@pytest.mark.parametrize("script, args", [
    ("throughput.py", []), ("memory.py", []), ("handwritten.py", []), ("inference.py", []),
    ("recipe_steps.py", [str(ROOT / "recipes" / "conll_lora.toml")]), ("composition.py", ["--out", "OUT"]),
])
def test_a_missing_data_dir_is_named_not_a_temporary_recipe(script, args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = run_script(BENCH / script, "--data-dir", "/nonexistent", *args)
    assert_refused(proc, "error: --data-dir /nonexistent: does not exist")
    assert "tmp" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_data_dir_without_the_training_file_is_refused(tmp_path):
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "train.txt").write_text("EU B-ORG\n", encoding="utf-8")
    assert_refused(run_script(BENCH / "throughput.py", "--data-dir", str(tmp_path)), "--data-dir", "scientsbank/train.parquet")


def test_a_missing_recipe_is_one_error_line():
    assert_refused(run_script(BENCH / "recipe_steps.py", "/nonexistent.toml"), "error: ", "/nonexistent.toml: file not found")


@pytest.mark.parametrize("script, args", [
    ("loadtest.py", ["--clients", "0"]), ("loadtest.py", ["--smoke", "--repeats", "-1"]),
    ("throughput.py", ["--steps", "0"]), ("memory.py", ["--batch-size", "0"]), ("scaling.py", ["--seq-lens", "64", "0"]),
    ("inference.py", ["--requests", "0"]), ("recipe_steps.py", ["--smoke", "--steps", "0"]),
])
def test_counts_below_one_are_refused_by_argparse(script, args):
    assert_refused(run_script(BENCH / script, *args), f"argument {next(a for a in args if a.startswith('--') and a != '--smoke')}")


def test_loadtest_refuses_an_adapter_folder_that_is_not_there():
    assert_refused(run_script(BENCH / "loadtest.py", "--adapter", "a=/nonexistent"), "--adapter a=/nonexistent")


@pytest.mark.parametrize("script", ["accelerate_overhead.py", "loop_ab.py"])
def test_help_prints_help_and_runs_nothing(script):
    proc = run_script(BENCH / script, "--help", timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ") and proc.stderr == "", proc
    assert " us  accelerate " not in proc.stdout and "ms/step" not in proc.stdout  # no benchmark line


def test_loop_ab_names_a_missing_data_dir():
    assert_refused(run_script(BENCH / "loop_ab.py", "/nonexistent"), "DATA_DIR /nonexistent")


def test_conll_predict_check_refuses_a_missing_file():
    assert_refused(run_script(SCRIPTS / "conll_predict_check.py", "/nonexistent.conll", str(ROOT / "adapters" / "conll_lora")),
                   "/nonexistent.conll")
    assert_refused(run_script(SCRIPTS / "conll_predict_check.py"), "RUN_FILE")


def test_cli_snapshot_without_arguments_writes_nothing(tmp_path):
    proc = run_script(SCRIPTS / "cli_snapshot.sh", cwd=tmp_path)
    assert_refused(proc, "usage: ")
    help_ = run_script(SCRIPTS / "cli_snapshot.sh", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and help_.stdout.startswith("usage: "), help_
    no_venv = tmp_path / "repo"
    no_venv.mkdir()
    assert_refused(run_script(SCRIPTS / "cli_snapshot.sh", str(no_venv), "out", cwd=tmp_path), ".venv/bin/peft-ft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no OUT folder, no snapshot files


def test_gpu_check_help_starts_nothing(tmp_path):
    runs = ROOT / "gpu_check_runs"
    existed = runs.exists()
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--help"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": "false"})  # a python it would call fails loudly
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ") and proc.stderr == "", proc
    assert runs.exists() == existed and not (ROOT / "--help").exists()
    assert_refused(run_script(SCRIPTS / "gpu_check.sh", "-x"), "OUT_DIR '-x'")
