"""The training loop: a short plain-PyTorch loop rather than `transformers.Trainer`.

Why not Trainer: on a 2-core CPU its per-step machinery (callbacks, logging, the DataLoader and
collator round trips) costs a visible share of each step, and what makes CPU training fast here
is controlling the batches themselves (length-grouped, padded only to their own longest row,
tokenized once). The loop is ~100 lines and does only: forward, backward, clip, step, schedule;
evaluation once per epoch; the best epoch's trainable weights kept in memory.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

from peft_ft.batching import eval_batches, pad_batch, train_batches
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
    torch.set_num_threads(recipe.train.threads or os.cpu_count() or 1)
    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        from peft_ft.errors import PeftFtError

        raise PeftFtError(f"{recipe.source}: train.device: \"cuda\" asked for, but torch sees no CUDA GPU; use \"auto\" or \"cpu\"")
    use_cuda = recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW over trainable parameters only; no decay on biases and LayerNorm weights."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def train(model, features: list[dict], recipe: Recipe, *, lr: float, pad_id: int, device,
          validate: Callable[[int], float] | None, metric: str) -> TrainResult:
    """Train; after each epoch `validate(epoch)` returns the metric (higher is better) and the
    best epoch's trainable weights are restored at the end."""
    import torch

    t = recipe.train
    lengths = [f["length"] for f in features]
    per_epoch = math.ceil(len(features) / t.batch_size)
    total = min(per_epoch * t.epochs, t.max_steps or per_epoch * t.epochs)
    optimizer = make_optimizer(model, lr, t.weight_decay)
    scheduler = linear_schedule(optimizer, int(t.warmup * total), total)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result, best_state = TrainResult(best_metric=metric), None
    with _progress() as progress:
        bar = progress.add_task("train", total=total, loss=float("nan"), speed=0.0)
        for epoch in range(1, t.epochs + 1):
            model.train()
            losses, epoch_start = [], time.perf_counter()  # result.seconds counts training only, not evaluation
            for indices in train_batches(lengths, t.batch_size, group_by_length=t.group_by_length, seed=t.seed, epoch=epoch):
                batch = {k: v.to(device) for k, v in pad_batch([features[i] for i in indices], pad_id).items()}
                loss = model(**batch).loss
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                result.steps += 1
                result.samples += len(indices)
                result.tokens += sum(lengths[i] for i in indices)
                elapsed = result.seconds + time.perf_counter() - epoch_start
                progress.update(bar, advance=1, description=f"epoch {epoch}", loss=losses[-1], speed=result.tokens / elapsed)
                if result.steps >= total:
                    break
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
            if result.steps >= total:
                break
    if best_state is not None and result.best_epoch != result.epochs_run:
        restore(model, best_state)
        log.info("restored the best epoch (%d) by validation %s", result.best_epoch, metric)
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


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
    )
