"""A/B of the training loop between two checkouts: from each checkout, `PYTHONPATH=. python bench/loop_ab.py [DATA_DIR]`: MiniLM + LoRA (fast kernels, dropout 0) on
CoNLL, batch 32, 1 thread; process CPU time and wall time of train() for 2 warm-up + 10 steps."""
import argparse
import time
from pathlib import Path

from common import check_data_dir, run_main

sets = ["train.threads=1", "adapter.dropout=0.0", "data.max_train_samples=1024", "train.epochs=1"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", nargs="?", metavar="DATA_DIR", help="data folder holding conll2003/ (default: peft-ft's)")
    args = parser.parse_args(argv)
    if args.data_dir:  # before the libraries load: a wrong folder is named at once
        check_data_dir(args.data_dir, ["conll"], option="DATA_DIR")
    # Imported here, not at the top, so --help answers without loading torch.
    import peft_ft
    from peft_ft.engine.device import setup_torch
    from peft_ft.engine.run import build_model
    from peft_ft.engine.train import train
    from peft_ft.methods import METHODS
    from peft_ft.models.loading import resolve_model
    from peft_ft.recipe.load import load_recipe
    from peft_ft.tasks import TASKS

    def recipe(steps, seed):
        return load_recipe("recipes/conll_lora.toml", sets + [f"train.max_steps={steps}", f"train.seed={seed}"])
    warm = recipe(2, 42)
    task, method = TASKS[warm.task.type], METHODS[warm.adapter.method]
    data = task.load(warm, Path(args.data_dir) if args.data_dir else None)  # default: peft-ft's data dir
    device = setup_torch(warm)
    model, tok, _ = build_model(warm, task, method, resolve_model(warm), data, device)
    feats = task.encode(data.splits["train"], tok, warm, data)
    common = dict(lr=1e-3, pad_id=tok.pad_token_id or 0, device=device, validate=None, metric="")
    train(model, feats, warm, **common)
    for seed in (43, 44, 45):
        c, w = time.process_time(), time.perf_counter()
        r = train(model, feats, recipe(10, seed), **common)
        c, w = time.process_time() - c, time.perf_counter() - w
        print(f"{Path(peft_ft.__file__).parent.parent.name}: seed {seed} cpu {c / r.steps * 1000:.0f} ms/step, wall {w / r.steps * 1000:.0f} ms/step, loop clock {r.seconds / r.steps * 1000:.0f} ms/step, tokens {r.tokens}", flush=True)


if __name__ == "__main__":
    run_main(main)
