"""bench/quality.py end to end on the tiny BERT (`--smoke`): the tables hold every method and column
with the run folders' own numbers, the section replaces only its own markers in RESULTS.md, a second
call resumes, and `--collect` rebuilds the same tables from the run folders. No timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peft_ft.errors import PeftFtError

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import quality  # noqa: E402  (bench scripts import their neighbours by name)

BEFORE = "# Benchmark results\n\n## Training throughput\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
AFTER = "\n\n## Something after\n\nkept as it is.\n"
OLD = f"{quality.BEGIN}\n## Quality: an old table\n\n| stale | row |\n{quality.END}"
SMOKE_ARGS = ["--data", "conll", "scientsbank", "squad",  # [4:] is the part without --data
              "--methods", "full,lora,ia3", "--epochs", "1", "--set", "eval.batch_size=16"]
TITLES = {name: f"### {spec.title}" for name, spec in quality.DATASETS.items()}


def run_quality(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tables(markdown: str) -> dict[str, list[dict]]:
    """{data set name: rows of its table as {column: cell}}."""
    out, current, header = {}, None, None
    for line in markdown.splitlines():
        name = next((n for n, title in TITLES.items() if line == title), None)
        if name:
            current, header = name, None
            out[name] = []
        elif current and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not cells[0].startswith("---"):
                out[current].append(dict(zip(header, cells)))
    return out


def section(markdown: str) -> str:
    return markdown[markdown.index(quality.BEGIN):markdown.index(quality.END)]


def run_folders(out: Path, data: str) -> dict[str, Path]:
    return {p.parent.parent.name.split("-seed")[0]: p.parent for p in (out / data).glob("*-seed*/*/metrics.json")}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    results = tmp / "RESULTS.md"
    results.write_text(BEFORE + OLD + AFTER, encoding="utf-8")
    run_quality("--smoke", "--out-dir", str(tmp / "runs"), "--results", str(results), *SMOKE_ARGS)
    return tmp, results.read_text(encoding="utf-8")


def test_every_method_and_column_from_the_run_folders(smoke):
    tmp, text = smoke
    found = tables(text)
    assert list(found) == ["conll", "scientsbank", "squad"]
    for data, rows in found.items():
        spec = quality.DATASETS[data]
        assert [r["method"] for r in rows] == list(quality.METHODS)  # methods not run are listed, not dropped
        metric_columns = [f"{split} {label}" for split in spec.splits for _, label in spec.metrics]
        assert list(rows[0])[1:1 + len(metric_columns)] == metric_columns
        assert {"trainable", "trainable %", "weights on disk", "lr", "epochs", "train time"} <= set(rows[0])
        vs_full = next(c for c in rows[0] if c.startswith("vs full"))
        folders = run_folders(tmp / "runs", data)
        assert set(folders) == {"full", "lora", "ia3"}
        for row in rows:
            if row["method"] not in folders:
                assert row[metric_columns[0]] == "not run"
                continue
            metrics = json.loads((folders[row["method"]] / "metrics.json").read_text(encoding="utf-8"))
            for split in spec.splits:
                for key, label in spec.metrics:
                    assert row[f"{split} {label}"] == quality.metric_text(spec, metrics[split][key])
            assert row["trainable"] == f"{metrics['params']['trainable_params']:,}"
            assert row["epochs"] == "1 (best 1)"  # --epochs 1 reached every run
            full = json.loads((folders["full"] / "metrics.json").read_text(encoding="utf-8"))
            if row["method"] == "full":
                assert row["trainable %"] == "100.000" and row[vs_full] == "(ref)"
            else:
                gap = (metrics[spec.splits[0]][spec.main] - full[spec.splits[0]][spec.main]) * spec.scale
                assert row[vs_full].split(" / ")[0] == f"{gap:+.2f}"
                assert float(row["trainable %"]) < 100


def test_notes_goal_published_figures_and_commands(smoke):
    tmp, text = smoke
    part = section(text)
    assert "python bench/quality.py --smoke" in part and "--epochs 1" in part  # the command that built it
    assert "torch 2." in part and "cores" in part  # machine and versions
    assert part.count("- Goal: LoRA within 1.0 point of full fine-tuning") == 2  # CoNLL and SciEntsBank, not SQuAD
    assert "F1 0.868" in part and "accuracy 0.72, macro-F1 0.63" in part
    command_lines = [line for line in part.splitlines() if line.startswith(("- full:", "- lora:", "- ia3:"))]
    assert len(command_lines) == 9
    for line in command_lines:  # each row says how to train it again, overrides included
        assert "peft-ft run recipes/" in line and "--set train.epochs=1" in line and "--set eval.batch_size=16" in line
        assert "--set train.threads=1" in line
    assert any("'adapter.method=\"ia3\"'" in line for line in command_lines)


def test_section_replaces_only_its_own_markers(smoke):
    _, text = smoke
    assert text.startswith(BEFORE) and text.endswith(AFTER)
    assert text.count(quality.BEGIN) == 1 and text.count(quality.END) == 1
    assert "an old table" not in text and "stale" not in text


def test_section_is_appended_to_a_file_without_markers_and_refused_with_broken_ones(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE, encoding="utf-8")
    new = f"{quality.BEGIN}\nnew\n{quality.END}\n"
    quality.write_section(path, new)
    assert path.read_text(encoding="utf-8") == BEFORE.rstrip("\n") + "\n\n" + new
    quality.write_section(path, new.replace("new", "newer"))  # the second write replaces the first
    assert path.read_text(encoding="utf-8") == BEFORE.rstrip("\n") + "\n\n" + new.replace("new", "newer")
    path.write_text(BEFORE + quality.BEGIN + "\n", encoding="utf-8")
    with pytest.raises(PeftFtError, match="expected one"):
        quality.write_section(path, new)


def test_second_call_resumes_and_collect_rebuilds_the_tables(smoke):
    tmp, text = smoke
    before = {d: run_folders(tmp / "runs", d) for d in ("conll", "squad")}
    results = tmp / "again.md"
    # In this process (torch is imported already): only the resume is tested here, not the script's start.
    assert quality.main(["--smoke", "--out-dir", str(tmp / "runs"), "--results", str(results), *SMOKE_ARGS[4:], "--data", "conll"]) == 0
    assert {d: run_folders(tmp / "runs", d) for d in ("conll", "squad")} == before  # nothing trained again
    assert tables(results.read_text(encoding="utf-8")) == {"conll": tables(text)["conll"]}

    collected = tmp / "collected.md"  # a new file: the section is its only content
    run_quality("--collect", str(tmp / "runs" / "conll"), *map(str, before["squad"].values()), "--results", str(collected))
    out = collected.read_text(encoding="utf-8")
    assert out.startswith(quality.BEGIN)
    found = tables(out)
    assert found == {d: tables(text)[d] for d in ("conll", "squad")}
    assert "Not in this table: scientsbank" in out and "--collect" in out
