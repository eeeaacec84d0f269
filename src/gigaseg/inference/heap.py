"""Keep a long prediction's resident memory near what it really holds (glibc's allocator).

glibc serves allocations under its mmap threshold from the heap, and raises that threshold
(up to 32 MB) each time a larger mmap-served block is freed. A streamed prediction frees
and reallocates block-sized buffers (tens of MB) and patch tensors (a few MB) thousands of
times, so after the first blocks most of them come from a heap that fragments and keeps
freed pages resident, and the process's peak RSS creeps up with the image size under a fixed
budget. Fixing the threshold at 1 MiB (large buffers always mmap-served and unmapped when
freed) and trimming the heap after each block keeps it near what the process holds;
``benchmarks/predict_memory.py`` measures a prediction's peak RSS as the image grows.
The price is a fresh mapping, and its page faults, for every activation above 1 MiB of every
forward pass; the fast path (``gigaseg.inference.fast``) fixes the threshold at glibc's largest,
``FAST_MMAP_THRESHOLD`` (32 MiB) instead: a network's activations are then reused from the heap,
block-sized buffers are still mapped and unmapped, and the heap is still trimmed after each
block (``benchmarks/peer_sliding_window.py`` measures its peak RSS as the image grows).
Elsewhere (macOS, musl, Windows) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["FAST_MMAP_THRESHOLD", "MMAP_THRESHOLD", "bound_heap_growth", "release_free_memory"]

#: allocations at least this large are served by mmap and returned to the system when freed
MMAP_THRESHOLD = 1 << 20
#: the fast path's threshold: glibc's largest (``4 * 1024 * 1024 * sizeof(long)``)
FAST_MMAP_THRESHOLD = 32 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both exist only in glibc
        return libc
    except (OSError, AttributeError):
        return None


def bound_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (each prediction sets its own).

    Args:
        threshold: bytes; ``MMAP_THRESHOLD``, or ``FAST_MMAP_THRESHOLD`` for the fast path.

    Returns:
        True if the threshold was set (glibc), False elsewhere.
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
