"""Giving freed memory back to the operating system between large steps.

glibc's malloc keeps freed blocks under its mmap threshold (which grows to 32 MiB as large arrays come and go) in
its heaps, so a process that alternates big NumPy/PyTorch temporaries with ONNX Runtime runs (validate at the
profile's maximum shape) keeps the sum of every step's leftovers resident. ``malloc_trim`` returns the free pages.
Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); nothing else changes."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_between_stages() -> None:
    """Collect what a finished stage left unreachable (models, optimizers, graphs) and return the freed pages, so
    the next stage of a build starts from what the process needs, not from the previous stage's peak."""
    gc.collect()
    release_freed_memory()
