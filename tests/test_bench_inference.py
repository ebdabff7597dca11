"""`bench/inference.py --smoke` runs end to end (tiny BERT adapters trained in the run) and prints its
three tables complete: every adapter and model, every column a number. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
ADAPTERS = ["pos", "flip", "ner"]  # the smoke adapters of bench/loadtest.py
MODELS = ["base", "unmerged", "merged (memory)", "merged (folder)"]


def tables(markdown: str) -> dict[str, list[dict]]:
    """{title: rows as dicts} of every markdown table in the file."""
    out: dict[str, list[dict]] = {}
    for section in markdown.split("## ")[1:]:
        title, *lines = section.splitlines()
        lines = [line for line in lines if line.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        out[title] = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return out


def number(text: str) -> float:
    return float(text.rstrip("x").replace(",", ""))


def test_inference_smoke(tmp_path):
    out = tmp_path / "inference.md"
    proc = subprocess.run([sys.executable, str(BENCH / "inference.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = out.read_text(encoding="utf-8")
    found = tables(markdown)
    assert list(found) == ["Inference speed", "Adapter switch vs reload", "Model load time"]

    speed = found["Inference speed"]
    # --smoke exports ONNX for the first adapter only (each export costs ~30 s)
    expected = [(a, m) for a in ADAPTERS for m in [*MODELS, *(["onnxruntime"] if a == ADAPTERS[0] else [])]]
    assert [(r["adapter"], r["model"]) for r in speed] == expected
    for r in speed:
        for column in ("p50 ms", "p90 ms", "texts/s b1", "texts/s b8", "texts/s b32"):
            assert number(r[column]) > 0, (r, column)
        for column in ("latency vs base", "b1 rate vs base", "b8 rate vs base", "b32 rate vs base"):
            assert number(r[column]) > 0, (r, column)
            if r["model"] == "base":
                assert r[column] == "1.00x"
        assert number(r["p90 ms"]) >= number(r["p50 ms"])
        if r["model"] in ("base", "unmerged"):
            assert r["max abs logit diff vs unmerged"] == {"base": "-", "unmerged": "reference"}[r["model"]]
        else:  # merging changes float rounding only: the timings compare the same computation
            assert number(r["max abs logit diff vs unmerged"]) < 1e-4, r

    switching = found["Adapter switch vs reload"]
    assert [(r["adapter"], r["level"]) for r in switching] == [(a, lv) for a in ADAPTERS for lv in ["model"] * 3 + ["AdapterSet"] * 2]
    for r in switching:
        assert number(r["n"]) >= 1 and number(r["p50 ms"]) > 0 and number(r["vs switch"]) > 0, r
    # pos and flip share a base (same head class and size) and switch to each other; ner has no such partner
    operations = [r["operation"] for r in switching]
    assert "set_adapter (pos <-> flip) + forward" in operations
    assert "set_adapter (ner <-> ner_copy) + forward" in operations

    loading = found["Model load time"]
    assert [(r["adapter"], r["model"]) for r in loading] == [(a, m) for a in ADAPTERS for m in MODELS]
    for r in loading:
        assert number(r["loads"]) >= 1 and number(r["p50 ms"]) > 0 and number(r["vs base"]) > 0, r

    # the notes: environment and what the inputs were
    for text in ("1 torch thread(s)", "torch ", "transformers ", "peft ", "SMOKE", "rows of train"):
        assert text in markdown, text
