"""Keep a long prediction's resident memory near what it really holds (glibc's allocator).

glibc serves allocations under its mmap threshold from the heap, and raises that threshold
(up to 32 MiB) each time a larger mmap-served block is freed. A streamed prediction frees
and reallocates block-sized buffers (tens to hundreds of MB) and patch activations (a few MB)
thousands of times. Every prediction fixes the threshold at glibc's largest,
``MMAP_THRESHOLD`` (32 MiB): a network's activations are reused from the heap instead of being
fresh mappings (with their page faults) on every forward pass, block-sized buffers are still
mapped and unmapped, and the heap is trimmed after each block (``malloc_trim``), so peak RSS
stays flat as the image grows (``benchmarks/peer_sliding_window.py`` and
``benchmarks/predict_memory.py`` measure it).
Elsewhere (macOS, musl, Windows) these are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["MMAP_THRESHOLD", "bound_heap_growth", "release_free_memory"]

#: allocations at least this large are served by mmap and returned to the system when freed:
#: glibc's largest threshold (``4 * 1024 * 1024 * sizeof(long)``)
MMAP_THRESHOLD = 32 << 20
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
        threshold: bytes (default ``MMAP_THRESHOLD``).

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
