"""glibc allocator settings that keep a streamed prediction's resident memory bounded."""

import ctypes

import numpy as np
import pytest

from gigaseg.inference import heap


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.mark.skipif(heap._glibc() is None, reason="needs glibc")
def test_freed_buffers_over_the_threshold_leave_the_process():
    assert heap.bound_heap_growth() is True
    large = np.ones(20 * 2**20, np.uint8)
    del large  # freeing a large block would raise glibc's dynamic threshold
    before = rss()
    buffers = [np.ones(2 * heap.MMAP_THRESHOLD, np.uint8) for _ in range(64)]  # 128 MB, each mmap-served
    held = rss()
    del buffers
    heap.release_free_memory()
    assert held - before > 100 * 2**20
    assert rss() - before < 16 * 2**20  # given back, not kept in the heap


def test_release_is_harmless_without_glibc(monkeypatch):
    heap._glibc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    try:
        assert heap._glibc() is None
        heap.release_free_memory()  # no error
    finally:
        monkeypatch.undo()
        heap._glibc.cache_clear()
