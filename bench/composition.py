"""Composition, measured (issue 26): two SciEntsBank LoRA adapters trained on the two halves of the training
data, combined with `peft-ft merge --combine` / `predict --combine`, against each half alone and against one
adapter trained on both halves.

    python bench/composition.py --out /work/composition [--epochs 6] [--threads 2]

1. The training file is split once (seeded, stratified by label): 10 % validation shared by every run, the
   rest into halves A and B (written as parquet under OUT/data; the test files are linked, never copied).
2. `peft-ft run recipes/scientsbank_lora.toml` on A, on B, and on A+B ("joint"), each with that validation
   file (runs found finished in OUT/runs are kept).
3. A and B combined five ways (peft_ft.serving.combine): cat (0.5, 0.5) = the average of the two updates,
   cat (1, 1) = both stacked, linear (0.5, 0.5), ties and dare_ties (0.5, 0.5, density 0.5).
4. Every adapter answers the three test splits through `AdapterSet` (what predict and serve run), scored with
   the runs' own metric function; the halves' and joint's numbers are checked against their metrics.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import check_data_dir, default_data_dir, positive_int, run_main

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("test_ua", "test_uq", "test_ud")
COMBINATIONS = [("avg (cat 0.5/0.5)", "cat", 0.5, None), ("stack (cat 1/1)", "cat", 1.0, None),
                ("linear 0.5/0.5", "linear", 0.5, None), ("ties 0.5/0.5, density 0.5", "ties", 0.5, 0.5),
                ("dare_ties 0.5/0.5, density 0.5", "dare_ties", 0.5, 0.5)]


def split_data(source: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """validation / half_a / half_b / joint parquet files under out/scientsbank; the test files linked."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(source / "scientsbank" / "train.parquet")
    rng = np.random.default_rng(seed)
    parts = {"validation": [], "half_a": [], "half_b": []}
    for _, rows in frame.groupby("label"):
        index = rng.permutation(rows.index.to_numpy())
        held = round(0.1 * len(index))
        parts["validation"] += list(index[:held])
        rest = index[held:]
        parts["half_a"] += list(rest[0::2])  # alternate rows: each label split evenly between the halves
        parts["half_b"] += list(rest[1::2])
    parts["joint"] = parts["half_a"] + parts["half_b"]
    folder = out / "scientsbank"
    folder.mkdir(parents=True, exist_ok=True)
    for name, index in parts.items():
        frame.loc[sorted(index)].to_parquet(folder / f"{name}.parquet", index=False)
    for split in SPLITS:
        link = folder / f"{split}.parquet"
        if not link.exists():
            link.symlink_to((source / "scientsbank" / f"{split}.parquet").resolve())
    return {name: len(index) for name, index in parts.items()}


def train(name: str, data: Path, runs: Path, epochs: int, threads: int) -> Path:
    """One `peft-ft run` on data/scientsbank/<name>.parquet (skipped when a finished run is there)."""
    done = sorted(p.parent for p in (runs / name).glob("*/metrics.json"))
    if done:
        return done[-1]
    sets = {"data.dir": f'"{data}"', "data.train": f'"scientsbank/{name}.parquet"',
            "data.validation": '"scientsbank/validation.parquet"', "data.validation_fraction": "0",
            "train.epochs": str(epochs), "train.threads": str(threads), "output.dir": f'"{runs}"', "output.name": f'"{name}"',
            "eval.predictions": "false"}
    command = [sys.executable, "-m", "peft_ft", "run", str(REPO / "recipes" / "scientsbank_lora.toml")]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    started = time.monotonic()
    subprocess.run(command, check=True)
    print(f"{name}: trained in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return sorted(p.parent for p in (runs / name).glob("*/metrics.json"))[-1]


def evaluate(folders: dict[str, Path], data: Path) -> dict[str, dict[str, dict]]:
    """name -> split -> metrics, every folder answering through one AdapterSet (one shared base)."""
    import pandas as pd

    from peft_ft.serving.predict import AdapterSet
    from peft_ft.tasks.classification import classification_metrics

    keys = {name: f"adapter{i}" for i, name in enumerate(folders)}  # adapter names are URL-safe; the table's are prose
    adapters = AdapterSet({keys[name]: str(f) for name, f in folders.items()}, batch_size=64)
    labels = adapters.get(keys[next(iter(folders))]).info["labels"]
    results: dict[str, dict[str, dict]] = {name: {} for name in folders}
    for split in SPLITS:
        frame = pd.read_parquet(data / "scientsbank" / f"{split}.parquet")
        rows = [{"text": r.reference_answer, "text_pair": r.student_answer} for r in frame.itertuples()]
        gold = frame["label"].tolist()
        for name in folders:
            predicted = [labels.index(a["label"]) for a in adapters.answer(keys[name], rows)]
            results[name][split] = classification_metrics(gold, predicted, labels)
    return results


def table(results: dict[str, dict[str, dict]], notes: dict[str, str]) -> str:
    head = "| adapter | " + " | ".join(f"{s} macro-F1 | {s} acc" for s in SPLITS) + " | made by |"
    lines = [head, "|" + " --- |" * (2 + 2 * len(SPLITS))]
    for name, by_split in results.items():
        cells = [f"{by_split[s]['macro_f1']:.4f} | {by_split[s]['accuracy']:.4f}" for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {notes[name]} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder: data halves, runs, combined adapters, the table")
    parser.add_argument("--data-dir", default="", help="data folder holding scientsbank/ (default: peft-ft's, ../shared/data)")
    parser.add_argument("--epochs", type=positive_int, default=6)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    check_data_dir(data_dir, ["scientsbank"], given=bool(args.data_dir))  # before OUT gets anything

    import json

    from peft_ft.serving.combine import combine_runs

    out = Path(args.out).resolve()
    data = out / "data"
    sizes = split_data(Path(data_dir), data)
    print(f"rows: {sizes}", file=sys.stderr)
    runs = {name: train(name, data, out / "runs", args.epochs, args.threads) for name in ("half_a", "half_b", "joint")}
    folders = {"A (half_a alone)": runs["half_a"], "B (half_b alone)": runs["half_b"]}
    notes = {"A (half_a alone)": f"`peft-ft run` on {sizes['half_a']} rows", "B (half_b alone)": f"`peft-ft run` on {sizes['half_b']} rows"}
    for label, how, weight, density in COMBINATIONS:
        folder = out / "combined" / label.split(" ")[0]
        if not (folder / "peft_ft.json").is_file():
            combine_runs([("a", runs["half_a"], weight), ("b", runs["half_b"], weight)], how, folder, density)
        folders[f"A + B: {label}"] = folder
        notes[f"A + B: {label}"] = f"`--combine a=A:{weight:g},b=B:{weight:g} --how {how}`" + (f" `--density {density}`" if density else "")
    folders["joint (A and B in one run)"] = runs["joint"]
    notes["joint (A and B in one run)"] = f"`peft-ft run` on {sizes['joint']} rows"
    started = time.monotonic()
    results = evaluate(folders, data)
    print(f"evaluated {len(folders)} adapters on {', '.join(SPLITS)} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for name in ("A (half_a alone)", "B (half_b alone)", "joint (A and B in one run)"):  # the runs' own scoring agrees
        own = json.loads((folders[name] / "metrics.json").read_text())
        for split in SPLITS:
            assert abs(own[split]["macro_f1"] - results[name][split]["macro_f1"]) < 1e-9, (name, split)
    text = table(results, notes)
    (out / "composition.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
