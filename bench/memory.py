"""Peak training memory of full fine-tuning against LoRA, for peft-ft and for the hand-written
Trainer + peft script, on the same recipe.

Each configuration runs in its own fresh process (forked from a server that has only imported the\nlibraries), so one peak cannot hide in another's.
Every configuration trains on the same first `steps x batch` training rows for one whole epoch
(plus one warm-up step), length-grouped: every one of them meets the widest batch, which sets the
activation peak. Measured from just before training (model, data and tokenization in place) to
its end: on CPU the process's RSS high-water mark, on CUDA torch.cuda.max_memory_allocated.

    python bench/memory.py --steps 20 --out memory.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import (
    Config,
    Measured,
    Options,
    add_option_arguments,
    machine_line,
    ner_registered,
    options_from,
    run_main,
    show_table,
    write_smoke_inputs,
)

CONFIGS = [("peft-ft", "lora"), ("peft-ft", "full"), ("trainer", "lora"), ("trainer", "full")]


# Imported once by the fork server; each configuration's process is forked from it, fresh (it has
# run nothing), without paying ~5-10 s of imports per configuration.
PRELOAD = ["torch", "transformers", "transformers.trainer", "peft", "datasets", "peft_ft.engine.train", "peft_ft.tasks",
           "common", "handwritten"]


def run_one(cfg: dict, opts: dict, result_file: str) -> None:
    """In the configuration's own process: train it, write what it measured as JSON."""
    from peft_ft.errors import PeftFtError

    cfg, opts = Config(**cfg), Options(**opts)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.runner == "peft-ft":
                from common import run_peft_ft

                measured = run_peft_ft(cfg, opts, Path(tmp))
            else:
                from handwritten import run_trainer

                measured = run_trainer(cfg, opts, Path(tmp))
    except PeftFtError as e:  # the user's to fix (a bad data file): the parent prints it as one line, no traceback
        Path(result_file).write_text(json.dumps({"error": str(e)}), encoding="utf-8")
        return
    Path(result_file).write_text(json.dumps(measured.to_dict()), encoding="utf-8")


def process_context():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_in_child(context, cfg: Config, opts: Options, workdir: Path) -> Measured:
    result = workdir / "result.json"
    result.unlink(missing_ok=True)
    child = context.Process(target=run_one, args=(dataclasses.asdict(cfg), dataclasses.asdict(opts), str(result)))
    child.start()
    child.join()
    if child.exitcode != 0 or not result.is_file():
        raise SystemExit(f"{cfg.label}: its process failed (exit code {child.exitcode}; its traceback is above)")
    measured = json.loads(result.read_text(encoding="utf-8"))
    if "error" in measured:
        from peft_ft.errors import PeftFtError

        raise PeftFtError(measured["error"])
    return Measured(**measured)


def table_rows(results: list[tuple[Config, Measured]]) -> list[list]:
    by_key = {(c.data, c.runner, c.method): m for c, m in results}
    rows = []
    for cfg, m in results:
        peak, before = m.memory["peak_mib"], m.memory["before_mib"]
        full = by_key.get((cfg.data, cfg.runner, "full"))
        ours = by_key.get((cfg.data, "peft-ft", cfg.method))
        rows.append([
            cfg.data, cfg.runner, cfg.method, f"{m.params['trainable']:,}", m.steps, max(m.widths),
            f"{before:.0f}", f"{peak:.0f}", f"{peak - before:.0f}",
            f"{peak / full.memory['peak_mib']:.2f}x" if full else "-",
            f"{(peak - before) / (full.memory['peak_mib'] - full.memory['before_mib']):.2f}x" if full else "-",
            f"{peak / ours.memory['peak_mib']:.2f}x" if ours else "-",
        ])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=["scientsbank", "conll"], default=["scientsbank", "conll"])
    parser.add_argument("--out", help="also write the table as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT and tiny data built in code, 2 steps each (seconds)")
    add_option_arguments(parser, steps=10, warmup=1)
    args = parser.parse_args(argv)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.model, args.data_dir = write_smoke_inputs(Path(tmp))
            args.steps, args.batch_size = 2, 8
        args.max_train_samples = args.steps * args.batch_size  # one epoch of `steps` batches
        args.warmup, args.max_seconds = 1, 0.0
        opts = options_from(args, args.data)
        results, context = [], process_context()
        for data in args.data:
            for runner, method in CONFIGS:
                cfg = Config(data, runner, method, "grouped")
                if data == "conll" and runner == "peft-ft" and not ner_registered():
                    notes.append(f"skipped {cfg.label}: peft-ft has no \"ner\" task family registered yet")
                    continue
                start = time.perf_counter()
                results.append((cfg, run_in_child(context, cfg, opts, Path(tmp))))
                print(f"-- {cfg.label}: done in {time.perf_counter() - start:.1f} s (own process)", flush=True)
    kind = results[0][1].memory["kind"] if results else "rss"
    what = "RSS" if kind == "rss" else "CUDA allocated"
    columns = ["data", "runner", "method", "trainable params", "steps", "widest batch", f"{what} before (MiB)",
               f"peak {what} (MiB)", "training adds (MiB)", "peak vs full", "adds vs full", "peak vs peft-ft"]
    notes = [
        machine_line(opts),
        f"each configuration in its own process; the first {opts.max_train_samples} training rows, batch {opts.batch_size}, "
        f"length-grouped, 1 warm-up step + one epoch ({opts.steps} steps); LoRA dropout {opts.lora_dropout:g}"
        + ("; activation checkpointing on (every runner)" if opts.activation_checkpointing else "")
        + (" (SMOKE: tiny model, tiny data)" if args.smoke else ""),
        "before: after model, adapter and tokenized data are in place; peak: the highest point during training",
        *notes,
    ]
    show_table(f"Peak training memory ({what})", columns, table_rows(results), notes, args.out)


if __name__ == "__main__":
    run_main(main)
