"""`peft-ft run`, top to bottom: recipe -> model + adapter -> data -> train -> evaluate -> save.

Everything that can fail on bad input (model name, data directory, files, columns, labels) is
checked before the run folder is made and before any training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from peft_ft.data.files import TaskData, resolve_data_dir
from peft_ft.engine import checkpoint, distributed
from peft_ft.engine.accelerator import (check_tracking, deepspeed_left_out, finish_tracking, gathered_state_dict, is_sharded,
                                        make_accelerator, start_tracking, unwrapped,
                                        zero3_init_as_configured)
from peft_ft.engine.device import check_device, setup_torch
from peft_ft.engine.precision import FrozenBf16, frozen_bf16, native_bf16_cpu
from peft_ft.engine.train import Checkpointed, TrainHooks, steps_per_epoch, track, train
from peft_ft.errors import PeerLost, PeftFtError
from peft_ft.kernels import install
from peft_ft.log import setup_logging
from peft_ft.methods import METHODS, check_on_skeleton, needs_skeleton
from peft_ft.models.hub_cache import EMBEDDED_HUB_ID, register_embedded
from peft_ft.models.integrity import base_config
from peft_ft.models.loading import (
    EMBEDDED_NAME,
    check_model_config,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    resolve_model,
    settle_hub_mode,
)
from peft_ft.models.safety import remote_code
from peft_ft.recipe.load import load_recipe
from peft_ft.recipe.schema import Recipe
from peft_ft.rundir import portable
from peft_ft.rundir.card import model_card
from peft_ft.rundir.layout import (
    CARD,
    CHECKPOINTS,
    INFO,
    LOG,
    METRICS,
    RAISABLE_ON_RESUME,
    RECIPE,
    RunDirLock,
    check_output_place,
    clean_stale_saves,
    clean_stale_siblings,
    create_run_dir,
    fingerprint,
    recipe_changes,
    recipe_text,
    record_splits,
    recorded_fingerprint,
)
from peft_ft.storage import folder_size, human_size, machine_problem, save_pretrained_atomic, write_atomic, write_json
from peft_ft.tasks import TASKS, Task
from peft_ft.version import __version__

log = logging.getLogger("peft_ft")


def run(recipe: Recipe, data_dir: str | None = None, hooks: TrainHooks | None = None) -> Path:
    """Train and evaluate one recipe; returns the run folder. Started by torchrun or accelerate launch:
    data-parallel over its processes (peft_ft.engine.distributed), the main process alone writing the folder.
    `hooks` reach the training loop (`peft-ft sweep` hears every evaluation through `on_evaluation`)."""
    recipe = remote_code(recipe)  # given on the command line: its own model.trust_remote_code decides (warned)
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    location, data, resolved_dir = preflight(recipe, data_dir)
    distributed.check_environment()
    accelerator = make_accelerator(recipe)  # after the input checks: bad input ends every process before any waiting

    def new_run_dir() -> Path:
        for stale in clean_stale_siblings(recipe):
            log.info("removed %s, left by a save that was killed", stale)
        run_dir = create_run_dir(recipe)
        try:
            write_atomic(run_dir / RECIPE, recipe_text(recipe))
        except BaseException:  # a full disk at the first file: no empty folder left for each attempt
            _discard(run_dir)
            raise
        return run_dir

    run_dir = distributed.on_main(new_run_dir)  # one folder, made by the main process, named to all
    with RunDirLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
        try:
            _run_in(run_dir, recipe, task, method, location, data, resolved_dir, resume_from=None,
                    accelerator=accelerator, hooks=hooks)
        except (PeftFtError, OSError, KeyboardInterrupt) as e:
            # Refused, the disk failed, or Ctrl-C / SIGTERM came, before anything worth keeping (a model/method misfit
            # found while building; an interrupted model load): no orphan folder holding only recipe.toml and
            # train.log, which --resume could never go on from. With a checkpoint, the run can be resumed: kept.
            if distributed.is_main() and not checkpoint.listed(run_dir) and not any(run_dir.glob("*.safetensors")):
                problem = machine_problem(e) if isinstance(e, OSError) else None  # told before the folder frees its inodes
                _discard(run_dir)
                if problem is not None:
                    raise PeftFtError(problem) from e
            raise
    return run_dir


def _discard(run_dir: Path) -> None:
    """Remove a run folder that holds nothing worth keeping, and <output.dir>/<name>/ when this run was all it held."""
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()


def resume(run_dir: str | Path, data_dir: str | None = None, trust_remote_code: bool = False) -> Path:
    """Continue a run that stopped (killed, Ctrl-C, crash) from its newest checkpoint, in the same folder.
    The folder's recipe.toml cannot turn remote code on: only `trust_remote_code` (--trust-remote-code)."""
    if distributed.world().size > 1:
        raise PeftFtError(f"--resume {run_dir}: resuming with several processes is not supported; resume with one "
                          f"process (peft-ft run --resume {run_dir}, without torchrun or accelerate launch)")
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE).is_file():
        raise PeftFtError(f"--resume {run_dir}: not a run folder (no recipe.toml); give the folder `peft-ft run` printed")
    with RunDirLock(run_dir):  # held until the resumed run ends: a second resume is refused, not raced
        return _resume_locked(run_dir, data_dir, trust_remote_code)


def _resume_locked(run_dir: Path, data_dir: str | None, trust_remote_code: bool) -> Path:
    if (run_dir / METRICS).is_file():
        raise PeftFtError(f"--resume {run_dir}: this run finished (metrics.json exists); there is nothing to resume")
    saved = checkpoint.listed(run_dir)
    folders = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if p.is_dir())
    if folders and folders[-1] not in saved:  # resuming from an older one would silently throw the steps since away
        missing = [f for f in checkpoint.FILES if not (folders[-1] / f).is_file()]
        then = f"remove it to resume from {saved[-1].name} (the steps since are lost)" if saved else \
            "start the run again (no complete checkpoint)"
        raise PeftFtError(f"--resume {run_dir}: the newest checkpoint {folders[-1].name} lacks {', '.join(missing)}; put the "
                          f"files back, or {then}")
    if not saved:
        raise PeftFtError(f"--resume {run_dir}: no checkpoint in {run_dir / CHECKPOINTS} (the run stopped before its "
                          f"first one: the end of epoch 1, or train.checkpoint_every steps); start it again instead")
    state = checkpoint.read_state(saved[-1])["run"]
    # Messages, relative data.dir and the run name refer to the recipe the run was started from.
    recipe = dataclasses.replace(load_recipe(run_dir / RECIPE), source=state.get("recipe_source", str(run_dir / RECIPE)))
    check_unchanged(run_dir, recipe, state)
    recipe = remote_code(recipe, trust_remote_code, str(run_dir))
    task, method = TASKS[recipe.task.type], METHODS[recipe.adapter.method]
    saved_dir = state.get("data_dir")
    if not data_dir and saved_dir and not Path(saved_dir).is_dir():
        # the run's own data folder, recorded at its start: its recipe's data.dir cannot be changed (check_unchanged)
        raise PeftFtError(f"--resume {run_dir}: the data folder this run trained on, {saved_dir}, is not there any more; "
                          f"give its new place with --data-dir (the files must be the same)")
    location, data, resolved_dir = preflight(recipe, data_dir or saved_dir, new_run=False)
    check_same_data(run_dir, state, data)
    for stale in clean_stale_saves(run_dir):  # partial checkpoints and saves a killed process left
        log.info("removed %s, left by a save that was killed", stale)
    _run_in(run_dir, recipe, task, method, location, data, resolved_dir, resume_from=saved[-1],
            accelerator=make_accelerator(recipe))
    return run_dir


def check_unchanged(run_dir: Path, recipe: Recipe, state: dict) -> None:
    """Resuming continues the recipe the run started with: the values recorded in its newest checkpoint
    (else the fingerprint in recipe.toml) must match recipe.toml now, but for a raised train.epochs or
    train.max_steps. A changed seed would silently give other weights, a changed lr be silently ignored."""
    recorded = state.get("recipe")
    if isinstance(recorded, dict):
        changes = recipe_changes(recorded, recipe)
    else:  # a checkpoint written before values were recorded: the fingerprint tells whether, not what
        mark = recorded_fingerprint(run_dir / RECIPE)
        changes = ["(which values: not recorded; the fingerprint in recipe.toml differs)"] if mark and mark != fingerprint(recipe) else []
    if changes:
        raise PeftFtError(
            f"--resume {run_dir}: recipe.toml differs from the recipe this run started with: {'; '.join(changes)}. "
            f"Resuming would mix two recipes in one model. Put the old values back, or start a new run with the new "
            f"recipe (only raising {' / '.join(RAISABLE_ON_RESUME)} may change on resume)")
    if fingerprint(recipe) != recorded_fingerprint(run_dir / RECIPE):
        write_atomic(run_dir / RECIPE, recipe_text(recipe))  # a raised epochs / max_steps: the record follows


def data_digests(data: TaskData) -> dict:
    """sha256 of each split's rows as the task read them, and of the label list: what `--resume` compares."""
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    return {"splits": {name: digest(split.examples) for name, split in data.splits.items()}, "labels": digest(data.labels)}


def check_same_data(run_dir: Path, state: dict, data: TaskData) -> None:
    """A resumed run trains on the rows it started on. The recipe names files, not their contents: an edited,
    replaced or regenerated file (or another --data-dir) would silently continue on other data, and the
    restored data order would index other rows. Checkpoints written before digests were recorded pass."""
    recorded = state.get("data")
    if not isinstance(recorded, dict):
        return
    now = data_digests(data)
    changed = sorted(n for n in {*recorded.get("splits", {}), *now["splits"]} if recorded.get("splits", {}).get(n) != now["splits"].get(n))
    if recorded.get("labels") != now["labels"]:
        changed.append("labels")
    if changed:
        where = ", ".join(f"{n} ({data.splits[n].source})" if n in data.splits else n for n in changed)
        raise PeftFtError(f"--resume {run_dir}: the data differs from what this run started on: {where}. Resuming would "
                          f"continue on other rows. Put the files (or --data-dir) back as they were, or start a new run")


def preflight(recipe: Recipe, data_dir: str | None, new_run: bool = True, quick: bool = False):
    """Everything knowable before a run folder is made, and all that `peft-ft validate` checks: where run
    folders go (`new_run`), the model folder and its config.json (task fit, bounds), the device, the data files,
    rows and labels. Returns (model location, the loaded data, the data folder). torch is imported only for a
    CUDA recipe, for named targets, and for a method's own pre-flight: `quick` (validate) skips that one on the
    model types it is known to pass."""
    task = TASKS[recipe.task.type]
    if new_run:
        check_output_place(recipe)
    settle_hub_mode(recipe)
    location = resolve_model(recipe)
    method = METHODS[recipe.adapter.method]
    check_model_config(location, recipe, task.auto_class, method.config_check)
    config = base_config(location)
    model_type = (config or {}).get("model_type")
    if method.preflight and not (quick and model_type in method.preflight_passes):
        # what only the architecture can answer (prefix tuning: a real forward with a prefix)
        method.preflight(location, recipe, task.auto_class, task.peft_task_type)

    check_device(recipe)
    check_tracking(recipe)
    resolved_dir = None if recipe.data.hub else resolve_data_dir(recipe, data_dir)
    data = task.load(recipe, resolved_dir)
    task.check_tokens(data, location, recipe)
    if not any(getattr(data.splits[n], "capped", True) for n in data.eval_names):  # predict splits (capped False) have no labels
        log.warning("%s: no validation or test split: nothing will be evaluated, and the last epoch is kept (no best "
                    "epoch to pick). Set data.validation (or data.validation_fraction) to measure the run", recipe.source)
    t = recipe.train
    if method.steps_check and t.max_steps and steps_per_epoch(len(data.splits["train"].examples), t) * t.epochs >= t.max_steps:
        # Every row gives at least one batch row, so the run's step count is exactly train.max_steps: its check
        # (AdaLoRA's schedule) answers now rather than after the model is loaded.
        method.steps_check(recipe, t.max_steps)
    if needs_skeleton(recipe, model_type):
        check_on_skeleton(location, recipe, task.auto_class, task.model_kwargs(data))
    return location, data, resolved_dir


def _run_in(run_dir: Path, recipe: Recipe, task: Task, method, location: str, data: TaskData, data_dir: Path | None,
            resume_from: Path | None, accelerator, hooks: TrainHooks | None = None) -> None:
    setup_logging(run_dir / LOG if distributed.is_main() else None)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)  # progress and results are the main process's to report
    try:
        log.info("run folder %s", run_dir)
        for note in data.notes:
            log.info(note)
        log.info("splits: %s", ", ".join(f"{n} {len(s.examples)}" for n, s in data.splits.items()))
        if distributed.is_main() and (recipe.data.format == "label_studio" or recipe.data.validation_fraction or recipe.data.test_fraction):
            # splits carved or exported: log and keep what went where (sources relative to the data folder)
            record_splits(data.splits, data.labels, run_dir,
                          portable.data_sources({n: s.source for n, s in data.splits.items()}, data_dir))
        # Saved in every checkpoint: `--resume` compares the recipe it finds with these values.
        run_state = {"recipe_source": recipe.source, "data_dir": str(data_dir) if data_dir else None,
                     "recipe": recipe.to_dict(), "fingerprint": fingerprint(recipe), "data": data_digests(data)}
        _train_evaluate_save(recipe, task, method, location, data, run_dir, accelerator, resume_from, run_state, hooks)
    finally:
        setup_logging(None)  # detach train.log so later log lines of this process do not land in it
        if distributed.is_main() and (run_dir / METRICS).is_file():
            try:
                portable.scrub_log(run_dir, str(data_dir) if data_dir else None)
            except (PeftFtError, OSError) as e:  # a full disk: the error that stopped the run, if any, is the one to see
                log.warning("%s keeps this machine's paths: %s", run_dir / "train.log", e)


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
    if frozen_bf16(recipe):
        log.info("bf16: frozen base in bfloat16, trained weights in float32: %s",
                 ", ".join(f"{k} {v}" for k, v in FrozenBf16.attach(model).items()))
        if not native_bf16_cpu():
            log.warning("this CPU has no native bf16 (AMX or AVX512-BF16): bf16 is emulated here and likely slower "
                        "than float32; train.mixed_precision = \"no\" may train faster")
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if use_fast_kernels(recipe, device):
        log.info("fast kernels: %s", ", ".join(f"{k} {v}" for k, v in install(model).items()))
        model.peft_ft_fast_kernels = True  # the loop then also keeps freed memory (peft_ft.kernels.allocator)
    return model, tokenizer, heads


def use_fast_kernels(recipe: Recipe, device) -> bool:
    """train.fast_kernels on CPU, in float32 or with a bf16 frozen base (peft_ft.engine.precision): they were
    written and measured for that; on CUDA peft's stock layers run until a GPU measurement says otherwise,
    and under autocast too (autocast does not reach into the fused autograd functions)."""
    on_cpu = str(device).split(":")[0] == "cpu"
    # Under DeepSpeed ZeRO-3 a frozen weight is a placeholder outside its module's own forward (DeepSpeed gathers it
    # in the module's hooks); the fused layers read it directly.
    return (recipe.train.fast_kernels and on_cpu and not distributed.deepspeed_in_one_process()
            and (recipe.train.mixed_precision == "no" or frozen_bf16(recipe)))


def _train_evaluate_save(recipe: Recipe, task: Task, method, location: str, data: TaskData, run_dir: Path,
                         accelerator, resume_from: Path | None = None, run_state: dict | None = None,
                         hooks: TrainHooks | None = None) -> None:
    resumed_at = None if resume_from is None else checkpoint.read_state(resume_from)["step"]
    start_tracking(accelerator, recipe, run_dir, resumed_at)
    status = "FAILED"
    try:
        _train_evaluate_save_tracked(recipe, task, method, location, data, run_dir, accelerator, resume_from, run_state, hooks)
        status = "FINISHED"
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: stopped, for `--resume` to go on from a checkpoint
        status = "KILLED"
        if not isinstance(e, Checkpointed) and distributed.is_main():  # stopped at once: say where it can go on from
            log.warning("interrupted: %s", _resume_hint(run_dir))
        raise
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        # A signal (or a kill, a crash) stopped another process first, while this one waited for it in a collective.
        status, hint = "KILLED", "see the main process's log"  # only the main process has the run folder
        if distributed.is_main():
            hint = _resume_hint(run_dir)
            log.warning("another process of this run stopped: %s", str(e).strip().splitlines()[0][:300])
            log.warning("interrupted: %s", hint)
        raise PeerLost(f"another process of this run stopped; {hint}") from e
    finally:
        finish_tracking(accelerator, status)


def check_finite_weights(model, recipe: Recipe) -> None:
    """The loss is checked before each step is applied; a step can still leave weights that are not finite (an
    extreme weight decay): such an adapter is never evaluated or saved as if it were trained."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.detach().isfinite().all()]
    if bad:
        raise PeftFtError(f"{recipe.source}: training left {len(bad)} trained weight tensor(s) with NaN or infinity "
                          f"({bad[0]}, ...); nothing was saved. Lower train.lr (now {recipe.train.lr or 'the default'}) or "
                          f"train.weight_decay (now {recipe.train.weight_decay}), and start a new run")


def _resume_hint(run_dir: Path) -> str:
    saved = checkpoint.listed(run_dir)
    if not saved:
        return "no checkpoint had been written yet; start the run again"
    return (f"the newest checkpoint is {saved[-1].name} (the steps after it are lost); continue with "
            f"`peft-ft run --resume {run_dir}` (in one process)")


def _train_evaluate_save_tracked(recipe: Recipe, task: Task, method, location: str, data: TaskData, run_dir: Path,
                                 accelerator, resume_from: Path | None, run_state: dict | None,
                                 hooks: TrainHooks | None) -> None:
    import shutil

    setup_torch(recipe)
    device = accelerator.device
    # DDP copies the main process's weights to the others when it wraps the model (peft_ft.engine.train).
    with zero3_init_as_configured(accelerator):
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

    lr = recipe.train.lr or method.default_lr  # recipe.toml keeps 0 ("the method's default"): metrics.json says which
    result = train(
        model, features["train"], recipe, lr=lr, pad_id=pad_id, device=device,
        validate=validate if "validation" in data.splits else None, metric=metric,
        run_dir=run_dir, resume_from=resume_from, run_state=run_state, accelerator=accelerator, hooks=hooks,
    )
    if not is_sharded(accelerator):  # every process holds the same whole weights: all refuse alike
        check_finite_weights(model, recipe)
    FrozenBf16.detach(model)  # a bf16 base: scored and saved as users will load it, on the float32 base
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

    with deepspeed_left_out(accelerator):  # unwrapping a DDP model imported DeepSpeed for seconds, the others waiting
        saved_model = unwrapped(accelerator, model)
        expected = method.expected_save_warnings(saved_model) if method.expected_save_warnings else {}
        with expected_warnings(expected):
            weight_files = save_model(saved_model, tokenizer, method.is_adapter, run_dir, recipe.model.max_length,
                                      state_dict)
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
        "train": {"lr": lr, **result.summary()},
    }
    params = {k: info[k] for k in ("trainable_params", "total_params", "trainable_percent", "weight_bytes")}
    if method.is_adapter:
        portable.finish_adapter_config(run_dir, info)
    portable.write_labels(run_dir, data.labels)
    write_json(run_dir / INFO, info)
    # The snippets name the folder as written (runs/NAME/<timestamp>): copied as it is, they run there. Before
    # metrics.json, which marks the run finished: a disk that fills here leaves a run `--resume` completes.
    write_atomic(run_dir / CARD, model_card(portable.portable_recipe(recipe), info, metrics, folder_name=run_dir.name))
    write_json(run_dir / METRICS, {**metrics, "train": info["train"], "params": params})
    # Written in full while the run could be resumed; now without the machine's paths.
    write_atomic(run_dir / RECIPE, portable.recipe_text(recipe, run_dir))
    if info["base_model_source"] == "embedded":
        _register_embedded()
    # The saved weights are the best epoch's: the checkpoints only served to resume an unfinished run.
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    log.info("saved %s (%s) in %s", ", ".join(info["weight_files"]), human_size(info["weight_bytes"]), run_dir)


def _register_embedded() -> None:
    """The adapter names its base `sentence-transformers/all-MiniLM-L6-v2`: make that id resolve
    offline on this machine (peft_ft.models.hub_cache), so stock loaders take the folder at once."""
    try:
        snapshot, what = register_embedded()
        log.info("hub cache: %s %s (%s)", EMBEDDED_HUB_ID, what, snapshot)
    except PeftFtError as e:
        log.warning("%s; stock loaders will not find the base offline until `peft-ft register-embedded` succeeds", e)


def count_parameters(model) -> tuple[int, int]:
    # A base DeepSpeed ZeRO-3 loaded partitioned (zero3_init_flag): each parameter's size is in ds_numel, numel() 0.
    sizes = [(p.requires_grad, getattr(p, "ds_numel", p.numel())) for p in model.parameters()]
    return sum(n for trains, n in sizes if trains), sum(n for _, n in sizes)


def numbers(scores: dict) -> dict:
    """The plain numbers of a split's scores (per-label tables left out): what trackers and callbacks take."""
    return {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def expected_warnings(expected: dict[str, str]):
    """Warnings the method expects of this save (`Method.expected_save_warnings`) ignored, their notes logged instead."""
    with warnings.catch_warnings():
        for pattern, note in expected.items():
            warnings.filterwarnings("ignore", message=pattern)
            log.info("%s", note)
        yield


def save_model(model, tokenizer, is_adapter: bool, run_dir: Path, max_length: int, state_dict: dict | None = None) -> list[Path]:
    """Adapter methods: the adapter and its head only. Full: a complete model folder with tokenizer.
    `state_dict`: the full weights gathered from a sharded run (None: the model's own)."""
    files = save_pretrained_atomic(model, run_dir, state_dict)
    if not is_adapter:
        # The run's input length travels with the folder: the base's model_max_length (often 1e30, "unset") would make
        # a stock pipeline read more than the run did, or fail past the model's positions. The tokenizer is not used
        # after saving.
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(run_dir)
    return [f for f in files if f.suffix == ".safetensors"]
