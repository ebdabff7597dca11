"""The engine under the training loop: one `accelerate.Accelerator` per run.

accelerate does what is not ours to write: joining the processes `accelerate launch` or `torchrun`
started (gloo on CPU, NCCL on CUDA), wrapping the model in DDP (gradients averaged in buckets while
backward runs) or in FSDP / DeepSpeed when the launcher's config file asks for them, mixed
precision (autocast, and fp16 loss scaling), and the experiment trackers. The recipe stays the same
whatever the launcher: `accelerate launch --config_file configs/accelerate/ddp.yaml -m peft_ft run R`.

What stays ours: the batches (peft_ft.data.batching), how a batch is shared between processes
(peft_ft.engine.distributed), the checkpoints (peft_ft.engine.checkpoint) and the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from peft_ft.engine import distributed
from peft_ft.engine.device import use_cuda
from peft_ft.engine.precision import frozen_bf16
from peft_ft.errors import PeftFtError
from peft_ft.models.loading import deepspeed_unused, url_answers
from peft_ft.recipe.schema import Recipe
from peft_ft.rundir.layout import TRACKING
from peft_ft.storage import write_json

log = logging.getLogger("peft_ft")


def make_accelerator(recipe: Recipe):
    """The run's Accelerator. The recipe decides precision; the launcher (its environment, from
    `accelerate launch --config_file`) decides processes and DDP / FSDP / DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    if distributed.world().size == 1:
        # accelerate keeps its state per process; several runs in one process (tests, `compare`) may
        # each choose another precision. With several processes there is one run per process.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    # "no" is every launcher's default (and the shipped configs' value): only a 16-bit request that differs is news
    if launcher_precision not in (None, "no", recipe.train.mixed_precision) and distributed.is_main():
        log.warning("the launcher asks for mixed precision %r; the recipe's train.mixed_precision %r is used",
                    launcher_precision, recipe.train.mixed_precision)
    on_cpu = not use_cuda(recipe)
    if on_cpu and distributed.deepspeed_in_one_process():
        skip_deepspeed_shm_build()
    accelerator = Accelerator(
        # accelerate applies DeepSpeed only when not told cpu=True. One CPU process then runs it as on GPUs (ZeRO-3's
        # partitioned weights, gathered to save). Several CPU processes do not: accelerate's state would count one
        # process where DeepSpeed's gloo group counts all, so they stay plain DDP (`notes` says so).
        cpu=on_cpu and not distributed.deepspeed_in_one_process(),
        # A bf16 frozen base casts its own weights (peft_ft.engine.precision): no autocast on top.
        mixed_precision="no" if frozen_bf16(recipe) else recipe.train.mixed_precision,
        # Our loop weights each share and micro-batch by what its loss averages over, so accelerate
        # must not divide the loss again: accumulation is done by the loop (peft_ft.engine.train).
        gradient_accumulation_steps=1,
        # Trackers are opened by `start_tracking` once the run folder they write into exists.
        # LoRA keeps frozen weights out of DDP's buckets already (requires_grad False); every trainable
        # weight takes part in each forward, so DDP need not search the graph for unused ones.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    if accelerator.distributed_type.value == "DEEPSPEED" and recipe.train.gradient_accumulation_steps > 1:
        # DeepSpeed steps its optimizer inside backward, by its own accumulation count: the loop's
        # weighted micro-batches would each become a step.
        raise PeftFtError(f"{recipe.source}: train.gradient_accumulation_steps: under DeepSpeed set it to 1 and put "
                          f"gradient_accumulation_steps in the accelerate config's deepspeed_config instead")
    return accelerator


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce (the deepspeed_shm_comm op) when it starts:
    114 s on 2 cores the first time in each environment, and it needs a C++ compiler. One process has nothing to
    reduce, so the op is marked unusable and DeepSpeed takes torch.distributed's collectives, as it does off Linux.
    A DeepSpeed without this table (another version) builds it as before."""
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)  # probed on first access, then cached in the module
    if isinstance(ops, dict) and "deepspeed_shm_comm" in ops:
        ops["deepspeed_shm_comm"] = False


def notes(accelerator) -> list[str]:
    """What the run log should say about the engine (the launcher's choices as accelerate applied them)."""
    kind = accelerator.distributed_type.value
    if (accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"):
        # `accelerate launch --num_processes 2 --cpu` hands several CPU processes to mpirun; without it one starts
        return ["accelerate launch asked for several CPU processes but started one (its --cpu launcher leaves them to "
                "mpirun): this run trains in one process. For data-parallel CPU training launch with "
                "--config_file configs/accelerate/cpu_ddp.yaml"]
    if kind in ("FSDP", "DEEPSPEED"):
        return [f"accelerate: {kind} over {accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"]
    if distributed.deepspeed_launch():
        return ["the launcher's config asks for DeepSpeed, which accelerate runs on CPU with one process only: these "
                "CPU processes train data-parallel (DDP), each holding the whole model"]
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate applies FSDP to GPU processes only; CPU processes run as plain DDP (see README).
        return ["the launcher's config asks for FSDP, but accelerate shards models only on GPUs: these CPU "
                "processes train data-parallel (DDP), each holding the whole model"]
    return []


def fsdp_blocks(model) -> list[str]:
    """The model's `_no_split_modules` (the blocks accelerate's transformer-based FSDP2 wrapping shards one by one)
    without those that hold the input embedding.

    accelerate (1.15) shards each such block and then the input embedding on its own. BERT-family models list
    their embeddings block among them, so the word embedding would be sharded twice, which torch refuses ("Invariant
    encountered: value was None", seen with torch 2.11 on an H200 and 2.13 on CPU). Left out of the list, the
    embeddings block is sharded once, as the input embedding's own unit, and the rest with the root."""
    embedding = model.get_input_embeddings().weight
    holders = {type(m).__name__ for m in model.modules() if m is not model and any(p is embedding for p in m.parameters())}
    return [name for name in sorted(getattr(model, "_no_split_modules", None) or []) if name not in holders]


def fit_fsdp_wrapping(accelerator, model) -> None:
    """Under FSDP2 with transformer-based wrapping and no block classes named in the launcher's config, name the
    blocks accelerate should shard (`fsdp_blocks`), before `accelerator.prepare`."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type.value != "FSDP" or plugin is None or plugin.fsdp_version != 2:
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)  # a functools.partial, or not
    if plugin.transformer_cls_names_to_wrap is None and policy is transformer_auto_wrap_policy:
        plugin.transformer_cls_names_to_wrap = fsdp_blocks(model)
        log.info("FSDP2 shards these blocks one by one: %s", ", ".join(plugin.transformer_cls_names_to_wrap) or "none")


@contextlib.contextmanager
def zero3_init_as_configured(accelerator):
    """Load the model whole unless the launcher's config sets `zero3_init_flag: true`.

    accelerate (1.16) hands transformers its DeepSpeed config whatever that flag says, and transformers then loads
    every ZeRO-3 model partitioned (`deepspeed.zero.Init`). On a GPU that happens on the device, where a fresh task
    head is drawn from the CUDA generator rather than the CPU's: the same seed gave another head than a plain run
    (an H200, dropout off: step-1 loss 2.195 against 2.257, test F1 after 200 steps 0.775 against 0.788). Loaded
    whole, the model starts from the weights every other mode starts from, and DeepSpeed partitions it in
    `accelerator.prepare`. Models too large to load whole in each process set the flag to true."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type.value != "DEEPSPEED" or plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # ZeRO-1/2 configs too: accelerate forces their flag false, and they load whole anyway
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # as accelerate left it, for what reads it later


def fit_deepspeed_dtypes(accelerator, model) -> None:
    """Under DeepSpeed with bf16/fp16, the model's own weights in that 16-bit type before `accelerator.prepare`.

    DeepSpeed keeps float32 master copies in its optimizer and wants the module's weights 16-bit. Under ZeRO-3 with
    `zero3_init_flag: true` the base is loaded partitioned and already 16-bit, while peft makes the adapter's weights
    (and the head's copy) float32 afterwards; ZeRO-3 then refuses the mixed dtypes (`defragment`:
    "assert len(set(t.dtype ...)) == 1", deepspeedai/DeepSpeed#8072). Saved weights are float32 again (`gathered_state_dict`)."""
    import torch

    if accelerator.distributed_type.value != "DEEPSPEED" or accelerator.mixed_precision not in ("bf16", "fp16"):
        return
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):  # ds_id: partitioned already
            p.data = p.data.to(dtype)


def fit_deepspeed_batch(accelerator, batch_size: int) -> None:
    """Under DeepSpeed, tell it the per-process micro-batch before `accelerator.prepare`, unless the launcher's
    config names one. accelerate reads it from the dataloaders it prepares, and ours are not prepared: the loop
    makes its own length-grouped batches and splits each across the processes (peft_ft.engine.distributed).
    DeepSpeed uses it for its batch bookkeeping only; the loop still weights each process's share."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type.value != "DEEPSPEED" or plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = max(1, batch_size // accelerator.num_processes)


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: parameters and optimizer state are split across processes."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def start_tracking(accelerator, recipe: Recipe, run_dir: Path, resumed_at: int | None = None) -> None:
    """Open the recipe's trackers, writing under `<run>/tracking/` and offline unless the user's
    environment says otherwise (MLFLOW_TRACKING_URI, WANDB_MODE / WANDB_DIR). `resumed_at`: the step of the
    checkpoint a `--resume` goes on from."""
    if not recipe.train.report_to:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    folder = run_dir / TRACKING
    name = recipe.output.name or Path(recipe.source).stem
    ids = _tracker_ids(folder)  # a resumed run's: it goes on in the same tracker runs, not in new ones
    # purge_step: TensorBoard drops what the killed process logged after the checkpoint (those steps run again),
    # rather than drawing them twice.
    kwargs = {"tensorboard": {"logging_dir": str(folder / "tensorboard"),
                              **({"purge_step": resumed_at + 1} if resumed_at is not None else {})},
              "mlflow": {"logging_dir": str(folder / "mlflow-artifacts"), **({"run_id": ids["mlflow"]} if "mlflow" in ids else {})},
              "wandb": {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": os.environ.get("WANDB_DIR", str(folder)),
                        **({"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {})}}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if "mlflow" in recipe.train.report_to and _local_store(os.environ.get("MLFLOW_TRACKING_URI")):
            # the user's own file store: MLflow 3 refuses it as it would ours, unless this opt-out is set
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if "mlflow" in recipe.train.report_to and "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            # A file store: no server, no database, and it travels with the run folder. MLflow 3 keeps it
            # "in maintenance mode" and refuses it unless this opt-out is set; MLFLOW_TRACKING_URI
            # (a database or a server) replaces it altogether.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            global _our_mlflow_uri
            _our_mlflow_uri = (folder / "mlruns").resolve().as_uri()
            mlflow.set_tracking_uri(_our_mlflow_uri)
    # Built here rather than named to Accelerator(log_with=...): accelerate wants the logging folder
    # when the Accelerator is made, before the main process has made the run folder.
    classes = {**LOGGER_TYPE_TO_CLASS, **({"mlflow": _reopened_mlflow()} if "mlflow" in ids else {})}
    try:
        accelerator.log_with = [classes[n](name, **kwargs[n]) for n in recipe.train.report_to]
        # The hyperparameters once: MLflow refuses a changed value (a resume that raised train.epochs) in a run it reopens.
        accelerator.init_trackers(name, config=None if ids else _flat_config(recipe))
    except Exception as e:  # a server down, no wandb login, a store MLflow refuses: said before any training
        raise PeftFtError(_tracker_failure(e, recipe)) from None
    if accelerator.is_main_process:
        _save_tracker_ids(accelerator, folder)
    log.info("tracking: %s under %s%s", ", ".join(recipe.train.report_to), folder, " (continuing its runs)" if ids else "")


TRACKER_IDS = "ids.json"  # under tracking/: the tracker runs of this run folder, which `--resume` continues


def check_tracking(recipe: Recipe) -> None:
    """What keeps a tracker from starting, found before a run folder exists (`run` and `validate`): an MLflow server
    that does not answer (MLflow retried for four minutes before failing), wandb online without an API key."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in recipe.train.report_to and uri.startswith(("http://", "https://")) and not url_answers(uri):
        raise PeftFtError(f"{recipe.source}: train.report_to: the MLflow server at MLFLOW_TRACKING_URI={uri} does not "
                          f"answer; start it, or unset MLFLOW_TRACKING_URI to log into the run folder")
    if ("wandb" in recipe.train.report_to and os.environ.get("WANDB_MODE", "offline") == "online"
            and not os.environ.get("WANDB_API_KEY") and not _wandb_login()):
        raise PeftFtError(f"{recipe.source}: train.report_to: WANDB_MODE=online, but no wandb API key (WANDB_API_KEY, or "
                          f"`wandb login`); log in, or leave WANDB_MODE unset to log offline into the run folder")


def _wandb_login() -> bool:
    """wandb keeps its key in ~/.netrc (or $NETRC) under its API host."""
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _local_store(uri: str | None) -> bool:
    """A tracking URI that names a folder (a path, or file://) rather than a server or a database."""
    return bool(uri) and ("://" not in uri or uri.startswith("file:"))


def _tracker_failure(error: Exception, recipe: Recipe) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    module = type(error).__module__.split(".")[0]
    if module == "mlflow" or (module != "wandb" and recipe.train.report_to == ["mlflow"]):
        where = os.environ.get("MLFLOW_TRACKING_URI")
        hint = (f"check MLFLOW_TRACKING_URI (now {where}): the server must be up, or unset it to log into the run folder"
                if where else "check that the run folder is writable")
        return f"{recipe.source}: train.report_to: MLflow could not start ({first}); {hint}"
    if module == "wandb" or recipe.train.report_to == ["wandb"]:
        return (f"{recipe.source}: train.report_to: wandb could not start ({first}); WANDB_MODE=offline (peft-ft's "
                f"default when it is unset) logs without an account, or run `wandb login`")
    return f"{recipe.source}: train.report_to: a tracker ({', '.join(recipe.train.report_to)}) could not start ({first})"


def _reopened_mlflow():
    """accelerate's MLflow tracker for a resumed run, leaving out the steps the reopened MLflow run holds already.

    The killed process logged steps past its last checkpoint; the resume trains them again, from that checkpoint,
    to the same values. TensorBoard purges them (purge_step); MLflow cannot delete a metric's points, and logged
    twice they made its charts run back and forth."""
    from accelerate.tracking import MLflowTracker

    class ReopenedMLflow(MLflowTracker):
        logged_until: dict = {}  # metric -> the last step the reopened run holds it at

        def start(self):
            super().start()
            import mlflow

            client, run_id = mlflow.MlflowClient(), self.active_run.info.run_id
            self.logged_until = {key: max(m.step for m in client.get_metric_history(run_id, key))
                                 for key in client.get_run(run_id).data.metrics}

        def log(self, values: dict, step: int | None = None, **kwargs):
            # per metric: the killed process may have logged step S's loss and died in S's evaluation, whose
            # numbers the resume must still log
            fresh = values if step is None else {k: v for k, v in values.items() if step > self.logged_until.get(k, -1)}
            if fresh:
                super().log(fresh, step=step, **kwargs)

    return ReopenedMLflow


def _tracker_ids(folder: Path) -> dict:
    try:
        ids = json.loads((folder / TRACKER_IDS).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet (a new run), or unreadable: new tracker runs
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _save_tracker_ids(accelerator, folder: Path) -> None:
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
    if ids:
        write_json(folder / TRACKER_IDS, ids)


# The MLflow file store this process pointed MLflow at, if any. mlflow.set_tracking_uri also writes
# MLFLOW_TRACKING_URI into os.environ: left there, the next run in this process (a sweep's next trial, a
# second peft_ft run() from a notebook) would take it for the user's own setting and log into this run's folder.
_our_mlflow_uri: str | None = None


def finish_tracking(accelerator, status: str = "FINISHED") -> None:
    """Close the trackers (not `end_training`: that also ends the process group, still needed to evaluate).
    `status`: FINISHED, KILLED (Ctrl-C, SIGTERM: `--resume` reopens the run) or FAILED, as MLflow names them."""
    global _our_mlflow_uri
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow" and status != "FINISHED":
            import mlflow

            mlflow.end_run(status=status)
        elif tracker.name == "wandb" and status != "FINISHED":
            tracker.run.finish(exit_code=1)
        else:
            tracker.finish()
    accelerator.trackers = []
    if _our_mlflow_uri is not None:
        import mlflow

        if mlflow.get_tracking_uri() == _our_mlflow_uri:  # not replaced by the user's code meanwhile
            mlflow.set_tracking_uri(None)  # also removes MLFLOW_TRACKING_URI from os.environ
        _our_mlflow_uri = None


def _flat_config(recipe: Recipe) -> dict:
    """Hyperparameters as the trackers want them: flat, numbers and strings only."""
    flat = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def unwrapped(accelerator, model):
    """The model without accelerate's wrappers. In one plain process there are none, and accelerate's
    `unwrap_model` would import DeepSpeed whenever it is installed (the [test] extra), which prints its
    "Setting accelerator to CPU" warning into every CPU run's output."""
    return model if accelerator.distributed_type.value == "NO" else accelerator.unwrap_model(model)


@contextlib.contextmanager
def deepspeed_left_out(accelerator):
    """`deepspeed_unused` around a save, unless the run is under DeepSpeed (its engine must be unwrapped then)."""
    if accelerator.distributed_type.value == "DEEPSPEED":
        yield
        return
    with deepspeed_unused():
        yield


def gathered_state_dict(accelerator, model) -> dict | None:
    """The whole model's weights, gathered from its shards (FSDP, DeepSpeed ZeRO-3) for saving; every
    process must call this. None when each process holds the whole model (one process, DDP)."""
    if not is_sharded(accelerator):
        return None
    # The prepared (wrapped) model is the one that can gather; accelerate keeps it in `_models`.
    prepared = next((m for m in accelerator._models if accelerator.unwrap_model(m) is model), model)
    state = accelerator.get_state_dict(prepared)
    # Under bf16/fp16 DeepSpeed's gather gives its 16-bit copies: saved as float32, like the trained weights of every
    # other mode (and the base they are loaded onto).
    return None if state is None else {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
