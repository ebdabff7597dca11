"""Training speed of peft-ft against the script a user would write instead, side by side in one run.

Same model (the embedded MiniLM-L6), same data, same batch size (32), same LoRA setting (r 8,
alpha 16, dropout 0.1 on query/key/value/dense) for:
  peft-ft     its own loop (length-grouped batches padded to their longest row), LoRA and full
  trainer     transformers.Trainer + peft with dynamic padding, random order and length-grouped, LoRA and full
  trainer     the seeds' approach: every row padded to 512 tokens (random order), LoRA
on SciEntsBank (pair classification) and CoNLL-2003 (NER). Each configuration runs `--warmup`
untimed steps, then `--steps` timed ones. Printed: real (non-padding) tokens/s and samples/s,
their ratio to peft-ft with the same method, the share of computed tokens that were real, and the
share of the CPU's measured matmul FLOP/s that training reached (formula: bench/README.md).

    python bench/throughput.py --steps 30 --out throughput.md
"""

from __future__ import annotations

import argparse
import gc
import re
import tempfile
import time
from pathlib import Path

from common import (
    LORA,
    Config,
    Options,
    add_option_arguments,
    machine_line,
    matmul_peak,
    ner_registered,
    options_from,
    positive_float,
    run_main,
    run_peft_ft,
    show_table,
    train_flops,
    write_smoke_inputs,
)

# (runner, method, batching) for each data set, peft-ft first: it is what the ratios divide by.
CONFIGS = [
    ("peft-ft", "lora", "grouped"),
    ("peft-ft", "full", "grouped"),
    ("peft-ft", "lora", "stock-layers"),
    ("trainer", "lora", "random"),
    ("trainer", "lora", "grouped"),
    ("trainer", "lora", "pad512"),
    ("trainer", "full", "random"),
    ("trainer", "full", "grouped"),
]
COLUMNS = ["data", "runner", "method", "batches", "steps", "s/step", "samples/s", "real tok/s",
           "tok/s vs peft-ft", "samples/s vs peft-ft", "real/computed tokens", "% of matmul peak"]


def configs(datasets: list[str], only: str) -> tuple[list[Config], list[str]]:
    """The configurations to run, and notes on the ones left out."""
    chosen, notes = [], []
    for data in datasets:
        for runner, method, batching in CONFIGS:
            cfg = Config(data, runner, method, batching)
            if only and not re.search(only, cfg.label):
                continue
            if data == "conll" and runner == "peft-ft" and not ner_registered():
                notes.append(f"skipped {cfg.label}: peft-ft has no \"ner\" task family registered yet")
                continue
            chosen.append(cfg)
    return chosen, notes


def measure(cfg: Config, opts: Options, workdir: Path):
    from handwritten import run_trainer

    measured = (run_peft_ft if cfg.runner == "peft-ft" else run_trainer)(cfg, opts, workdir)
    gc.collect()  # the next configuration starts without this one's model and optimizer
    return measured


def table_rows(results: list[tuple[Config, object]], peak: float) -> list[list]:
    base = {(c.data, c.method): m for c, m in results if c.runner == "peft-ft" and c.batching == "grouped"}
    rows = []
    for cfg, m in results:
        tok_s, samples_s = m.tokens / m.seconds, m.samples / m.seconds
        ref = base.get((cfg.data, cfg.method))
        tok_ratio = f"{tok_s / (ref.tokens / ref.seconds):.2f}x" if ref else "-"
        samples_ratio = f"{samples_s / (ref.samples / ref.seconds):.2f}x" if ref else "-"
        share = train_flops(m.dims, cfg.method, m.lengths) / m.seconds / peak
        rows.append([cfg.data, cfg.runner, cfg.method, cfg.batching, m.steps, f"{m.seconds / m.steps:.3f}",
                     f"{samples_s:.1f}", f"{tok_s:.0f}", tok_ratio, samples_ratio,
                     f"{m.tokens / m.computed_tokens:.3f}", f"{100 * share:.1f}"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=["scientsbank", "conll"], default=["scientsbank", "conll"])
    parser.add_argument("--only", default="", help="regular expression on 'data runner method batches', e.g. 'lora'")
    parser.add_argument("--peak-seconds", type=positive_float, default=1.0, help="length of each matmul peak measurement")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT and tiny data built in code, 2 steps each (seconds)")
    add_option_arguments(parser, steps=20, warmup=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.model, args.data_dir = write_smoke_inputs(Path(tmp))
            args.steps, args.warmup, args.batch_size, args.peak_seconds = 2, 1, 8, 0.05
        opts = options_from(args, args.data)
        chosen, notes = configs(args.data, args.only)
        # The peak is measured before every configuration and after the last: the machine's peak is
        # the best of them, and a wide spread says other work competed for the CPU meanwhile.
        peaks, results = [], []
        for cfg in chosen:
            peaks.append(matmul_peak(opts.threads, args.peak_seconds, device=opts.device))
            start = time.perf_counter()
            results.append((cfg, measure(cfg, opts, Path(tmp))))
            print(f"-- {cfg.label}: done in {time.perf_counter() - start:.1f} s (setup included)", flush=True)
        peaks.append(matmul_peak(opts.threads, args.peak_seconds, device=opts.device))
    peak = max(peaks)
    notes = [
        machine_line(opts),
        f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32 2048x384 @ 384x1536, {opts.threads} thread(s); best of "
        f"{len(peaks)} measurements around the configurations, lowest {min(peaks) / 1e9:.1f}: a wide spread means a busy machine)",
        f"batch {opts.batch_size}; LoRA r {LORA['r']}, alpha {LORA['alpha']}, dropout {opts.lora_dropout:g}; "
        + ("activation checkpointing on (every runner); " if opts.activation_checkpointing else "")
        + ("bf16 (peft-ft: train.mixed_precision, LoRA with a bf16 frozen base; Trainer: bf16=True autocast; "
           "% of matmul peak is against the float32 peak); " if opts.mixed_precision == "bf16" else "")
        + f"{opts.warmup} untimed warm-up steps, then up to {opts.steps} timed steps"
        + (f" or {opts.max_seconds:g} s" if opts.max_seconds else "") + (" (SMOKE: tiny model, tiny data)" if args.smoke else ""),
        "ratios: this row's rate / peft-ft's with the same data and method; real/computed: non-padding share of the padded batches",
        *notes,
    ]
    show_table("Training throughput", COLUMNS, table_rows(results, peak), notes, args.out)


if __name__ == "__main__":
    run_main(main)
