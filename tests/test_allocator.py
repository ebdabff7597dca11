"""The glibc settings for training and serving apply where glibc exists and are no-ops elsewhere."""

from __future__ import annotations

import sys

from peft_ft.kernels import allocator


def test_settings_apply_exactly_where_glibc_exists():
    has_glibc = allocator._glibc() is not None
    if sys.platform.startswith("linux") and "musl" not in sys.version.lower():
        assert has_glibc
    assert allocator.keep_freed_memory() is has_glibc
    allocator.release_freed_memory()  # malloc_trim(0) here, or nothing: must not raise
    assert allocator.freed_memory_releaser()() in (None, 0, 1)
