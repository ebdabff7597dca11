"""The benchmark scripts run end to end (`--smoke`: tiny BERT and tiny data built in code) and
print a table with every configuration and positive numbers. No timings are asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
