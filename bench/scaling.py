"""LoRA against full fine-tuning as the work grows: model size, sequence length and batch size,
side by side in one run; peak memory and real tokens/s per cell, a table and a PNG plot.

Models: the embedded MiniLM-L6 (22.7M parameters) and randomly initialised BERT-base (110M) and
BERT-large (335M) configurations: weights are irrelevant to speed and memory, so nothing is
downloaded. Every cell trains peft-ft's own loop (`peft_ft.engine.train.train`: fused CPU kernels, AdamW,
clipping, the schedule) on synthetic rows of exactly `seq_len` tokens (real tokens = computed tokens),
sequence classification with 2 labels, in its own fresh process so that one cell's peak cannot hide
in another's. Memory is the process's RSS high-water mark on CPU (torch.cuda.max_memory_allocated on
CUDA) from just before training (model built, rows made) to its end; "adds" is peak minus that start.

    python bench/scaling.py --out scaling.md --plot scaling.png                      # the whole grid: hours on CPU
    python bench/scaling.py --models minilm --seq-lens 64 128 --batch-sizes 8 --steps 3   # one corner
    python bench/scaling.py --smoke                                                  # tiny config, seconds

Extra rows (`--variants`): `checkpointing` (train.activation_checkpointing) and `bf16`
(train.mixed_precision; CPU autocast, stock peft layers), for LoRA and full alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from common import PeakMemory, non_negative_int, positive_int, run_main

GOAL = 0.7  # the project's goal: LoRA's peak memory at most 0.7x full fine-tuning's
MODELS = {
    # name: BertConfig overrides (None: the embedded MiniLM-L6 checkpoint)
    "minilm": None,
    "bert-base": {},  # BertConfig's defaults are BERT-base
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},  # --smoke
}
PRELOAD = ["torch", "transformers", "peft", "peft_ft.engine.train", "peft_ft.methods", "common"]


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    seq_len: int
    batch_size: int
    method: str  # lora | full
    variant: str  # plain | checkpointing | bf16
    steps: int
    warmup: int
    threads: int
    device: str

    @property
    def label(self) -> str:
        return f"{self.model} seq {self.seq_len} batch {self.batch_size} {self.method} {self.variant}"


def build_model(name: str, seq_len: int):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    overrides = MODELS[name]
    if overrides is None:
        from peft_ft.models.loading import embedded_model_dir

        return AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=2, dtype=torch.float32)
    config = BertConfig(**overrides, num_labels=2, max_position_embeddings=max(512, seq_len))
    return BertForSequenceClassification(config)


def recipe_for(cell: Cell, max_steps: int, seed: int):
    from peft_ft.recipe.load import build_recipe

    train = {"epochs": 1000, "max_steps": max_steps, "batch_size": cell.batch_size, "threads": cell.threads,
             "device": cell.device, "seed": seed, "warmup": 0.0,
             "activation_checkpointing": cell.variant == "checkpointing",
             "mixed_precision": "bf16" if cell.variant == "bf16" else "no"}
    adapter = {"method": cell.method, **({"dropout": 0.0, "target_modules": ["query", "key", "value", "dense"]}
                                          if cell.method == "lora" else {})}
    return build_recipe({"data": {"train": "synthetic"}, "adapter": adapter, "train": train}, f"scaling {cell.label}")


def run_cell(cell_dict: dict, result_file: str) -> None:
    """In the cell's own process: build, train `warmup` then `steps` steps, write what it measured."""
    import torch

    from peft_ft.engine.precision import FrozenBf16, frozen_bf16
    from peft_ft.engine.run import use_fast_kernels
    from peft_ft.engine.train import train
    from peft_ft.methods import METHODS
    from peft_ft.models.loading import enable_activation_checkpointing

    cell = Cell(**cell_dict)
    torch.set_num_threads(cell.threads)
    device = torch.device(cell.device)
    recipe = recipe_for(cell, cell.warmup, seed=1)
    model = build_model(cell.model, cell.seq_len)
    model = METHODS[cell.method].wrap(model, recipe, ["classifier"], "SEQ_CLS").to(device)
    if frozen_bf16(recipe):  # as `peft-ft run` does: LoRA on CPU keeps a bf16 frozen base; full fine-tuning autocasts
        FrozenBf16.attach(model)
    if cell.variant == "checkpointing":
        enable_activation_checkpointing(model)
    if use_fast_kernels(recipe, device):
        from peft_ft.kernels import install

        install(model)
        model.peft_ft_fast_kernels = True
    generator = torch.Generator().manual_seed(0)
    rows = cell.batch_size * (cell.warmup + cell.steps)
    ids = torch.randint(1000, 30000, (rows, cell.seq_len), generator=generator).tolist()
    features = [{"input_ids": row, "labels": i % 2, "length": cell.seq_len} for i, row in enumerate(ids)]
    common = {"lr": 1e-4, "pad_id": 0, "device": device, "validate": None, "metric": ""}
    memory = PeakMemory(device).start()
    if cell.warmup:
        train(model, features, recipe, **common)
    timed = train(model, features, recipe_for(cell, cell.steps, seed=2), **common)
    result = {"seconds": timed.seconds, "tokens": timed.tokens, "steps": timed.steps, "memory": memory.stop(),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in model.parameters())}
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")


def run_in_child(context, cell: Cell, workdir: Path) -> dict:
    result = workdir / "result.json"
    result.unlink(missing_ok=True)
    child = context.Process(target=run_cell, args=(dataclasses.asdict(cell), str(result)))
    child.start()
    child.join()
    if child.exitcode != 0 or not result.is_file():
        return {"failed": f"exit code {child.exitcode}"}  # e.g. out of memory: the table says so, the grid goes on
    return json.loads(result.read_text(encoding="utf-8"))


def table(results: list[tuple[Cell, dict]]) -> tuple[list[str], list[list], list[str]]:
    """Rows, and the cells where LoRA's peak is at most GOAL x full's."""
    full = {(c.model, c.seq_len, c.batch_size, c.variant): m for c, m in results if c.method == "full" and "failed" not in m}
    columns = ["model", "params", "seq len", "batch", "method", "variant", "steps", "s/step", "real tok/s",
               "start (MiB)", "peak (MiB)", "adds (MiB)", "peak vs full", "adds vs full"]
    rows, reached = [], []
    for c, m in results:
        if "failed" in m:
            rows.append([c.model, "-", c.seq_len, c.batch_size, c.method, c.variant, "-", "-", m["failed"], "-", "-", "-", "-", "-"])
            continue
        start, peak = m["memory"]["before_mib"], m["memory"]["peak_mib"]
        f = full.get((c.model, c.seq_len, c.batch_size, c.variant))
        vs_full = peak / f["memory"]["peak_mib"] if f else None
        adds_vs = (peak - start) / max(1e-9, f["memory"]["peak_mib"] - f["memory"]["before_mib"]) if f else None
        if c.method == "lora" and vs_full is not None and vs_full <= GOAL:
            reached.append(f"{c.label}: {vs_full:.2f}x")
        rows.append([c.model, f"{m['total'] / 1e6:.1f}M", c.seq_len, c.batch_size, c.method, c.variant, m["steps"],
                     f"{m['seconds'] / max(1, m['steps']):.3f}", f"{m['tokens'] / m['seconds']:.0f}" if m["seconds"] else "-",
                     f"{start:.0f}", f"{peak:.0f}", f"{peak - start:.0f}",
                     f"{vs_full:.2f}x" if vs_full is not None else "-", f"{adds_vs:.2f}x" if adds_vs is not None else "-"])
    return columns, rows, reached


COLORS = {"minilm": "tab:blue", "bert-base": "tab:orange", "bert-large": "tab:green", "tiny": "tab:gray"}
MARKERS = {"plain": "o", "checkpointing": "s", "bf16": "^"}


def plot(results: list[tuple[Cell, dict]], path: str) -> None:
    """Peak memory and real tokens/s against sequence length, one line per (model, method, variant, batch):
    colour = model, solid = LoRA / dashed = full, marker = variant, thicker = larger batch."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, (mem_ax, speed_ax) = plt.subplots(1, 2, figsize=(13, 5.5))
    lines: dict = {}
    for c, m in results:
        if "failed" not in m and m["seconds"]:
            key = (c.model, c.method, c.variant, c.batch_size)
            lines.setdefault(key, []).append((c.seq_len, m["memory"]["peak_mib"], m["tokens"] / m["seconds"]))
    batches = sorted({key[3] for key in lines})
    for key, points in sorted(lines.items()):
        model, method, variant, batch = key
        points.sort()
        seq, mem, speed = zip(*points)
        style = {"color": COLORS.get(model), "linestyle": "-" if method == "lora" else "--",
                 "marker": MARKERS.get(variant, "o"), "linewidth": 1 + batches.index(batch),
                 "label": f"{model} {method} {variant} b{batch}"}
        mem_ax.plot(seq, mem, **style)
        speed_ax.plot(seq, speed, **style)
    for ax, what, title in ((mem_ax, "peak memory (MiB)", "Peak memory"), (speed_ax, "real tokens / s", "Training throughput")):
        ax.set(xlabel="sequence length (tokens)", ylabel=what, xscale="log", yscale="log",
               title=f"{title} (solid: LoRA, dashed: full; o plain, s checkpointing, ^ bf16)")
        ax.title.set_fontsize(9)
    speed_ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_from_table(path: str) -> list[tuple[Cell, dict]]:
    """The cells and measurements of a table this script wrote (`--out`), for `--replot`."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    results = []
    for line in lines[2:]:  # after the header and its --- line
        row = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        if row["steps"] == "-":  # a failed cell
            continue
        cell = Cell(row["model"], int(row["seq len"]), int(row["batch"]), row["method"], row["variant"],
                    int(row["steps"]), 0, 0, "cpu")
        results.append((cell, {"seconds": 1.0, "tokens": float(row["real tok/s"]),
                               "memory": {"peak_mib": float(row["peak (MiB)"])}}))
    return results


def cells(args) -> list[Cell]:
    out = []
    for model in args.models:
        for seq_len in args.seq_lens:
            for batch in args.batch_sizes:
                for variant in ["plain", *args.variants]:
                    for method in ("lora", "full"):  # side by side: LoRA, then full, for each setting
                        out.append(Cell(model, seq_len, batch, method, variant, args.steps, args.warmup, args.threads, args.device))
    return out


def main(argv=None) -> None:
    from common import show_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], default=["minilm", "bert-base", "bert-large"])
    parser.add_argument("--seq-lens", nargs="+", type=positive_int, default=[64, 128, 256, 512])
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[8, 32])
    parser.add_argument("--variants", nargs="*", choices=["checkpointing", "bf16"], default=["checkpointing", "bf16"])
    parser.add_argument("--steps", type=positive_int, default=3, help="timed optimizer steps per cell")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before them (inside the memory window)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    parser.add_argument("--plot", help="write the PNG plot to this file")
    parser.add_argument("--replot", metavar="TABLE.md", help="only draw the plot again from a table this script wrote (--out)")
    parser.add_argument("--smoke", action="store_true", help="a tiny BERT config, 2 short sequence lengths, 1 step, "
                        "all in this process (seconds; not a measurement)")
    args = parser.parse_args(argv)
    if args.replot and not Path(args.replot).is_file():
        parser.error(f"argument --replot: {args.replot}: no such file; give a table this script wrote with --out")
    if args.replot:
        plot(results_from_table(args.replot), args.plot or str(Path(args.replot).with_suffix(".png")))
        return
    if args.smoke:
        args.models, args.seq_lens, args.batch_sizes, args.steps, args.warmup = ["tiny"], [16, 32], [4], 1, 1
    context = None if args.smoke else multiprocessing.get_context("forkserver")
    if context is not None:
        context.set_forkserver_preload(PRELOAD)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells(args):
            start = time.perf_counter()
            if context is None:  # --smoke: every cell in this process (seconds, not ~1 min of process start-up)
                run_cell(dataclasses.asdict(cell), str(Path(tmp) / "result.json"))
                results.append((cell, json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))))
            else:
                results.append((cell, run_in_child(context, cell, Path(tmp))))
            print(f"-- {cell.label}: {time.perf_counter() - start:.1f} s", flush=True)
    columns, rows, reached = table(results)
    what = "CUDA allocated" if args.device == "cuda" else "RSS"
    notes = [
        f"{args.device}, {args.threads} thread(s); each cell in its own process: {args.warmup} warm-up + {args.steps} timed "
        f"steps of peft-ft's loop on synthetic rows of exactly seq-len tokens; memory: {what}, start = model built",
        "LoRA r 8, alpha 16, dropout 0, targets query/key/value/dense, head trained; full: every weight; AdamW",
        f"LoRA peak <= {GOAL}x full's in: " + ("; ".join(reached) if reached else "no cell of this run"),
    ] + (["SMOKE: tiny config, every cell in one process (peaks not separated): not a measurement"] if args.smoke else [])
    show_table("LoRA vs full fine-tuning as the work grows", columns, rows, notes, args.out)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    run_main(main)
