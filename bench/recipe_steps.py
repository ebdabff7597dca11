"""Training speed of a recipe as `peft-ft run` builds it: the model, adapter and fast kernels of
`peft_ft.engine.run.build_model` and the loop of `peft_ft.engine.train.train`, for N steps, no evaluation.

For comparisons on the shipped recipes themselves (bench/throughput.py builds its own recipes), e.g.
float32 against bf16, run alternately so that the machine's drift falls on both:

    for i in 1 2; do
        python bench/recipe_steps.py recipes/conll_lora.toml --steps 200 --set train.mixed_precision=bf16
        python bench/recipe_steps.py recipes/conll_lora.toml --steps 200
    done

Prints the seconds of every `--every` steps and the loop's real tokens/s (`TrainResult`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import check_data_dir, positive_int, run_main, write_smoke_inputs


def measure(recipe_path: str, steps: int, every: int, overrides: list[str], data_dir: str | None) -> dict:
    from peft_ft.data.files import resolve_data_dir
    from peft_ft.engine.device import setup_torch
    from peft_ft.engine.run import build_model
    from peft_ft.engine.train import TrainHooks, train
    from peft_ft.methods import METHODS
    from peft_ft.models.loading import resolve_model
    from peft_ft.recipe.load import load_recipe
    from peft_ft.tasks import TASKS

    recipe = load_recipe(recipe_path, [*overrides, f"train.max_steps={steps}"])
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    data = task.load(recipe, resolve_data_dir(recipe, data_dir))
    device = setup_torch(recipe)
    model, tokenizer, _ = build_model(recipe, task, method, resolve_model(recipe), data, device)
    features = task.encode(data.splits["train"], tokenizer, recipe, data)
    marks = [time.perf_counter()]

    def after_step(model, step: int) -> None:
        if step % every == 0:
            marks.append(time.perf_counter())
            print(f"steps {step - every + 1}-{step}: {marks[-1] - marks[-2]:.1f} s", flush=True)

    result = train(model, features, recipe, lr=recipe.train.lr or method.default_lr, pad_id=tokenizer.pad_token_id or 0,
                   device=device, validate=None, metric="", hooks=TrainHooks(after_step=after_step))
    return {"precision": recipe.train.mixed_precision, "steps": result.steps, "seconds": result.seconds,
            "tokens_per_second": result.tokens / result.seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="a recipe file (not with --smoke)")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--every", type=positive_int, default=50, help="print the time of every N steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    parser.add_argument("--data-dir", help="as `peft-ft run --data-dir`")
    parser.add_argument("--smoke", action="store_true", help="a tiny BERT and a tiny file built here, 2 steps (seconds)")
    args = parser.parse_args(argv)
    if args.data_dir:  # the recipe names its files; the folder itself is checked before any setup
        check_data_dir(args.data_dir, [])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe
        if args.smoke:
            recipe, args.steps, args.every = smoke_recipe(Path(tmp)), 2, 1
        if not recipe:
            parser.error("give a recipe file, or --smoke")
        out = measure(recipe, args.steps, args.every, args.set, args.data_dir)
    print(f"{out['precision']}: {out['steps']} steps in {out['seconds']:.1f} s, {out['tokens_per_second']:.0f} real tok/s")


def smoke_recipe(root: Path) -> str:
    model, data = write_smoke_inputs(root)
    (root / "smoke.toml").write_text(f'''
[model]
name = "{model}"
[task]
type = "ner"
[data]
train = "{Path(data) / 'conll2003' / 'train.txt'}"
[train]
batch_size = 8
threads = 1
''', encoding="utf-8")
    return str(root / "smoke.toml")


if __name__ == "__main__":
    run_main(main)
