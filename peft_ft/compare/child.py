"""One variant of `peft-ft compare`, in a process of its own (`python -m peft_ft.compare.child VARIANT.toml`): train
it, then record its peak memory and the evaluation latency of the reloaded model in `compare.json`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from peft_ft.compare.variants import LATENCY_EXAMPLES, MEASURE_FILE
from peft_ft.data.files import Split, resolve_data_dir
from peft_ft.engine.device import setup_torch
from peft_ft.engine.run import resume, run
from peft_ft.errors import PeftFtError
from peft_ft.recipe.load import load_recipe
from peft_ft.rundir.layout import METRICS, read_metrics, read_recipe
from peft_ft.rundir.load import load_run
from peft_ft.storage import write_json
from peft_ft.tasks import TASKS


def measure_latency(run_dir: Path, data_dir: str | None, rows: int = LATENCY_EXAMPLES) -> dict:
    """Milliseconds per example to predict the first test split's first `rows` examples (or
    validation's), on the reloaded model, batched as in evaluation, after one warm-up batch."""
    import torch

    recipe = read_recipe(run_dir)
    task = TASKS[recipe.task.type]
    device = setup_torch(recipe)
    data = task.load(recipe, None if recipe.data.hub else resolve_data_dir(recipe, data_dir))
    name = next((n for n in data.eval_names if n != "validation"), None) or next(iter(data.eval_names), "train")
    split = Split(name, data.splits[name].source, data.splits[name].examples[:rows])
    # A run this comparison trained from the recipe given on its command line: that recipe's own say on remote code.
    model, tokenizer, _ = load_run(run_dir, str(device), trust_remote_code=recipe.model.trust_remote_code)
    features = task.encode(split, tokenizer, recipe, data)
    pad_id, batch_size = tokenizer.pad_token_id or 0, recipe.eval.batch_size
    task.predict(model, features[:batch_size], pad_id, batch_size, device)  # warm-up: first-call allocations
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    task.predict(model, features, pad_id, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"eval_latency_ms": round(1000 * seconds / len(split.examples), 4), "latency_split": name,
            "latency_examples": len(split.examples), "latency_batch_size": batch_size, "device": device.type}


def child_main(argv: list[str], shared_process: bool = False) -> int:
    """Train one variant recipe, then record its peak memory and eval latency beside its metrics."""

    parser = argparse.ArgumentParser(prog="python -m peft_ft.compare.child", description="one variant of peft-ft compare")
    parser.add_argument("recipe")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this variant's interrupted run folder")
    args = parser.parse_args(argv)
    try:
        import torch

        if shared_process and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier one's
        if args.resume and (Path(args.resume) / METRICS).is_file():
            run_dir = Path(args.resume)  # trained to its end outside compare (`peft-ft run --resume`): measured only
        elif args.resume:
            run_dir = resume(args.resume, data_dir=args.data_dir)
        else:
            run_dir = run(load_recipe(args.recipe), data_dir=args.data_dir)

        train = read_metrics(run_dir)["train"]
        if train.get("peak_cuda_mib"):  # torch.cuda.max_memory_allocated over training, measured by the loop
            memory = {"peak_memory_mib": train["peak_cuda_mib"], "memory_kind": "cuda max allocated"}
        else:  # measured at the end of training, before the test splits and the latency run below
            kind = "peak RSS (shared process: cumulative)" if shared_process else "peak RSS"
            memory = {"peak_memory_mib": train["peak_rss_mib"], "memory_kind": kind}
        write_json(run_dir / MEASURE_FILE, {**memory, **measure_latency(run_dir, args.data_dir)})
    except PeftFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (or the parent's SIGTERM): the run wrote its checkpoint; no traceback
        if shared_process:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
