"""What several processes share, besides the gradients: who they are, how a batch and an
evaluation split are divided between them, and what only the main process does.

Processes are started by `accelerate launch` or `torchrun`; accelerate (peft_ft.engine.accelerator) joins them
and its DDP averages the gradients. Every process builds the same model and reads the same data,
trains on its share of every batch, and the main process (rank 0) alone writes the run folder.
The few collectives here (broadcast a value, gather predictions) are plain `torch.distributed` on
the process group accelerate made.

Without WORLD_SIZE (or with WORLD_SIZE=1) every function here is a cheap no-op and torch is never
imported by it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

from peft_ft.errors import PeftFtError


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


def deepspeed_launch() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_in_one_process() -> bool:
    """A DeepSpeed launch of one process: accelerate runs DeepSpeed in it, on CPU too (see `make_accelerator`)."""
    return deepspeed_launch() and world().size == 1


def is_main() -> bool:
    return world().rank == 0


def check_environment() -> None:
    """A WORLD_SIZE without the rendezvous address: started by hand rather than by a launcher."""
    w = world()
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if w.size > 1 and missing:
        raise PeftFtError(f"WORLD_SIZE={w.size} is set but {', '.join(missing)} is not: start several processes with "
                          f"torchrun or accelerate launch, or unset WORLD_SIZE for one process")


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


# What gloo raises when the other end of a collective is gone: a plain RuntimeError whose message is all that tells
# (NCCL raises torch.distributed.DistError's subclasses).
_GLOO_PEER_GONE = ("closed by peer", "reset by peer", "remote worker crashing")


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the run stopped."""
    if world().size == 1 or not isinstance(error, RuntimeError):
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or any(s in str(error).lower() for s in _GLOO_PEER_GONE)


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


def finish(together: bool = False) -> None:
    """End the process group accelerate made, as its `end_training` would (the loop skips that call: evaluation
    after training still needs the group). Left to the interpreter's exit, the group's threads are torn down in
    no set order; a 2-process CPU DeepSpeed run aborted there once ("terminate called without an active exception").

    `together` (the run ended well on this process): wait for the others first. A worker that tore its group down
    while the main process was still saving aborted the same way (3 times in 34 runs of a 2-process CPU test, while
    other work loaded the machine), and the launcher then stopped the main process mid-save. Not after an error:
    the others may be gone or stuck."""
    if world().size == 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            with contextlib.suppress(RuntimeError):  # a process that failed after its run says so itself
                dist.barrier()
        dist.destroy_process_group()
