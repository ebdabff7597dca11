"""The training loop: a short plain-PyTorch loop on `accelerate` rather than `transformers.Trainer`.

Why not Trainer: on a 2-core CPU its per-step machinery (callbacks, logging, the DataLoader and
collator round trips) costs a visible share of each step, and what makes CPU training fast here
is controlling the batches themselves (length-grouped, padded only to their own longest row,
tokenized once). The loop does only: forward, backward, clip, step, schedule; evaluation (once per
epoch, or every `train.eval_every` steps) with early stopping; the best evaluation's trainable
weights kept in memory; checkpoints.

accelerate (peft_ft.engine.accelerator) runs underneath: DDP / FSDP / DeepSpeed as the launcher says, mixed
precision, loss scaling, trackers. Gradient accumulation and the sharing of a batch between
processes stay here, because both weight each part by what its loss averages over (the label
tokens of a NER batch differ per part), which keeps a run's result the same whatever the number of
processes and accumulation steps (up to float rounding).

Seams for other features, each in one place: the adapter method's record (peft_ft.methods.Method:
`on_train_start` before the optimizer is built, its per-step callback, `lr_scale` for the optimizer's
groups in `param_groups`), and the caller's `TrainHooks`: `after_step` (after each optimizer step,
gradients still present) and `on_evaluation` (after each evaluation, with its history entry).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peft_ft.data.batching import pad_batch, train_batches
from peft_ft.engine import checkpoint, distributed
from peft_ft.engine.accelerator import fit_deepspeed_batch, fit_deepspeed_dtypes, fit_fsdp_wrapping, is_sharded, make_accelerator, notes
from peft_ft.engine.precision import precision_label
from peft_ft.errors import PeftFtError, Terminated
from peft_ft.kernels.allocator import keep_freed_memory, release_freed_memory
from peft_ft.log import console
from peft_ft.methods import METHODS, TrainingStart
from peft_ft.recipe.schema import Recipe

log = logging.getLogger("peft_ft")


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens seen
    best_epoch: int = 0
    best_step: int = 0
    best_metric: str = ""
    best_value: float | None = None
    stopped_early: bool = False
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float = 0.0  # torch.cuda.max_memory_allocated over the run, on CUDA
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
            "samples_per_second": round(self.samples / self.seconds, 2) if self.seconds else 0.0,
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "stopped_early": self.stopped_early,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "peak_cuda_mib": round(self.peak_cuda_mib, 1),
            "history": self.history,
        }


@dataclass
class TrainHooks:
    """The caller's seams into the loop (the adapter method brings its own through its record); each is
    called on every process. `after_step(model, step)` runs after each optimizer step, before the
    gradients are cleared; `on_evaluation(entry)` runs after each evaluation with its history entry
    (epoch, steps, train_loss, validation metric) and may raise to stop the run (an Optuna pruner)."""

    after_step: Callable[[object, int], None] | None = None
    on_evaluation: Callable[[dict], None] | None = None


def param_groups(model, lr: float, weight_decay: float, lr_scale=None) -> list[dict]:
    """Trainable parameters by (decay, learning rate): no decay on biases and LayerNorm weights;
    `lr_scale(name)` multiplies the rate of some (LoRA+: the B matrices), each rate its own group."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = weight_decay if p.ndim >= 2 else 0.0
            rate = lr * (lr_scale(name) if lr_scale else 1.0)
            groups.setdefault((decay, rate), {"params": [], "weight_decay": decay, "lr": rate})["params"].append(p)
    return list(groups.values())


def make_optimizer(model, lr: float, weight_decay: float, lr_scale=None):
    """AdamW over trainable parameters only (groups: `param_groups`)."""
    import torch

    groups = param_groups(model, lr, weight_decay, lr_scale)
    # fused: one kernel over all parameters; on this CPU a full fine-tuning step's update drops
    # from ~95 ms (foreach) to ~17 ms for MiniLM's 22.7M parameters. Not every device/dtype has it.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """`transformers.get_scheduler` by name (the names train.scheduler accepts, peft_ft.recipe.schema.SCHEDULERS)."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def loss_units(rows: list[dict]) -> int:
    """What a model's loss averages over: the label tokens (not -100) when labels are lists
    (token classification, seq2seq), else the rows."""
    if rows and isinstance(rows[0].get("labels"), list):
        return sum(1 for row in rows for label in row["labels"] if label != -100)
    return len(rows)


def forward_backward(model, rows: list[dict], pad_id: int, device, accelerator, micro_batch: int | None = None,
                     padding: dict | None = None) -> float:
    """Loss of one optimizer step's rows, its gradients left in the trainable parameters.

    The rows are cut into micro-batches of `micro_batch` (gradient accumulation); each process runs
    its strided share of every micro-batch. Each part's loss is weighted by its share of what the
    whole step's loss averages over (times the process count, since DDP averages over processes), so
    the gradient and the returned loss are the whole step's in one piece, up to float rounding, even
    when the parts differ in size or one is empty. `padding`: pad_batch's `multiple` and `max_width`."""
    import torch

    world = distributed.world()
    size = micro_batch or len(rows)
    parts = [rows[i:i + size] for i in range(0, len(rows), size)]
    total_units = max(1, loss_units(rows))
    total = None
    for k, part in enumerate(parts):
        mine = distributed.shard(part, world.rank, world.size)
        units = loss_units(mine)
        # Only the last part exchanges gradients: DDP's all-reduce waits until the step's end.
        sync = k == len(parts) - 1 or world.size == 1
        with nullcontext() if sync else accelerator.no_sync(model):
            if units == 0:  # an empty share still joins DDP's exchange, with a zero gradient
                out = model(**{k2: v.to(device) for k2, v in pad_batch(mine or part[:1], pad_id, **(padding or {})).items()})
                loss = sum(v.float().sum() for k2, v in out.items() if k2 != "loss" and torch.is_tensor(v)) * 0.0
            else:
                loss = model(**{k2: v.to(device) for k2, v in pad_batch(mine, pad_id, **(padding or {})).items()}).loss
                if units != total_units or world.size > 1:  # one process, one part: weight 1, skip the multiply
                    loss = loss * (units / total_units * world.size)
            accelerator.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    if world.size > 1:
        total = accelerator.reduce(total, reduction="sum") / world.size
    return total.item()


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def steps_per_epoch(rows: int, t) -> int:
    return math.ceil(rows / (t.batch_size * t.gradient_accumulation_steps))


def _idle_settings(t, total: int, per_epoch: int, validated: bool, rows: int) -> list[str]:
    """Settings that this run's step count (known once the data is read) leaves with nothing to do."""
    evaluations = sum(evaluation_due(s, s % max(1, per_epoch) == 0, s == total, t.eval_every) for s in range(1, total + 1))
    found = []
    if t.max_steps and t.max_steps > per_epoch * t.epochs:
        found.append(f"train.max_steps {t.max_steps} only caps the run: train.epochs {t.epochs} x {per_epoch} steps make "
                     f"{per_epoch * t.epochs}, where it ends; raise train.epochs to train longer")
    step_rows = t.batch_size * t.gradient_accumulation_steps
    if rows < step_rows:
        found.append(f"the training data has {rows} rows, fewer than the effective batch of {step_rows}: each step takes "
                     f"all {rows}")
    if t.early_stopping_patience and t.early_stopping_patience >= evaluations:
        found.append(f"train.early_stopping_patience {t.early_stopping_patience} cannot stop this run: it evaluates "
                     f"{evaluations} time(s) in {total} steps; lower it, or set train.eval_every")
    if t.eval_every and not validated:
        found.append("train.eval_every: there is no validation split to evaluate; every evaluation only records the "
                     "training loss (set data.validation or data.validation_fraction)")
    return found


def evaluation_due(step: int, epoch_done: bool, last_step: bool, eval_every: int) -> bool:
    """Every `eval_every` steps (and after the last step), or at each epoch's end when 0."""
    if eval_every:
        return step % eval_every == 0 or last_step
    return epoch_done or last_step


def train(model, features: list[dict], recipe: Recipe, *, lr: float, pad_id: int, device,
          validate: Callable[[int], dict | None] | None, metric: str, run_dir: Path | None = None,
          resume_from: Path | None = None, run_state: dict | None = None, accelerator=None,
          hooks: TrainHooks | None = None) -> TrainResult:
    """Train; at each evaluation `validate(epoch)` returns the validation scores (the main process's,
    shared with all; `metric` among them, higher is better) and the best evaluation's trainable
    weights are restored at the end. `train.early_stopping_patience` evaluations without a better
    value stop the run.

    With `run_dir`, a resumable checkpoint is written at each epoch end, after each evaluation (and
    every `train.checkpoint_every` steps), Ctrl-C saves one before stopping, and `resume_from` (a
    checkpoint folder) continues from one. `run_state` is stored in each checkpoint for the runner.

    `accelerator` (peft_ft.engine.accelerator.make_accelerator; made here when None) wraps the model: with several
    processes every process runs this loop over the same batches, each on its share of every batch;
    only the main process writes checkpoints. Ctrl-C then just stops: the processes could not agree
    on the step to save at without one more exchange per step.
    """
    t, hooks = recipe.train, hooks or TrainHooks()
    accelerator = accelerator or make_accelerator(recipe)
    lengths = [f["length"] for f in features]
    fast = getattr(model, "peft_ft_fast_kernels", False)
    if fast:
        keep_freed_memory()  # no page faults to get back each step's activations (peft_ft/kernels/allocator.py)
    step_rows = t.batch_size * t.gradient_accumulation_steps
    padding = {"multiple": t.pad_to_multiple_of, "max_width": recipe.model.max_length}
    per_epoch = steps_per_epoch(len(features), t)
    total = min(per_epoch * t.epochs, t.max_steps or per_epoch * t.epochs)
    # The method's own hooks (EVA's data-driven init, AdaLoRA's rank budget, LoRA+'s rates); before
    # the optimizer is built, as an init may replace parameters.
    method = METHODS[recipe.adapter.method]
    method_after_step = method.on_train_start(model, recipe, TrainingStart(features, total, t.batch_size, pad_id, device)) \
        if method.on_train_start else None
    optimizer = make_optimizer(model, lr, t.weight_decay, method.lr_scale(recipe) if method.lr_scale else None)
    scheduler = make_scheduler(optimizer, t.scheduler, int(t.warmup * total), total)
    result, best_state, best_name, start_epoch, skip, losses, patience_used = TrainResult(best_metric=metric), None, None, 1, 0, [], 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, method.restore_training_state)
        try:
            result = TrainResult(**state["result"])
        except TypeError as e:
            raise PeftFtError(f"{resume_from}: damaged checkpoint (its 'result' does not fit: {e}); {checkpoint.DAMAGED}") from None
        start_epoch, skip, losses, best_name = state["epoch"], state["batches_done"], state["epoch_losses"], state["best"]
        patience_used = state.get("patience_used", 0)
        if not (1 <= start_epoch <= t.epochs + 1 and 0 <= skip <= per_epoch):  # an edited state.json
            raise PeftFtError(f"{resume_from}: damaged checkpoint (epoch {start_epoch}, batches done {skip}: out of this "
                              f"recipe's {t.epochs} epochs of {per_epoch} steps); {checkpoint.DAMAGED}")
        best_state = checkpoint.load_weights(resume_from.parent / best_name) if best_name else None
        where = f"epoch {start_epoch}" if start_epoch <= t.epochs else f"all {t.epochs} epochs trained"  # saved at the last epoch's end
        log.info("resumed from %s: %s, step %d", resume_from, where, result.steps)
    fit_fsdp_wrapping(accelerator, model)
    fit_deepspeed_batch(accelerator, t.batch_size)
    fit_deepspeed_dtypes(accelerator, model)
    # Together: DeepSpeed builds its engine from both. An 8-bit base is on its GPU already and cannot move; other
    # models keep accelerate's default placement (DeepSpeed refuses any device_placement argument).
    placement = {"device_placement": [False, True]} if recipe.model.load_in_8bit else {}
    wrapped, optimizer = accelerator.prepare(model, optimizer, **placement)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    saving = run_dir is not None and distributed.is_main() and not is_sharded(accelerator)
    if run_dir is not None and is_sharded(accelerator):
        log.warning("resumable checkpoints are written by one process or DDP runs only; this %s run writes none",
                    accelerator.distributed_type.value)

    def save(epoch: int, batches_done: int) -> Path:
        state = {"epoch": epoch, "batches_done": batches_done, "epoch_losses": losses, "best": best_name,
                 "patience_used": patience_used, "result": dataclasses.asdict(result), "run": run_state or {}}
        path = checkpoint.save(run_dir, result.steps, model, optimizer.optimizer, scheduler, state,
                               method.training_state(model) if method.training_state else None)
        checkpoint.prune(run_dir, t.keep_checkpoints, best_name)
        return path

    def evaluate(epoch: int) -> bool:
        """One history entry; returns whether early stopping ends the run."""
        nonlocal best_state, best_name, losses, patience_used
        entry = {"epoch": epoch, "steps": result.steps, "train_loss": sum(losses) / max(1, len(losses))}
        scores = validate(epoch) if validate else None
        value = None if scores is None else scores[metric]
        if value is not None:
            entry[f"validation_{metric}"] = value
        result.history.append(entry)
        track(accelerator, {"train/epoch_loss": entry["train_loss"], "epoch": epoch,
                            **{f"validation/{k}": v for k, v in (scores or {}).items()}}, result.steps)
        log.info("%s: train loss %.4f%s", f"epoch {epoch}" if not t.eval_every else f"step {result.steps} (epoch {epoch})",
                 entry["train_loss"], f", validation {metric} {value:.4f}" if value is not None else "")
        if value is None or result.best_value is None or value > result.best_value:
            result.best_epoch, result.best_step, result.best_value, best_state = epoch, result.steps, value, snapshot(model)
            best_name, patience_used = checkpoint.name_of(result.steps), 0  # the checkpoint written next
        else:
            patience_used += 1
        losses = []
        if hooks.on_evaluation:
            hooks.on_evaluation(entry)
        if t.early_stopping_patience and patience_used >= t.early_stopping_patience:
            result.stopped_early = True
            log.info("early stopping: %d evaluations without a better validation %s (best %.4f at step %d)",
                     patience_used, metric, result.best_value, result.best_step)
        return result.stopped_early

    log.info("effective batch %d rows per optimizer step (train.batch_size %d x gradient_accumulation_steps %d), "
             "split across %d process%s; %d steps; precision %s", step_rows, t.batch_size, t.gradient_accumulation_steps,
             accelerator.num_processes, "es" if accelerator.num_processes > 1 else "", total, precision_label(model, accelerator))
    for note in [*notes(accelerator), *_idle_settings(t, total, per_epoch, validate is not None, len(features))]:
        log.warning(note)
    with _progress() as progress, _StopRequests(saving=saving and distributed.world().size == 1) as stop:
        bar = progress.add_task("train", total=total, completed=result.steps, loss=float("nan"), speed=0.0)
        for epoch in range(start_epoch, t.epochs + 1):
            if result.steps >= total or result.stopped_early:
                break
            wrapped.train()
            epoch_start = time.perf_counter()  # result.seconds counts training only, not evaluation
            batches = train_batches(lengths, step_rows, group_by_length=t.group_by_length, seed=t.seed, epoch=epoch)
            for done, indices in enumerate(batches[skip:], skip + 1):  # on resume: skip the batches already trained
                loss_value = forward_backward(wrapped, [features[i] for i in indices], pad_id, device, accelerator, t.batch_size,
                                              padding)
                if t.grad_clip:
                    accelerator.clip_grad_norm_(trainable, t.grad_clip)
                lr_used = scheduler.get_last_lr()[0]  # this step's rate: the schedule moves on after it
                if not math.isfinite(loss_value):  # checked before the step, so the weights stay finite
                    raise _numerical_error(loss_value, result.steps + 1, epoch, lr_used, t, run_dir)
                optimizer.step()
                if method_after_step is not None:
                    method_after_step(result.steps)  # gradients still in place (AdaLoRA reads them)
                if hooks.after_step:
                    hooks.after_step(model, result.steps + 1)
                if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_value)
                result.steps += 1
                result.samples += len(indices)
                result.tokens += sum(lengths[i] for i in indices)
                elapsed = result.seconds + time.perf_counter() - epoch_start
                track(accelerator, {"train/loss": loss_value, "train/lr": lr_used,
                                    "train/tokens_per_second": result.tokens / elapsed}, result.steps)
                progress.update(bar, advance=1, description=f"epoch {epoch}", loss=loss_value, speed=result.tokens / elapsed)
                epoch_done, last = done == len(batches), result.steps >= total
                # where a checkpoint written now resumes: the next batch, or the next epoch's first
                position = (epoch + 1, 0) if epoch_done else (epoch, done)
                if evaluation_due(result.steps, epoch_done, last, t.eval_every):
                    result.seconds += time.perf_counter() - epoch_start  # evaluating and saving are not training time
                    stopping = evaluate(epoch)
                    if epoch_done or last or stopping:
                        result.epochs_run = epoch
                    if saving:
                        stop.check(save(*position))
                    wrapped.train()
                    epoch_start = time.perf_counter()
                    if stopping:
                        break
                else:
                    periodic = t.checkpoint_every and result.steps % t.checkpoint_every == 0
                    if saving and (stop.requested or periodic or epoch_done):
                        result.seconds += time.perf_counter() - epoch_start
                        if epoch_done:
                            result.epochs_run = epoch
                        path = save(*position)
                        epoch_start = time.perf_counter()
                        stop.check(path)
                if last:
                    break
            else:
                result.epochs_run = epoch
            skip = 0
            result.seconds += time.perf_counter() - epoch_start
    if best_state is not None and result.best_step != result.steps:
        restore(model, best_state)
        log.info("restored the best evaluation (epoch %d, step %d) by validation %s", result.best_epoch, result.best_step, metric)
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if accelerator.device.type == "cuda":
        import torch

        result.peak_cuda_mib = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    if fast:
        release_freed_memory()
    return result


def track(accelerator, values: dict, step: int) -> None:
    """Numbers to the recipe's trackers (train.report_to), on the main process; free when there are none."""
    if accelerator.trackers:
        accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)


def _numerical_error(value: float, step: int, epoch: int, lr: float, t, run_dir: Path | None) -> PeftFtError:
    saved = checkpoint.listed(run_dir) if run_dir is not None else []
    kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint had been written yet"
    return PeftFtError(
        f"training stopped: the loss is {value} at step {step} (epoch {epoch}, learning rate {lr:.3g}); this step was not "
        f"applied and {kept}. Hint: lower train.lr (or raise train.warmup, now {t.warmup}), keep train.grad_clip on "
        f"(now {t.grad_clip}), and look for empty or extreme rows in the training data; then start a new run."
    )


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` for the duration (main thread only: signal handlers live there); the training
    loop's own handler takes over inside it and gives this one back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Checkpointed(KeyboardInterrupt):
    """Ctrl-C or SIGTERM honoured after the checkpoint it asked for (already logged, with the `--resume` line)."""


class _StopRequests:
    """While training, Ctrl-C (or SIGTERM, what a batch scheduler or `kill` sends before SIGKILL) asks the loop
    to stop after the current step, which then writes a checkpoint; a second one stops at once. With `saving`
    off (several processes: they could not agree on the step to save at without one more exchange per step; or no
    run folder) either stops at once, SIGTERM included, so the run still ends through its handlers (logged, its
    tracker runs marked KILLED) rather than vanishing. Signal handlers exist only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, saving: bool):
        self.saving, self.requested, self.previous = saving, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested or not self.saving:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def check(self, saved: Path) -> None:
        """After a checkpoint: stop here if Ctrl-C or SIGTERM came."""
        if self.requested:
            log.warning("interrupted (%s): checkpoint %s written; continue with `peft-ft run --resume %s`",
                        self.requested, saved, saved.parent.parent)
            raise Checkpointed

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
        disable=not distributed.is_main(),
    )
