"""`peft-ft`: a table from subcommand to the function that runs it and the one that adds its arguments.
Each command imports its module when it runs (see COMMANDS), so that `--help`, `validate` and `explain` stay instant."""

from __future__ import annotations

import argparse
import math
import os
import sys

from peft_ft.engine.distributed import finish, is_main, world
from peft_ft.errors import PeerLost, PeftFtError, Terminated
from peft_ft.storage import machine_problem
from peft_ft.version import __version__


def cmd_run(args) -> int:
    ended = False
    try:
        code = _run_or_resume(args)
        ended = True
        return code
    finally:
        finish(together=ended)


def _run_or_resume(args) -> int:
    from peft_ft.engine.run import resume, run
    from peft_ft.engine.train import sigterm_as_interrupt
    from peft_ft.recipe.load import load_recipe

    if args.resume:
        if args.recipe or args.set:
            raise PeftFtError("--resume RUN_DIR continues with the run's own recipe.toml: give no recipe and no --set")
        with sigterm_as_interrupt():  # SIGTERM while loading or saving ends through the run's handlers, as Ctrl-C
            run_dir = resume(args.resume, data_dir=args.data_dir, trust_remote_code=args.trust_remote_code)
    elif not args.recipe:
        raise PeftFtError("give a recipe (peft-ft run recipes/NAME.toml) or --resume RUN_DIR")
    elif args.trust_remote_code:  # a new run follows its recipe's key; a flag doing nothing would mislead
        raise PeftFtError("--trust-remote-code is for --resume; a new run follows the recipe: set model.trust_remote_code = true "
                          "in it (or --set model.trust_remote_code=true)")
    else:
        with sigterm_as_interrupt():
            run_dir = run(load_recipe(args.recipe, args.set), data_dir=args.data_dir)
    if is_main():  # under torchrun every process returns here; one line is enough
        print(f"done: {run_dir}")
    return 0


def cmd_validate(args) -> int:
    from peft_ft.recipe.load import load_recipe

    # The recipe before the runner's imports: a bad key answers at once.
    recipe = load_recipe(args.recipe, args.set)
    from peft_ft.engine.run import preflight

    # `run`'s pre-flight: what validate passes, run does not refuse before training (quick: a method's own probe
    # is skipped on the model types it is known to pass, keeping validate under a second).
    model, data, _ = preflight(recipe, args.data_dir, quick=True)
    print(f"{args.recipe}: valid")
    print(f"  task {recipe.task.type}, method {recipe.adapter.method}, model {model}")
    for name, split in data.splits.items():
        print(f"  {name}: {split.source} ({len(split.examples)} examples)")
    if data.labels:
        print(f"  labels: {', '.join(data.labels[:20])}{' ...' if len(data.labels) > 20 else ''}")
    for note in data.notes:  # rows dropped or converted: what `run` logs, seen before training
        print(f"  note: {note}")
    return 0


def cmd_explain(args) -> int:
    from peft_ft.recipe.explain import explain

    print(explain(args.section))
    return 0


def cmd_merge(args) -> int:
    if args.combine:
        from peft_ft.serving.combine import combine_runs, parse_combine

        if args.run_dir:
            raise PeftFtError("give either RUN_DIR (fold one adapter into its base) or --combine (several adapters into one), not both")
        print(f"combined: {combine_runs(parse_combine(args.combine), args.how, args.out, args.density, allow_pickle=args.allow_pickle)}")
        return 0
    if args.how != "linear" or args.density is not None:
        raise PeftFtError("--how and --density apply to --combine")
    if not args.run_dir:
        raise PeftFtError("give a run folder (peft-ft merge RUN_DIR --out DIR) or --combine NAME=RUN_DIR:WEIGHT,...")
    from peft_ft.serving.merge import merge_run

    print(f"merged: {merge_run(args.run_dir, args.out, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)}")
    return 0


def cmd_predict(args) -> int:
    from peft_ft.serving.predict import run_predict

    n = run_predict(args.adapter, args.input, args.format, args.use, args.adapter_field, args.output, args.batch_size, args.device,
                    allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, combine=args.combine, how=args.how,
                    density=args.density)
    if args.output:
        print(f"{n} predictions: {args.output}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from peft_ft.compare.runner import compare
    from peft_ft.compare.variants import parse_methods

    out = compare(args.recipes, parse_methods(args.methods), args.seeds, args.lr, args.set, args.out, args.resume, args.data_dir)
    print(f"comparison: {out}")
    return 0


def cmd_sweep(args) -> int:
    from peft_ft.sweep.study import sweep

    out = sweep(args.recipe, args.space, args.trials, args.storage, args.workers, args.resume, args.out, args.set,
                args.data_dir, args.study)
    print(f"sweep: {out}")
    return 0


def cmd_serve(args) -> int:
    from peft_ft.serving.serve import run_serve

    return run_serve(args.adapter, args.host, args.port, args.batch_size, args.device, api_key=args.api_key, allow_pickle=args.allow_pickle,
                     trust_remote_code=args.trust_remote_code,
                     admin_key=args.admin_key, adapter_dir=args.adapter_dir, max_adapters=args.max_adapters,
                     max_body=args.max_body_bytes, max_texts=args.max_texts, max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens,
                     max_tokens=args.max_tokens, request_timeout=args.request_timeout, max_wait_ms=args.max_wait_ms, mix=not args.no_mix,
                     combine=args.combine, how=args.how, density=args.density)


def cmd_export(args) -> int:
    from peft_ft.serving.export import export_onnx

    report = export_onnx(args.run_dir, args.onnx, tolerance=args.tolerance, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code)
    print(f"exported: {args.onnx}/model.onnx (opset {report['opset']}); onnxruntime vs PyTorch on {report['checked_texts']} texts: "
          f"max |logit difference| {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:g})")
    return 0


def cmd_register_embedded(args) -> int:
    from peft_ft.models.hub_cache import EMBEDDED_HUB_ID, register_embedded

    snapshot, what = register_embedded()
    print(f"{EMBEDDED_HUB_ID}: {what} ({snapshot})")
    return 0


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (argparse reports anything else as one line and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a port from 1 to 65535 (0 picks a free one)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; give one from 1 to 65535 (0 picks a free one)")
    return value


def count(text: str) -> int:
    """A whole number of 1 or more (rows, texts, tokens, bytes); 0 or less would serve or answer nothing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def number_at_least(low: float, above: bool = False):
    """argparse type of a finite number >= `low` (> `low` when `above`): NaN and infinity parse, but a NaN
    timeout crashed the server's start and a NaN tolerance passes every comparison."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text}: give a finite number {'above' if above else 'of at least'} {low:g}")
        return value
    return parse


def recipe_args(p, nargs=None) -> None:
    p.add_argument("recipe", nargs=nargs, help="path of a TOML recipe, e.g. recipes/scientsbank_lora.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--data-dir", default=None, help="data directory (overrides data.dir and $PEFT_FT_DATA_DIR)")


def trust_args(p, note: str = "") -> None:
    # Only this flag turns remote code on for a loaded folder: its own files never can (peft_ft.models.safety).
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the base model's own Python code (config.json auto_map + .py files) run; a folder's "
                        "recipe.toml cannot turn this on. Read that code first" + note)


def loader_args(p) -> None:
    """What every command that loads run folders takes: the two say-sos no folder can give itself."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="load run/model folders holding pickle files (.bin, .pt, .pth, .pkl, .ckpt): they can run code; only for folders you trust")
    trust_args(p)


def adapters_args(p) -> None:
    p.add_argument("--adapter", action="append", default=[], required=True, metavar="NAME=RUN_DIR",
                   help="a run folder to load under NAME (repeatable); adapters on the same base share one loaded base")
    p.add_argument("--combine", action="append", default=[], metavar="NAME=ADAPTER:WEIGHT,...",
                   help="also answer under NAME with LoRA adapters given by --adapter combined at start-up (repeatable): "
                        "with --how cat, weights 1,1 stack them and 0.5,0.5 average them (same base, task and labels)")
    p.add_argument("--how", default="cat", choices=("linear", "cat", "ties", "dare_ties", "dare_linear"),
                   help="with --combine: how the LoRA matrices combine (default cat: exactly the weighted sum of the updates)")
    p.add_argument("--density", type=number_at_least(0, above=True), default=None,
                   help="with --how ties/dare_ties/dare_linear: fraction of each adapter's update kept (default 0.5)")
    p.add_argument("--batch-size", type=count, default=32, help="rows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    loader_args(p)


def args_run(p) -> None:
    recipe_args(p, nargs="?")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint, in the same folder")
    trust_args(p, "; for --resume (a new run follows the recipe's model.trust_remote_code)")


def args_explain(p) -> None:
    p.add_argument("section", nargs="?", help="a section (model, task, data, adapter, train, eval, output), one key "
                   "(train.lr), or a name from another tool (learning_rate)")


def args_merge(p) -> None:
    p.add_argument("run_dir", nargs="?", help="run folder of an adapter method (written by peft-ft run)")
    p.add_argument("--out", required=True, help="new (or empty) folder for the merged model; never overwritten")
    p.add_argument("--combine", default=None, metavar="NAME=RUN_DIR:WEIGHT,...",
                   help="combine LoRA adapters of the same base, task and labels into one adapter folder (peft's "
                        "add_weighted_adapter; heads: weighted average of their weights). For adapters of the same task "
                        "on different data or seeds")
    p.add_argument("--how", default="linear", choices=("linear", "cat", "ties", "dare_ties", "dare_linear"),
                   help="with --combine: how the LoRA matrices combine (peft's combination_type; default linear)")
    p.add_argument("--density", type=number_at_least(0, above=True), default=None,
                   help="with --how ties/dare_ties/dare_linear: fraction of each adapter's update kept (default 0.5)")
    loader_args(p)


def args_predict(p) -> None:
    adapters_args(p)
    p.add_argument("input", nargs="?", default="-", help="JSONL, CSV/TSV or text-lines file; - or nothing: stdin")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "json", "csv", "tsv", "text"),
                   help="input format (auto: from the extension, else JSONL if the first line is an object, a JSON list "
                        "of records or Label Studio tasks if the input is one, else text lines)")
    p.add_argument("--use", default=None, metavar="NAME", help="answer every row with this adapter")
    p.add_argument("--adapter-field", default=None, metavar="FIELD", help="JSON/CSV field whose value names each row's adapter")
    p.add_argument("--output", default=None, help="write the JSONL answers here instead of stdout")


def args_serve(p) -> None:
    adapters_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; set an API key before binding others)")
    p.add_argument("--port", type=port_number, default=8000, help="port; 0 picks a free one (printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $PEFT_FT_API_KEY; the variable keeps the key out of `ps`)")
    p.add_argument("--max-body-bytes", type=count, default=1024 * 1024, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--max-texts", type=count, default=256, help="more texts in one request get 422 (default 256)")
    p.add_argument("--max-batch", type=count, default=32, help="rows of concurrent requests answered in one forward (default 32)")
    p.add_argument("--max-batch-tokens", type=count, default=4096, help="tokens in one forward; a big request is answered over several (default 4096)")
    p.add_argument("--max-tokens", type=count, default=8192, help="tokens in one request after tokenization (texts up to max_length, QA windows); more get 413 (default 8192)")
    p.add_argument("--request-timeout", type=number_at_least(0, above=True), default=30.0, help="seconds a request may take; later: 504 and its remaining rows are dropped (default 30)")
    p.add_argument("--max-wait-ms", type=number_at_least(0), default=5.0, help="how long a batch waits for more requests (default 5)")
    p.add_argument("--no-mix", action="store_true", help="run each adapter's rows in forwards of their own (switching adapters) instead of mixing LoRA adapters of one base per row")
    p.add_argument("--adapter-dir", default=None, metavar="DIR", help="allow-listed folder: with the admin key, POST /adapters loads run folders from inside it")
    p.add_argument("--admin-key", default=None, help="key for POST/DELETE /adapters (default: $PEFT_FT_ADMIN_KEY); without it runtime loading is off")
    p.add_argument("--max-adapters", type=int, default=None, metavar="N", help="keep at most N adapters loaded; the least recently used is unloaded and reloaded on demand")


def args_export(p) -> None:
    p.add_argument("run_dir", help="run folder (adapter, full or merged run) of text classification, NER or extractive QA")
    p.add_argument("--onnx", required=True, metavar="OUT", help="new (or empty) folder for model.onnx, tokenizer and config")
    p.add_argument("--tolerance", type=number_at_least(0, above=True), default=1e-4,
                   help="largest |logit difference| to PyTorch accepted (default 1e-4); above it nothing is written")
    loader_args(p)


def args_compare(p) -> None:
    p.add_argument("recipes", nargs="+", help="TOML recipe(s); several recipes are compared method by method")
    p.add_argument("--methods", default=None, metavar="M1,M2", help="adapter methods to compare, e.g. full,lora,ia3 (default: each recipe's own)")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds train.seed, +1, ...; tables show mean ± std")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="learning rate of one method (repeatable); default: the recipe's for its own method, the method's default for the others")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value in every variant, e.g. train.max_steps=200 (repeatable)")
    p.add_argument("--data-dir", default=None, help="data directory (overrides data.dir and $PEFT_FT_DATA_DIR)")
    p.add_argument("--out", default=None, help="comparison folder (default: <output.dir>/compare-<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue a comparison in the same folder: finished runs are skipped")


def args_sweep(p) -> None:
    p.add_argument("recipe", help="TOML recipe to start from; its values fill every key the space does not sweep")
    p.add_argument("--space", required=True, help="TOML space file: recipe keys with ranges {low, high, log | step} "
                   "or lists of choices, e.g. [train] lr = {low = 1e-4, high = 3e-3, log = true}")
    p.add_argument("--trials", type=int, default=None, help="trials in the whole study, all workers and machines "
                   "together (default 20; on --resume the sweep's own number)")
    p.add_argument("--storage", default=None, metavar="URL", help="the study's database: any SQLAlchemy URL, e.g. "
                   "postgresql+psycopg://user:pass@host/db, for workers on several machines (default: SQLite in the sweep folder)")
    p.add_argument("--study", default=None, help="study name in the storage (default: the recipe file's stem)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine sharing the study (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in its folder: stopped trials run again, then new ones up to --trials")
    p.add_argument("--out", default=None, help="sweep folder (default: <output.dir>/sweep-<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value in every trial (repeatable)")
    p.add_argument("--data-dir", default=None, help="data directory (overrides data.dir and $PEFT_FT_DATA_DIR)")


def no_args(p) -> None:
    pass


# subcommand -> (what runs it, what it adds to the parser, its help). Each `cmd_*` imports what it needs when it
# runs: `--help`, `validate` and `explain` must not wait for torch, transformers, FastAPI or Optuna.
COMMANDS = {
    "run": (cmd_run, args_run, "train, evaluate and save a recipe"),
    "validate": (cmd_validate, recipe_args, "check a recipe and its files without training"),
    "explain": (cmd_explain, args_explain, "print every recipe field with its type, default and help"),
    "merge": (cmd_merge, args_merge, "fold a run's adapter and head into its base (a plain transformers model folder), or combine "
                                     "LoRA adapters of one base and task into one adapter folder (--combine)"),
    "predict": (cmd_predict, args_predict, "answer JSONL/CSV/text rows with one or more trained adapters on one loaded base"),
    "serve": (cmd_serve, args_serve, "serve trained adapters over HTTP (POST /predict/{adapter}, GET /adapters)"),
    "export": (cmd_export, args_export, "merge a run's adapter and export the model to ONNX, checked against PyTorch with onnxruntime"),
    "register-embedded": (cmd_register_embedded, no_args, "make the embedded MiniLM load as sentence-transformers/all-MiniLM-L6-v2 "
                          "offline (links in the Hugging Face hub cache; a real cached copy is kept)"),
    "compare": (cmd_compare, args_compare, "train one recipe with several methods (and seeds) on the same data; tables and a plot"),
    "sweep": (cmd_sweep, args_sweep, "search a recipe's hyperparameters with Optuna (TPE, median pruning); every trial a run folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ft", description="Parameter-efficient fine-tuning from TOML recipes.")
    parser.add_argument("--version", action="version", version=f"peft-ft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_arguments, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        add_arguments(p)
        # also after the command (`peft-ft run R --debug`); SUPPRESS: absent there, it leaves the top level's value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    return parser


# Data-parallel under torchrun / accelerate launch is for training; these would run once per process.
SINGLE_PROCESS = {"merge", "predict", "serve", "compare", "sweep", "export"}


def check_single_process(command: str) -> None:
    if command in SINGLE_PROCESS and world().size > 1:
        raise PeftFtError(f"`peft-ft {command}` runs as one process: start it without torchrun or accelerate launch "
                          f"(WORLD_SIZE is {world().size}); only `peft-ft run` trains data-parallel")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_single_process(args.command)
        if getattr(args, "data_dir", None) is not None and not args.data_dir.strip():
            # `--data-dir "$DATA"` with DATA unset: say so rather than fall back to the default folder
            raise PeftFtError("--data-dir is empty; give the data folder, or leave the option out for data.dir / "
                              "$PEFT_FT_DATA_DIR / ../shared/data")
        return args.fn(args)
    except PeftFtError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PeerLost as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # 128 + the signal's number, as the shell reports it
    except BrokenPipeError:
        # The reader of our output went away (`peft-ft explain | head`): not an error of ours. Point stdout at
        # /dev/null so that Python's flush at exit does not raise a second time (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # the machine's problem (disk full, read-only, a folder gone) met outside our own checks
        problem = machine_problem(e)
        if problem is None or args.debug:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
