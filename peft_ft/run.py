"""`peft-ft run`, top to bottom: recipe -> model + adapter -> data -> train -> evaluate -> save.

Everything that can fail on bad input (model name, data directory, files, columns, labels) is
checked before the run folder is made and before any training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from peft_ft import __version__, distributed, portable
from peft_ft.adapters import METHODS
from peft_ft.data import record_splits, resolve_data_dir
from peft_ft.errors import PeftFtError
from peft_ft.log import setup_logging
from peft_ft.models import (EMBEDDED_NAME, embedded_model_dir, enable_activation_checkpointing, load_model, load_tokenizer,
                            quiet_transformers, resolve_model, settle_hub_mode)
from peft_ft.cards import model_card
from peft_ft.output import create_run_dir, folder_size, human_size, save_pretrained_atomic, write_atomic, write_json
from peft_ft.schema import Recipe, load_recipe, to_toml
from peft_ft.tasks import TASKS, Task, TaskData

if TYPE_CHECKING:
    from peft_ft.train import TrainHooks

log = logging.getLogger("peft_ft")
INFO_FILE = "peft_ft.json"


def run(recipe: Recipe, data_dir: str | None = None, hooks: TrainHooks | None = None) -> Path:
    """Train and evaluate one recipe; returns the run folder. Started by torchrun or accelerate launch:
    data-parallel over its processes (peft_ft.distributed), the main process alone writing the folder.
    `hooks` reach the training loop (`peft-ft sweep` hears every evaluation through `on_evaluation`)."""
    from peft_ft.engine import make_accelerator

    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    location, data, resolved_dir = check_inputs(recipe, task, data_dir)
    distributed.check_environment()
    accelerator = make_accelerator(recipe)  # after the input checks: bad input ends every process before any waiting

    def new_run_dir() -> Path:
        run_dir = create_run_dir(recipe)
        write_atomic(run_dir / "recipe.toml", to_toml(recipe))
        return run_dir

    run_dir = distributed.on_main(new_run_dir)  # one folder, made by the main process, named to all
    _run_in(run_dir, recipe, task, method, location, data, resolved_dir, resume_from=None, accelerator=accelerator,
            hooks=hooks)
    return run_dir


def resume(run_dir: str | Path, data_dir: str | None = None) -> Path:
    """Continue a run that stopped (killed, Ctrl-C, crash) from its newest checkpoint, in the same folder."""
    from peft_ft import checkpoint
    from peft_ft.engine import make_accelerator

    if distributed.world().size > 1:
        raise PeftFtError(f"--resume {run_dir}: resuming with several processes is not supported; resume with one "
                          f"process (peft-ft run --resume {run_dir}, without torchrun or accelerate launch)")
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise PeftFtError(f"--resume {run_dir}: not a run folder (no recipe.toml); give the folder `peft-ft run` printed")
    if (run_dir / "metrics.json").is_file():
        raise PeftFtError(f"--resume {run_dir}: this run finished (metrics.json exists); there is nothing to resume")
    saved = checkpoint.listed(run_dir)
    if not saved:
        raise PeftFtError(f"--resume {run_dir}: no checkpoint in {run_dir / checkpoint.FOLDER} (the run stopped before its "
                          f"first one: the end of epoch 1, or train.checkpoint_every steps); start it again instead")
    state = checkpoint.read_state(saved[-1])["run"]
    # Messages, relative data.dir and the run name refer to the recipe the run was started from.
    recipe = dataclasses.replace(load_recipe(run_dir / "recipe.toml"), source=state.get("recipe_source", str(run_dir / "recipe.toml")))
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    location, data, resolved_dir = check_inputs(recipe, task, data_dir or state.get("data_dir"))
    checkpoint.clean_partial(run_dir)
    _run_in(run_dir, recipe, task, method, location, data, resolved_dir, resume_from=saved[-1],
            accelerator=make_accelerator(recipe))
    return run_dir


def check_inputs(recipe: Recipe, task: Task, data_dir: str | None):
    """Everything knowable before a run folder is made: model, method against the model's architecture,
    device, data files and rows. `peft-ft validate` runs it too."""
    from peft_ft.train import check_device

    settle_hub_mode(recipe)
    location = resolve_model(recipe)
    method = METHODS[recipe.adapter.method]
    if method.preflight:
        method.preflight(location, recipe, task.auto_class, task.peft_task_type)
    check_device(recipe)
    resolved_dir = None if recipe.data.hub else resolve_data_dir(recipe, data_dir)
    return location, task.load(recipe, resolved_dir), resolved_dir


def _run_in(run_dir: Path, recipe: Recipe, task: Task, method, location: str, data: TaskData, data_dir: Path | None,
            resume_from: Path | None, accelerator, hooks: TrainHooks | None = None) -> None:
    setup_logging(run_dir if distributed.is_main() else None)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)  # progress and results are the main process's to report
    try:
        log.info("run folder %s", run_dir)
        for note in data.notes:
            log.info(note)
        log.info("splits: %s", ", ".join(f"{n} {len(s.examples)}" for n, s in data.splits.items()))
        if distributed.is_main() and (recipe.data.format == "label_studio" or recipe.data.validation_fraction or recipe.data.test_fraction):
            record_splits(data.splits, data.labels, run_dir)  # splits carved or exported: log and keep what went where
        run_state = {"recipe_source": recipe.source, "data_dir": str(data_dir) if data_dir else None}
        _train_evaluate_save(recipe, task, method, location, data, run_dir, accelerator, resume_from, run_state, hooks)
    finally:
        setup_logging(None)  # detach train.log so later log lines of this process do not land in it
        if distributed.is_main() and (run_dir / "metrics.json").is_file():
            portable.scrub_log(run_dir, str(data_dir) if data_dir else None)


def build_model(recipe: Recipe, task: Task, method, location: str, data: TaskData, device):
    """Tokenizer, and the model with its head, wrapped by the adapter method."""
    tokenizer = load_tokenizer(location, recipe)
    model, heads = load_model(location, recipe, task.auto_class, **task.model_kwargs(data))
    if recipe.model.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        # Freezes the int8 base and keeps norms and the head in float32. No activation checkpointing:
        # the loop's memory is small next to the base's, and it would slow every step.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = method.wrap(model, recipe, heads, task.peft_task_type)
    if not recipe.model.load_in_8bit:  # an 8-bit base is placed on the GPU as it loads and cannot be moved
        model = model.to(device)
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if use_fast_kernels(recipe, device):
        from peft_ft.fastlora import speed_up

        log.info("fast kernels: %s", ", ".join(f"{k} {v}" for k, v in speed_up(model).items()))
        model.peft_ft_fast_kernels = True  # the loop then also keeps freed memory (peft_ft.allocator)
    return model, tokenizer, heads


def use_fast_kernels(recipe: Recipe, device) -> bool:
    """train.fast_kernels on CPU in float32 only: they were written and measured for that; on CUDA
    peft's stock layers run until a GPU measurement says otherwise, and under bf16 autocast too (the
    fused matmuls take float32 operands)."""
    return recipe.train.fast_kernels and str(device).split(":")[0] == "cpu" and recipe.train.mixed_precision == "no"


def _train_evaluate_save(recipe: Recipe, task: Task, method, location: str, data: TaskData, run_dir: Path,
                         accelerator, resume_from: Path | None = None, run_state: dict | None = None,
                         hooks: TrainHooks | None = None) -> None:
    from peft_ft.engine import finish_tracking, start_tracking

    start_tracking(accelerator, recipe, run_dir)
    try:
        _train_evaluate_save_tracked(recipe, task, method, location, data, run_dir, accelerator, resume_from, run_state, hooks)
    finally:
        finish_tracking(accelerator)


def _train_evaluate_save_tracked(recipe: Recipe, task: Task, method, location: str, data: TaskData, run_dir: Path,
                                 accelerator, resume_from: Path | None, run_state: dict | None,
                                 hooks: TrainHooks | None) -> None:
    import shutil

    from peft_ft.checkpoint import FOLDER
    from peft_ft.engine import gathered_state_dict, is_sharded
    from peft_ft.train import setup_torch, track, train

    setup_torch(recipe)
    device = accelerator.device
    # DDP copies the main process's weights to the others when it wraps the model (peft_ft.train).
    model, tokenizer, heads = build_model(recipe, task, method, location, data, device)
    task.prepare_training(model, recipe, data)
    if distributed.world().size > 1:
        log.info("data-parallel over %d processes: each trains on its share of every batch of %d",
                 distributed.world().size, recipe.train.batch_size)
    trainable, total = count_parameters(model)
    log.info("base %s (%s), method %s: %s trainable of %s parameters (%.3f %%), head: %s",
             recipe.model.name or EMBEDDED_NAME, model.config.model_type, method.name, f"{trainable:,}", f"{total:,}",
             100 * trainable / total, ", ".join(heads) or "none")

    features = {name: task.encode(split, tokenizer, recipe, data) for name, split in data.splits.items()}
    metric = recipe.eval.metric or task.default_metric
    pad_id = tokenizer.pad_token_id or 0

    def evaluate(name: str) -> tuple[dict, list[dict]] | None:
        """Metrics and records of a split. With several processes each predicts its share of the rows and
        the main process scores them all (every row once, in order); the others get None."""
        def predict(rows: list) -> list:
            return task.predict(model, rows, pad_id, recipe.eval.batch_size, device)

        if is_sharded(accelerator):  # FSDP / ZeRO-3 forwards are collective: every process runs every batch
            outputs = predict(features[name])
            outputs = outputs if distributed.is_main() else None
        else:
            outputs = distributed.gather_rows(predict, features[name])
        return None if outputs is None else task.score(data.splits[name], features[name], outputs, data)

    def validate(epoch: int) -> dict:
        scored = evaluate("validation")
        # every process gets the same scores, so all pick the same best evaluation and stop together
        return distributed.broadcast_object(None if scored is None else numbers(scored[0]))

    result = train(
        model, features["train"], recipe, lr=recipe.train.lr or method.default_lr, pad_id=pad_id, device=device,
        validate=validate if "validation" in data.splits else None, metric=metric,
        run_dir=run_dir, resume_from=resume_from, run_state=run_state, accelerator=accelerator, hooks=hooks,
    )
    metrics = {}
    for name in data.eval_names:
        scored = evaluate(name)
        if scored is None:  # not the main process: its share is predicted, the main process writes
            continue
        scores, records = scored
        if not scores:  # an unlabelled split (data.predict): its predictions are its only result
            paths = task.write_predictions(run_dir, data.splits[name], records)
            log.info("%s: no labels, %d predictions in %s", name, len(records), ", ".join(p.name for p in paths))
            continue
        metrics[name] = scores
        # "best/": scored with the restored best weights, apart from the per-evaluation validation curves
        track(accelerator, {f"best/{name}/{k}": v for k, v in numbers(scores).items()}, result.steps)
        if recipe.eval.predictions:
            task.write_predictions(run_dir, data.splits[name], records)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in metrics[name].items() if isinstance(v, float)))
    state_dict = gathered_state_dict(accelerator, model)  # FSDP / ZeRO-3: every process takes part in the gather
    if not distributed.is_main():
        return

    weight_files = save_model(accelerator.unwrap_model(model), tokenizer, method.is_adapter, run_dir, state_dict)
    info = {
        "peft_ft_version": __version__,
        "run_name": recipe.output.name or Path(recipe.source).stem,
        "task": task.name,
        "method": method.name,
        "is_adapter": method.is_adapter,
        **portable.base_fields(recipe, location, run_dir),
        "model_type": model.config.model_type,
        "auto_class": task.auto_class,
        "labels": data.labels,
        "heads": heads,
        "data": portable.data_sources({n: s.source for n, s in data.splits.items()}, (run_state or {}).get("data_dir")),
        **({"data_dir": os.path.relpath(Path(run_state["data_dir"]).resolve(), run_dir.resolve())} if (run_state or {}).get("data_dir") else {}),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "weight_files": [p.name for p in weight_files],
        "weight_bytes": folder_size(weight_files),
        "train": result.summary(),
    }
    params = {k: info[k] for k in ("trainable_params", "total_params", "trainable_percent", "weight_bytes")}
    if method.is_adapter:
        portable.finish_adapter_config(run_dir, info)
    portable.write_labels(run_dir, data.labels)
    write_json(run_dir / INFO_FILE, info)
    write_json(run_dir / "metrics.json", {**metrics, "train": info["train"], "params": params})
    write_atomic(run_dir / "README.md", model_card(portable.portable_recipe(recipe), info, metrics))
    # Written in full while the run could be resumed; now without the machine's paths.
    write_atomic(run_dir / "recipe.toml", portable.recipe_text(recipe, run_dir))
    if info["base_model_source"] == "embedded":
        _register_embedded()
    # The saved weights are the best epoch's: the checkpoints only served to resume an unfinished run.
    shutil.rmtree(run_dir / FOLDER, ignore_errors=True)
    log.info("saved %s (%s) in %s", ", ".join(info["weight_files"]), human_size(info["weight_bytes"]), run_dir)


def _register_embedded() -> None:
    """The adapter names its base `sentence-transformers/all-MiniLM-L6-v2`: make that id resolve
    offline on this machine (peft_ft.hub_cache), so stock loaders take the folder at once."""
    from peft_ft.hub_cache import EMBEDDED_HUB_ID, register_embedded

    try:
        snapshot, what = register_embedded()
        log.info("hub cache: %s %s (%s)", EMBEDDED_HUB_ID, what, snapshot)
    except PeftFtError as e:
        log.warning("%s; stock loaders will not find the base offline until `peft-ft register-embedded` succeeds", e)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def numbers(scores: dict) -> dict:
    """The plain numbers of a split's scores (per-label tables left out): what trackers and callbacks take."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_model(model, tokenizer, is_adapter: bool, run_dir: Path, state_dict: dict | None = None) -> list[Path]:
    """Adapter methods: the adapter and its head only. Full: a complete model folder with tokenizer.
    `state_dict`: the full weights gathered from a sharded run (None: the model's own)."""
    files = save_pretrained_atomic(model, run_dir, state_dict)
    if not is_adapter:
        tokenizer.save_pretrained(run_dir)
    return [f for f in files if f.suffix == ".safetensors"]


def base_location(info: dict) -> str:
    """Where the base model of a saved run is on this machine (the embedded model moves with its venv;
    a local base folder's path, kept relative to the run folder, is resolved by `pipelines.read_info`)."""
    if info["base_model"] == EMBEDDED_NAME:
        return str(embedded_model_dir())
    if info.get("base_model_source") == "local folder" and not Path(info["base_model"]).is_dir():
        raise PeftFtError(
            f"base model: this run was trained on a local model folder named {info['base_model_id']!r}, recorded relative to "
            f"the run folder; it is not at {info['base_model']} (the run folder was copied or moved without it). Keep the run "
            f"folder where the base folder is found at the same relative path, or load it with peft: "
            f"PeftModel.from_pretrained(AutoModelFor...from_pretrained(PATH_OF_{info['base_model_id']}), RUN_DIR)")
    return info["base_model"]


def load_run(run_dir: str | Path, device: str = "cpu", allow_pickle: bool = False):
    """Rebuild a trained model from a run folder: returns (model, tokenizer, info) in eval mode.
    A run or base folder holding pickle files is refused unless `allow_pickle` (peft_ft.safety)."""
    import torch
    import transformers

    from peft_ft.models import check_model_folder
    from peft_ft.safety import check_no_pickle, remote_code, safetensors_only

    from peft_ft.pipelines import read_info

    run_dir = Path(run_dir)
    check_no_pickle(run_dir, "run folder", allow_pickle)
    info = read_info(run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    task: Task = TASKS[info["task"]]
    kwargs = {**task.model_kwargs(TaskData(splits={}, labels=info["labels"])), **safetensors_only(allow_pickle),
              "trust_remote_code": remote_code(recipe, str(run_dir))}
    quiet_transformers()
    cls = getattr(transformers, info["auto_class"])
    if info["is_adapter"]:
        from peft import PeftModel

        base = base_location(info)
        if Path(base).is_dir():
            check_model_folder(Path(base), f"{run_dir}: base model", allow_pickle)
        from peft_ft.adapters import route_prefixes

        model = route_prefixes(PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32, **kwargs), run_dir))
        tokenizer = load_tokenizer(base, recipe)
    else:
        model = cls.from_pretrained(run_dir, dtype=torch.float32, **safetensors_only(allow_pickle),
                                    trust_remote_code=kwargs["trust_remote_code"])
        tokenizer = load_tokenizer(str(run_dir), recipe)
    return model.to(device).eval(), tokenizer, info
