"""Data-parallel training across processes started by `torchrun` or `accelerate launch`.

One process per GPU (or several CPU processes): every process builds the same model and reads the
same data, trains on its share of every batch, and the gradients are summed before each step, so
all processes hold the same weights. The main process (rank 0) alone writes the run folder.

Plain `torch.distributed` rather than `accelerate.PartialState`: what we need is a handful of
collectives (sum gradients, broadcast a value, gather predictions), and accelerate's state object
would also take over device placement and mixed precision. Reading the environment ourselves keeps
the run identical with either launcher and adds no runtime dependency.

Without WORLD_SIZE (or with WORLD_SIZE=1) every function here is a cheap no-op and torch is never
imported by it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

from peft_ft.errors import PeftFtError

# How long a collective waits for the other processes. A failing process normally ends the others
# at once (torchrun stops the whole group, gloo sees the closed connection); this only bounds the
# rare silent hang. Long enough for the main process alone to score a large test split or write a
# full-model checkpoint while the others wait.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    size: int = 1  # processes in all
    rank: int = 0  # this process, 0 = main
    local_rank: int = 0  # this process on its machine: its GPU index
    local_size: int = 1  # processes on this machine: they share its CPU cores


def world() -> World:
    """This process's place, from the variables torchrun (which `accelerate launch` uses too) sets."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        found = ", ".join(f"{n}={os.environ.get(n)!r}" for n in names if n in os.environ)
        raise PeftFtError(f"distributed environment: expected whole numbers, got {found}; start with torchrun or accelerate launch") from None
    return World(size, rank, local_rank, local_size)


def is_main() -> bool:
    return world().rank == 0


def init(use_cuda: bool) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA with this process's GPU); once per process."""
    w = world()
    if w.size == 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise PeftFtError(f"WORLD_SIZE={w.size} is set but {', '.join(missing)} is not: start several processes with "
                          f"torchrun or accelerate launch, or unset WORLD_SIZE for one process")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise PeftFtError(f"WORLD_SIZE={w.size}: this torch build has no {backend} backend for several processes")
    if use_cuda:
        torch.cuda.set_device(w.local_rank)  # before the model loads: 8-bit bases go to the current device
    dist.init_process_group(backend, timeout=TIMEOUT)


def shard(items: list, rank: int, size: int) -> list:
    """Process `rank`'s share: every `size`-th item. Strided, not contiguous, so that a length-sorted
    batch gives every process rows of similar lengths; shares differ by at most one item."""
    return items[rank::size]


def broadcast_object(value):
    """The main process's `value`, on every process (picklable objects)."""
    if world().size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable):
    """`fn()` on the main process only; every process returns its result, or raises its error, so
    that no process waits forever for a main process that failed (run folder not writable...)."""
    if world().size == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = e
    result, message = broadcast_object((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise PeftFtError(f"the main process failed: {message}")
    return result


def gather_rows(fn: Callable[[list], list], rows: list) -> list | None:
    """`fn(rows)` (one output per row) computed in shares: each process runs `fn` on its share, and
    the main process gets every output back in the rows' order; the others get None. Every row is
    predicted exactly once, by one process."""
    w = world()
    if w.size == 1:
        return fn(rows)
    import torch.distributed as dist

    part = shard(rows, w.rank, w.size)
    mine = fn(part) if part else []
    parts = [None] * w.size if w.rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if w.rank != 0:
        return None
    outputs: list = [None] * len(rows)
    for rank, outs in enumerate(parts):
        outputs[rank::w.size] = outs
    return outputs


def broadcast_parameters(model) -> None:
    """Trainable weights from the main process to all: the same seed gives the same initial adapter
    and head everywhere already, this makes it certain (frozen weights come from the same files)."""
    if world().size == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def sum_gradients(params: list, loss) -> float:
    """Sum the gradients of `params` and the `loss` (a scalar tensor) over all processes, in place;
    returns the summed loss. Each process's part is already weighted by its share of the batch, so
    the sums are the whole batch's gradient and loss. A parameter no process gave a gradient keeps
    None, as it would in one process (the optimizer then leaves it alone)."""
    import torch
    import torch.distributed as dist

    # One flat float32 buffer, one all_reduce: adapters have many small tensors, and float32 sums
    # whatever the parameters' dtype.
    device = params[0].device
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flat = torch.cat([*grads, touched, loss.detach().reshape(1).float().to(device)])
    dist.all_reduce(flat)
    offset, total = 0, flat.numel() - len(params) - 1
    for p, used in zip(params, flat[total:-1].tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype, copy=True) if used else None
        offset += n
    return flat[-1].item()
