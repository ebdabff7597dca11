"""The training loop: a short plain-PyTorch loop rather than `transformers.Trainer`.

Why not Trainer: on a 2-core CPU its per-step machinery (callbacks, logging, the DataLoader and
collator round trips) costs a visible share of each step, and what makes CPU training fast here
is controlling the batches themselves (length-grouped, padded only to their own longest row,
tokenized once). The loop is ~100 lines and does only: forward, backward, clip, step, schedule;
evaluation once per epoch; the best epoch's trainable weights kept in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peft_ft import distributed
from peft_ft.batching import eval_batches, pad_batch, train_batches
from peft_ft.errors import PeftFtError
from peft_ft.schema import Recipe

log = logging.getLogger("peft_ft")


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0  # real (non-padding) tokens seen
    best_epoch: int = 0
    best_metric: str = ""
    best_value: float | None = None
    peak_rss_mib: float = 0.0
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
            "samples_per_second": round(self.samples / self.seconds, 2) if self.seconds else 0.0,
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "history": self.history,
        }


def setup_torch(recipe: Recipe):
    """Seed everything and pick threads and device; returns the device."""
    import random

    import numpy as np
    import torch

    random.seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    world = distributed.world()  # processes on one machine share its cores
    torch.set_num_threads(recipe.train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    check_device(recipe)
    if not use_cuda(recipe):
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


def use_cuda(recipe: Recipe) -> bool:
    import torch

    return recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())


def check_device(recipe: Recipe) -> None:
    """A CUDA-only choice on a machine without CUDA; the runner calls this before making the run folder."""
    import torch

    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        raise PeftFtError(f"{recipe.source}: train.device: \"cuda\" asked for, but torch sees no CUDA GPU; use \"auto\" or \"cpu\"")


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


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def predict(model, task, features: list[dict], pad_id: int, batch_size: int, device) -> list:
    """Per-row outputs in the features' order; batches sorted by length, no gradients."""
    import torch

    model.eval()
    outputs: list = [None] * len(features)
    with torch.inference_mode():
        for indices in eval_batches([f["length"] for f in features], batch_size):
            batch = pad_batch([features[i] for i in indices], pad_id)
            batch.pop("labels", None)
            result = model(**{k: v.to(device) for k, v in batch.items()})
            for i, row in zip(indices, task.unpack(result, batch)):
                outputs[i] = row
    return outputs


def loss_units(rows: list[dict]) -> int:
    """What a model's loss averages over: the label tokens (not -100) when labels are lists
    (token classification, seq2seq), else the rows."""
    if rows and isinstance(rows[0].get("labels"), list):
        return sum(1 for row in rows for label in row["labels"] if label != -100)
    return len(rows)


def forward_backward(model, rows: list[dict], pad_id: int, device, trainable: list) -> float:
    """Loss of one batch, its gradients left in the trainable parameters.

    With several processes each one runs its share of the rows, its loss weighted by its share of
    what the loss averages over, and the weighted gradients and losses are summed across processes:
    the same loss and gradient as the whole batch in one process (up to float rounding), even when
    the shares differ in size or one is empty."""
    world = distributed.world()
    if world.size == 1:
        loss = model(**{k: v.to(device) for k, v in pad_batch(rows, pad_id).items()}).loss
        loss.backward()
        return loss.item()
    import torch

    mine = distributed.shard(rows, world.rank, world.size)
    weight = loss_units(mine) / max(1, loss_units(rows))
    loss = torch.zeros((), device=trainable[0].device)
    if weight > 0:  # an empty share (fewer rows than processes) only joins the sum
        loss = model(**{k: v.to(device) for k, v in pad_batch(mine, pad_id).items()}).loss * weight
        loss.backward()
    return distributed.sum_gradients(trainable, loss)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def train(model, features: list[dict], recipe: Recipe, *, lr: float, pad_id: int, device,
          validate: Callable[[int], float] | None, metric: str, run_dir: Path | None = None,
          resume_from: Path | None = None, run_state: dict | None = None) -> TrainResult:
    """Train; after each epoch `validate(epoch)` returns the metric (higher is better) and the
    best epoch's trainable weights are restored at the end.

    With `run_dir`, a resumable checkpoint is written at each epoch end (and every
    `train.checkpoint_every` steps), Ctrl-C saves one before stopping, and `resume_from` (a
    checkpoint folder) continues from one. `run_state` is stored in each checkpoint for the runner.

    With several processes (peft_ft.distributed) every process runs this loop over the same batches,
    each on its share of every batch; only the main process writes checkpoints. Ctrl-C then just
    stops: the processes could not agree on the step to save at without one more exchange per step.
    """
    import torch

    from peft_ft import checkpoint
    from peft_ft.adapters import METHODS, TrainingStart
    from peft_ft.allocator import keep_freed_memory, release_freed_memory

    t = recipe.train
    lengths = [f["length"] for f in features]
    keep_freed_memory()  # no page faults to get back each step's activations (peft_ft/allocator.py)
    per_epoch = math.ceil(len(features) / t.batch_size)
    total = min(per_epoch * t.epochs, t.max_steps or per_epoch * t.epochs)
    # The method's own hooks (EVA's data-driven init, AdaLoRA's rank budget, LoRA+'s rates); before
    # the optimizer is built, as an init may replace parameters.
    method = METHODS[recipe.adapter.method]
    after_step = method.on_train_start(model, recipe, TrainingStart(features, total, t.batch_size, pad_id, device)) \
        if method.on_train_start else None
    optimizer = make_optimizer(model, lr, t.weight_decay, method.lr_scale(recipe) if method.lr_scale else None)
    scheduler = linear_schedule(optimizer, int(t.warmup * total), total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result, best_state, best_name, start_epoch, skip, losses = TrainResult(best_metric=metric), None, None, 1, 0, []
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler)
        result = TrainResult(**state["result"])
        start_epoch, skip, losses, best_name = state["epoch"], state["batches_done"], state["epoch_losses"], state["best"]
        best_state = checkpoint.load_weights(resume_from.parent / best_name) if best_name else None
        log.info("resumed from %s: epoch %d, step %d", resume_from, start_epoch, result.steps)

    def save(epoch: int, batches_done: int) -> Path:
        state = {"epoch": epoch, "batches_done": batches_done, "epoch_losses": losses, "best": best_name,
                 "result": dataclasses.asdict(result), "run": run_state or {}}
        path = checkpoint.save(run_dir, result.steps, model, optimizer, scheduler, state)
        checkpoint.prune(run_dir, t.keep_checkpoints, best_name)
        return path

    saving = run_dir is not None and distributed.is_main()
    with _progress() as progress, _StopRequests(enabled=saving and distributed.world().size == 1) as stop:
        bar = progress.add_task("train", total=total, completed=result.steps, loss=float("nan"), speed=0.0)
        for epoch in range(start_epoch, t.epochs + 1):
            if result.steps >= total:
                break
            model.train()
            epoch_start = time.perf_counter()  # result.seconds counts training only, not evaluation
            batches = train_batches(lengths, t.batch_size, group_by_length=t.group_by_length, seed=t.seed, epoch=epoch)
            for done, indices in enumerate(batches[skip:], skip + 1):  # on resume: skip the batches already trained
                loss_value = forward_backward(model, [features[i] for i in indices], pad_id, device, trainable)
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
                if not math.isfinite(loss_value):  # checked before the step, so the weights stay finite
                    raise _numerical_error(loss_value, result.steps + 1, epoch, scheduler.get_last_lr()[0], t, run_dir)
                optimizer.step()
                if after_step is not None:
                    after_step(result.steps)  # gradients still in place (AdaLoRA reads them)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_value)
                result.steps += 1
                result.samples += len(indices)
                result.tokens += sum(lengths[i] for i in indices)
                elapsed = result.seconds + time.perf_counter() - epoch_start
                progress.update(bar, advance=1, description=f"epoch {epoch}", loss=loss_value, speed=result.tokens / elapsed)
                periodic = t.checkpoint_every and result.steps % t.checkpoint_every == 0 and done < len(batches)
                if saving and (stop.requested or (periodic and result.steps < total)):
                    result.seconds += time.perf_counter() - epoch_start  # saving is not training time
                    path = save(epoch, done)
                    epoch_start = time.perf_counter()
                    stop.check(path)
                if result.steps >= total:
                    break
            skip = 0
            result.epochs_run = epoch
            result.seconds += time.perf_counter() - epoch_start
            entry = {"epoch": epoch, "steps": result.steps, "train_loss": sum(losses) / len(losses)}
            value = validate(epoch) if validate else None
            if value is not None:
                entry[f"validation_{metric}"] = value
            result.history.append(entry)
            log.info("epoch %d: train loss %.4f%s", epoch, entry["train_loss"], f", validation {metric} {value:.4f}" if value is not None else "")
            if value is None or result.best_value is None or value > result.best_value:
                result.best_epoch, result.best_value, best_state = epoch, value, snapshot(model)
                best_name = checkpoint.name_of(result.steps)  # the epoch-end checkpoint written next
            losses = []
            if saving:
                stop.check(save(epoch + 1, 0))
    if best_state is not None and result.best_epoch != result.epochs_run:
        restore(model, best_state)
        log.info("restored the best epoch (%d) by validation %s", result.best_epoch, metric)
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    release_freed_memory()
    return result


def _numerical_error(value: float, step: int, epoch: int, lr: float, t, run_dir: Path | None) -> PeftFtError:
    from peft_ft import checkpoint

    saved = checkpoint.listed(run_dir) if run_dir is not None else []
    kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint had been written yet"
    return PeftFtError(
        f"training stopped: the loss is {value} at step {step} (epoch {epoch}, learning rate {lr:.3g}); this step was not "
        f"applied and {kept}. Hint: lower train.lr (or raise train.warmup, now {t.warmup}), keep train.grad_clip on "
        f"(now {t.grad_clip}), and look for empty or extreme rows in the training data; then start a new run."
    )


class _StopRequests:
    """While training, Ctrl-C asks the loop to stop after the current step, which then writes a
    checkpoint; a second Ctrl-C stops at once. Signal handlers exist only in the main thread."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self.previous = enabled, False, None

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self, saved: Path) -> None:
        """After a checkpoint: stop here if Ctrl-C was pressed."""
        if self.requested:
            log.warning("interrupted: checkpoint %s written; continue with `peft-ft run --resume %s`", saved, saved.parent.parent)
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from peft_ft.log import console

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
