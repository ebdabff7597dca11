"""What glibc's malloc does with freed memory, set for the two ways peft-ft uses it.

Training (`keep_freed_memory`): a step allocates and frees the same large activations again and
again. glibc's defaults give the freed ones back to the OS (mmap'd blocks, heap trimming), so the
next step takes page faults to get them again: measured on MiniLM + LoRA (CoNLL batch of 32 x 22
tokens, 1 thread, median of 30 steps) 527 ms a step with the defaults, 497 ms with freed memory
kept in the heap, and the same peak RSS (1307 MiB for both, bench/memory.py on CoNLL).

Serving (`freed_memory_releaser`): a long-lived process answering batches of many sizes, where
kept memory only grows: hand it back after each batch.

Linux with glibc only; elsewhere (macOS, Windows, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_MMAP_BELOW = 64 * 2**20  # MiniLM's activations are at most tens of MiB; bigger blocks stay mmap'd
_KEEP_TRIM_BELOW = 2**30


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has no malloc_trim


def keep_freed_memory() -> bool:
    """Keep memory freed during training in the heap for the next step (see the module docstring).
    Returns whether it was set. The setting stays for the process; `release_freed_memory` after
    training gives the kept memory back."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_BELOW) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_BELOW))


def freed_memory_releaser():
    """A callable that hands the memory freed so far back to the OS: glibc's `malloc_trim(0)`.

    Why for `peft-ft serve`: a forward pass allocates activations of a size set by the batch's texts
    and padded width. glibc raises its mmap threshold (up to 32 MiB) after the first large free, so
    later activations come from the heap of the worker's arena, where freed space is kept,
    fragmented, instead of being unmapped. Measured (`bench/loadtest.py`, the conll and grading LoRA
    adapters on MiniLM, 8 clients, 60 s): RSS grew 589 -> 935 MiB and stayed there when idle; with a
    trim after each batch it stayed 577-749 MiB and was back at 578 MiB when idle (the trim took
    1-60 ms after batches of 0.1-9 s). MALLOC_ARENA_MAX=2 did not help (584 -> 949 MiB): the growth
    is freed memory the allocator keeps, not per-thread arenas or live objects."""
    libc = _glibc()
    if libc is None:
        return lambda: None
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def release_freed_memory() -> None:
    freed_memory_releaser()()
