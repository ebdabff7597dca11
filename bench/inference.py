"""Inference speed of LoRA runs: the base model, the adapter unmerged and merged, its ONNX export under
ONNX Runtime; adapter switching vs reloading.

    python bench/inference.py --smoke                                   # tiny BERT adapters trained here, seconds
    python bench/inference.py --rows 256 --out inference.md             # the shipped adapters on their test data
    python bench/inference.py --adapter ner=RUN_DIR --adapter cls=RUN_DIR

For each adapter run (default: adapters/conll_lora and adapters/grading_lora), on the first `--rows`
rows of its first test split (CoNLL test sentences, SciEntsBank test_ua pairs; `--smoke`: the
synthetic training rows), in one process with one thread count:

1. Speed of five models answering the same rows: the base (same architecture and head size, the
   head untrained: the base's cost), the adapter unmerged (peft's PeftModel, as `peft-ft predict`
   runs it), merged in memory (`merge_and_unload`), the folder `peft-ft merge` writes, loaded
   back, and (on CPU) the `peft-ft export --onnx` model run by onnxruntime with the same thread count. Latency of one-text requests (p50/p90) and texts/s with length-sorted batches of 1, 8 and
   32 (as peft-ft's evaluation batches), each a ratio to the base. The merged models' largest logit
   difference from the unmerged one shows the timings compare the same computation.
2. Switching: two adapters on one base (`peft_ft.serving.predict.AdapterSet`, the way `predict` and `serve`
   hold them): switch + answer one text, against loading the run from disk again + answering.
3. Load time of the base, the adapter run, the merged run (repeated loads in one process).

Timed: the model forward on token ids prepared beforehand (the same for every model), inside
`torch.inference_mode()`, after untimed warm-up calls; models take turns so a busy machine's
slow spells fall on all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from common import (
    Options,
    check_data_dir,
    machine_line,
    non_negative_int,
    positive_int,
    run_main,
    setup_torch,
    show_table,
    sync,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"conll": ROOT / "adapters" / "conll_lora", "grading": ROOT / "adapters" / "grading_lora"}
FAMILIES = ("classification", "ner")  # encoder families whose forward takes token ids only
MODELS = ["base", "unmerged", "merged (memory)", "merged (folder)"]
ONNX = "onnxruntime"  # a speed row on CPU only; the load-time table keeps the four PyTorch models
BATCH_SIZES = (1, 8, 32)
SPEED_COLUMNS = ["adapter", "model", "max abs logit diff vs unmerged", "p50 ms", "p90 ms", "latency vs base",
                 *(f"texts/s b{b}" for b in BATCH_SIZES), *(f"b{b} rate vs base" for b in BATCH_SIZES)]
SWITCH_COLUMNS = ["adapter", "level", "operation", "n", "p50 ms", "p90 ms", "vs switch"]
LOAD_COLUMNS = ["adapter", "model", "what is loaded", "loads", "p50 ms", "vs base"]


@dataclass
class Inputs:
    """One adapter's rows: model features (token ids) and the same rows as `predict` request rows."""

    split: str
    source: str
    features: list[dict]
    requests: list[dict]
    pad_id: int


@dataclass
class Models:
    """The four models of one adapter, in `MODELS` order."""

    by_name: dict = field(default_factory=dict)
    merged_dir: Path | None = None


# --- inputs --------------------------------------------------------------------------------------


def load_inputs(run_dir: Path, data_dir: str, rows: int) -> Inputs:
    """The first `rows` rows of the run's first test split (its training split when it has none),
    encoded by the run's task as in training and evaluation."""
    from peft_ft.data.files import resolve_data_dir
    from peft_ft.models.loading import load_tokenizer
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.layout import read_info
    from peft_ft.rundir.load import base_location
    from peft_ft.rundir.portable import data_dir_of
    from peft_ft.tasks import TASKS

    info, recipe = read_info(run_dir), load_recipe(run_dir / "recipe.toml")
    task = TASKS[info["task"]]
    # recipe.toml keeps no absolute data folder: the run's peft_ft.json says where it is from the run folder
    data = task.load(recipe, resolve_data_dir(recipe, data_dir or data_dir_of(run_dir, info)))
    name = next((n for n in data.eval_names if n.startswith("test")), "train")
    split = replace(data.splits[name], examples=data.splits[name].examples[:rows])
    tokenizer = load_tokenizer(base_location(info), recipe)
    features = task.encode(split, tokenizer, recipe, data)
    requests = [request_row(e) for e in split.examples]
    return Inputs(name, split.source, features, requests, tokenizer.pad_token_id or 0)


def request_row(example: dict) -> dict:
    """An example as a `peft-ft predict` input row: a text (and its pair), or NER's words joined."""
    if "tokens" in example:
        return {"text": " ".join(example["tokens"])}
    return {"text": example["text"], **({"text_pair": example["text_pair"]} if "text_pair" in example else {})}


def model_batch(features: list[dict], pad_id: int, device) -> dict:
    from peft_ft.data.batching import pad_batch

    batch = pad_batch(features, pad_id)
    batch.pop("labels", None)
    return {k: v.to(device) for k, v in batch.items()}


def sorted_batches(inputs: Inputs, batch_size: int, device) -> list[dict]:
    """Length-sorted batches, as peft-ft's evaluation makes them (`batching.eval_batches`)."""
    from peft_ft.data.batching import eval_batches

    lengths = [f["length"] for f in inputs.features]
    return [model_batch([inputs.features[i] for i in b], inputs.pad_id, device) for b in eval_batches(lengths, batch_size)]


# --- models --------------------------------------------------------------------------------------


def check_run(name: str, run_dir: Path) -> dict:
    from peft_ft.errors import PeftFtError
    from peft_ft.rundir.layout import read_info
    from peft_ft.serving.merge import check_mergeable

    info = read_info(run_dir)
    if info["task"] not in FAMILIES:
        raise PeftFtError(f"--adapter {name}={run_dir}: a {info['task']} run; this benchmark times {' and '.join(FAMILIES)} runs")
    check_mergeable(run_dir, info)  # an adapter with weights to fold in (not full, not a prompt method)
    return info


def load_base(info: dict, run_dir: Path, device):
    """The run's architecture with a head of the run's size, untrained, and no adapter."""
    import torch
    import transformers

    from peft_ft.data.files import TaskData
    from peft_ft.models.loading import load_tokenizer
    from peft_ft.recipe.load import load_recipe
    from peft_ft.rundir.load import base_location
    from peft_ft.tasks import TASKS

    kwargs = TASKS[info["task"]].model_kwargs(TaskData(splits={}, labels=info["labels"]))
    location = base_location(info)
    model = getattr(transformers, info["auto_class"]).from_pretrained(location, dtype=torch.float32, **kwargs)
    load_tokenizer(location, load_recipe(run_dir / "recipe.toml"))  # part of a load, as in load_run
    return model.to(device).eval()


def load_merged_in_memory(run_dir: Path, device):
    from peft_ft.rundir.load import load_run

    return load_run(run_dir, device)[0].merge_and_unload().eval()


class OnnxRuntimeModel:
    """The `peft-ft export --onnx` model under onnxruntime, called like a transformers model: the batch's
    tensors go in as numpy arrays (part of the timed call: what an onnxruntime service does) and the
    logits come back as a torch tensor."""

    def __init__(self, folder: Path, threads: int):
        import json

        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = json.loads((folder / "export.json").read_text())["inputs"]

    def __call__(self, **batch):
        import torch
        from transformers.modeling_outputs import TokenClassifierOutput

        [logits] = self.session.run(["logits"], {n: batch[n].numpy() for n in self.inputs})
        return TokenClassifierOutput(logits=torch.from_numpy(logits))


def load_models(info: dict, run_dir: Path, workdir: Path, device, threads: int = 1, onnx: bool = True) -> Models:
    from peft_ft.rundir.load import load_run
    from peft_ft.serving.export import export_onnx
    from peft_ft.serving.merge import merge_run

    merged_dir = merge_run(run_dir, workdir / f"{run_dir.name}-merged")
    models = {
        "base": load_base(info, run_dir, device),
        "unmerged": load_run(run_dir, device)[0],
        "merged (memory)": load_merged_in_memory(run_dir, device),
        "merged (folder)": load_run(merged_dir, device)[0],
    }
    if onnx and device.type == "cpu":
        onnx_dir = workdir / f"{run_dir.name}-onnx"
        export_onnx(run_dir, onnx_dir)
        models[ONNX] = OnnxRuntimeModel(onnx_dir, threads)
    return Models(models, merged_dir)


# --- timing --------------------------------------------------------------------------------------


def forward(model, batch: dict, device):
    import torch

    with torch.inference_mode():
        logits = model(**batch).logits
    sync(device)
    return logits


def clocked(call, device) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def logit_difference(models: dict, batches: list[dict], device) -> dict[str, float]:
    """Largest |logit| difference of each model from the unmerged adapter over every row (padding
    positions included: the same padding goes into both)."""
    reference = [forward(models["unmerged"], b, device) for b in batches]
    return {name: max(float((forward(m, b, device) - r).abs().max()) for b, r in zip(batches, reference))
            for name, m in models.items()}


def take_turns(calls: dict, n: int, warmup: int, device, collect: bool = False) -> dict[str, list[float]]:
    """Seconds of each `calls[name](i)` for i = 0 .. warmup + n - 1, the first `warmup` untimed; the
    calls take turns in rotating order, so a busy machine's slow spells fall on all of them alike.
    `collect`: free the last call's model (peft modules hold reference cycles), outside the clock."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            seconds = clocked(lambda: calls[name](i), device)
            if i >= warmup:
                times[name].append(seconds)
            if collect:
                gc.collect()
    return times


def latencies(models: dict, inputs: Inputs, requests: int, warmup: int, device) -> dict[str, list[float]]:
    """Seconds of one-text requests (row i % rows), the models taking turns."""
    singles = [model_batch([f], inputs.pad_id, device) for f in inputs.features]
    calls = {name: (lambda i, m=m: forward(m, singles[i % len(singles)], device)) for name, m in models.items()}
    return take_turns(calls, requests, warmup, device)


def throughput(models: dict, batches: list[dict], rows: int, repeats: int, device) -> dict[str, float]:
    """Texts/s of each model over all rows in these batches: the best of `repeats` passes, the
    models taking turns pass by pass (one untimed pass each first)."""
    names = list(models)
    for name in names:
        forward(models[name], batches[0], device)
    best = {n: math.inf for n in names}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            seconds = clocked(lambda: [forward(models[name], b, device) for b in batches], device)
            best[name] = min(best[name], seconds)
    return {n: rows / s for n, s in best.items()}


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def speed_rows(name: str, models: Models, inputs: Inputs, args, device) -> list[list]:
    m = models.by_name
    batches = {b: sorted_batches(inputs, b, device) for b in BATCH_SIZES}
    diffs = logit_difference(m, batches[max(BATCH_SIZES)], device)
    times = latencies(m, inputs, args.requests, args.warmup, device)
    rates = {b: throughput(m, batches[b], len(inputs.features), args.repeats, device) for b in BATCH_SIZES}
    rows = []
    for model in m:
        p50, p90 = percentile(times[model], 0.5), percentile(times[model], 0.9)
        base_p50 = percentile(times["base"], 0.5)
        rows.append([name, model, {"base": "-", "unmerged": "reference"}.get(model) or f"{diffs[model]:.2e}", f"{1000 * p50:.2f}", f"{1000 * p90:.2f}",
                     ratio(p50, base_p50), *(f"{rates[b][model]:.1f}" for b in BATCH_SIZES),
                     *(ratio(rates[b][model], rates[b]["base"]) for b in BATCH_SIZES)])
    return rows


# --- switching -----------------------------------------------------------------------------------


def adapter_set_with_partners(specs: dict[str, Path], device):
    """One AdapterSet holding every run and, beside each, a second copy of it under `<name>_copy`,
    so every adapter has a partner on its own base to switch to (two distinct runs share a base only
    when their heads have one class and size: AdapterSet groups them so). Returns (set, partners)."""
    from peft_ft.serving.predict import AdapterSet

    copies = {f"{n}_copy": d for n, d in specs.items()}
    adapters = AdapterSet({**specs, **copies}, device=str(device))
    partners = {}
    for name in specs:
        group = adapters.get(name).group
        others = [o for o in specs if o != name and adapters.get(o).group is group]
        partners[name] = (others or [f"{name}_copy"])[0]
    return adapters, partners


def switch_rows(name: str, run_dir: Path, adapters, partner: str, inputs: Inputs, args, device) -> list[list]:
    """Model level: set_adapter + forward vs load_run + forward. AdapterSet level (the `predict` /
    `serve` route: tokenize, forward, answer): answer() switching vs a new AdapterSet + answer()."""
    from peft_ft.rundir.load import load_run
    from peft_ft.serving.predict import AdapterSet, activate

    pair = (name, partner)
    model = adapters.get(name).group.model
    labels = {a: adapters.get(a).info["labels"] for a in pair}
    batch = model_batch(inputs.features[:1], inputs.pad_id, device)
    request = inputs.requests[:1]

    def switch(i):
        activate(model, pair[i % 2], labels[pair[i % 2]])
        forward(model, batch, device)

    def reload(i):
        forward(load_run(run_dir, device)[0], batch, device)

    def reload_set(i):
        AdapterSet({name: run_dir}, device=str(device)).answer(name, request)

    activate(model, name, labels[name])
    answers = take_turns({"switch": switch, "forward": lambda i: forward(model, batch, device),
                          "answer": lambda i: adapters.answer(pair[i % 2], request)}, args.requests, args.warmup, device)
    reloads = take_turns({"reload": reload, "reload_set": reload_set}, args.reloads, 1, device, collect=True)
    measured = [
        ("model", f"set_adapter ({name} <-> {partner}) + forward", answers["switch"]),
        ("model", "forward only (no switch)", answers["forward"]),
        ("model", "load_run from disk + forward", reloads["reload"]),
        ("AdapterSet", f"answer(), alternating {name} / {partner}", answers["answer"]),
        ("AdapterSet", "new AdapterSet from disk + answer()", reloads["reload_set"]),
    ]
    switch_p50 = {level: percentile(times, 0.5) for level, _, times in (measured[0], measured[3])}
    return [[name, level, what, len(times), f"{1000 * percentile(times, 0.5):.2f}", f"{1000 * percentile(times, 0.9):.2f}",
             ratio(percentile(times, 0.5), switch_p50[level])] for level, what, times in measured]


# --- load time -----------------------------------------------------------------------------------


def load_rows(name: str, info: dict, run_dir: Path, merged_dir: Path, loads: int, device) -> list[list]:
    """Each model loaded once untimed, then `loads` times timed (files in the OS cache by then), taking turns."""
    from peft_ft.rundir.load import load_run

    loaders = {
        "base": ("from_pretrained(base, head size) + tokenizer", lambda: load_base(info, run_dir, device)),
        "unmerged": ("load_run(run): base + adapter + tokenizer", lambda: load_run(run_dir, device)),
        "merged (memory)": ("load_run(run) + merge_and_unload()", lambda: load_merged_in_memory(run_dir, device)),
        "merged (folder)": ("load_run(merged folder) + tokenizer", lambda: load_run(merged_dir, device)),
    }
    times = take_turns({model: (lambda i, load=load: load()) for model, (_, load) in loaders.items()}, loads, 1, device, collect=True)
    p50 = {model: percentile(t, 0.5) for model, t in times.items()}
    return [[name, model, what, loads, f"{1000 * p50[model]:.0f}", ratio(p50[model], p50["base"])]
            for model, (what, _) in loaders.items()]


# --- main ----------------------------------------------------------------------------------------


def adapter_specs(args, workdir: Path) -> dict[str, Path]:
    from peft_ft.serving.predict import parse_adapter_args

    if args.smoke:
        from loadtest import train_smoke_adapters

        return {n: Path(d) for n, d in train_smoke_adapters(workdir).items()}
    if args.adapter:
        return {n: Path(d) for n, d in parse_adapter_args(args.adapter).items()}
    return dict(SHIPPED)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="LoRA-type run folders to time (repeatable; default: adapters/conll_lora and adapters/grading_lora)")
    parser.add_argument("--rows", type=positive_int, default=256, help="rows of the test split used (default 256)")
    parser.add_argument("--requests", type=positive_int, default=100, help="timed one-text requests per model (default 100)")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed requests before them (default 5)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="passes over the rows per batch size; the best counts (default 3)")
    parser.add_argument("--reloads", type=positive_int, default=5, help="timed loads from disk, after one untimed (default 5)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--data-dir", default="", help="data folder holding conll2003/ and scientsbank/ (default: peft-ft's)")
    parser.add_argument("--note", action="append", default=[], help="a line added to the notes (e.g. what else ran on the machine)")
    parser.add_argument("--out", help="also write the tables as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT adapters trained here (pos, flip, ner), few rows and requests, the ONNX row for the first only (about a minute)")
    args = parser.parse_args(argv)
    if args.data_dir:  # each adapter's recipe names its files; the folder itself is checked before any loading
        check_data_dir(args.data_dir, [])
    if args.smoke:
        args.rows, args.requests, args.warmup, args.repeats, args.reloads = 24, 6, 1, 1, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    opts = Options(threads=args.threads, device=args.device)
    device = setup_torch(opts)
    speed, switching, loading, inputs_notes = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="peft-ft-inference-") as tmp:
        specs = adapter_specs(args, Path(tmp))
        infos = {name: check_run(name, run_dir) for name, run_dir in specs.items()}
        gc.collect()
        gc.freeze()  # the libraries' objects (and smoke training's) out of later collections: each then takes ms, not 0.5 s
        for name, run_dir in specs.items():
            start = time.perf_counter()
            inputs = load_inputs(run_dir, args.data_dir, args.rows)
            lengths = [f["length"] for f in inputs.features]
            inputs_notes.append(f"{name}: {run_dir} ({infos[name]['task']}); {len(lengths)} rows of {inputs.split} ({inputs.source}), "
                                f"{sum(lengths) / len(lengths):.1f} tokens per row on average, longest {max(lengths)}")
            # --smoke exports ONNX for the first adapter only: each torch.onnx export costs ~30 s on 2 cores,
            # and one shows the row works (the three took 92 of the smoke run's 177 s under cProfile)
            onnx = not args.smoke or name == next(iter(specs))
            models = load_models(infos[name], run_dir, Path(tmp), device, args.threads, onnx=onnx)
            speed += speed_rows(name, models, inputs, args, device)
            loading += load_rows(name, infos[name], run_dir, models.merged_dir, args.reloads, device)
            del models
            gc.collect()
            print(f"-- {name}: speed and load time done in {time.perf_counter() - start:.1f} s", flush=True)
        adapters, partners = adapter_set_with_partners(specs, device)
        for name, run_dir in specs.items():
            inputs = load_inputs(run_dir, args.data_dir, 1)
            switching += switch_rows(name, run_dir, adapters, partners[name], inputs, args, device)
        copied = [n for n, p in partners.items() if p.endswith("_copy")]
    markdown = [
        show_table("Inference speed", SPEED_COLUMNS, speed, [
            machine_line(opts) + f"; {datetime.datetime.now().isoformat(timespec='minutes')}",
            *args.note,
            *(["SMOKE: tiny 2-layer BERT adapters trained here, synthetic rows; the numbers mean nothing"] if args.smoke else []),
            *inputs_notes,
            f"latency: {args.requests} one-text requests per model after {args.warmup} untimed, the models taking turns; "
            f"texts/s: every row in length-sorted batches of 1/8/32, best of {args.repeats} passes",
            "timed: the model forward (torch.inference_mode) on token ids padded beforehand; tokenizing and decoding answers are not timed",
            "base: the same architecture and head size with no adapter and an untrained head; merged (memory): load_run + "
            "merge_and_unload; merged (folder): what peft-ft merge writes, loaded by load_run (AutoModelFor...from_pretrained)",
            "onnxruntime (CPU only): what peft-ft export --onnx writes (merged, torch.onnx dynamo export), run by onnxruntime's "
            "CPU provider with the same thread count; its timed call includes turning the batch into numpy arrays",
            "latency vs base: p50 / the base's p50 (above 1 = slower); rate vs base: texts/s / the base's (below 1 = slower)",
        ]),
        show_table("Adapter switch vs reload", SWITCH_COLUMNS, switching, [
            f"one text (the first row) per call; {args.requests} timed calls after {args.warmup} untimed; reloads: {args.reloads} timed after 1 untimed",
            "model level: the base with both adapters attached by AdapterSet; set_adapter is peft_ft.serving.predict.activate (set_adapter "
            "+ label names), forward as in the speed table; reload: load_run(run) (base + adapter + tokenizer from disk) + forward",
            "AdapterSet level: the peft-ft predict / serve route (tokenize, pipeline forward, answer); answer() calls set_adapter on "
            "every call, even for the adapter already active, so alternating costs what staying costs; reload: a new AdapterSet "
            "(what predict does at start) + answer()",
            "the calls of one adapter take turns (switch, forward only, answer(); then the two reloads) so machine noise falls on all alike",
            *([f"{', '.join(copied)}: no other run with the same head class and size, so each switches to a second copy of itself "
               "attached under <name>_copy (a switch is the same work whatever the weights)"] if copied else []),
            "vs switch: p50 / the p50 of the first row of the same level",
        ]),
        show_table("Model load time", LOAD_COLUMNS, loading, [
            f"each model loaded once untimed, then {args.reloads} timed loads in the same process (files in the OS page cache: "
            "warm disk, not a cold start; the process's imports are done)",
            "vs base: p50 / the base's p50",
        ]),
    ]
    if args.out:
        Path(args.out).write_text("\n".join(markdown), encoding="utf-8")
        print(f"markdown copy: {args.out}")


if __name__ == "__main__":
    run_main(main)  # a bad --adapter or data folder: one `error:` line saying what to fix, exit 2
