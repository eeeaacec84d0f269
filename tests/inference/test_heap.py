"""glibc allocator settings that keep a streamed prediction's resident memory bounded."""

import ctypes
import subprocess
import sys

import pytest

from gigaseg.inference import heap

# In a fresh process (a long test session's heap holds free resident pages that new buffers
# reuse, which hides what the allocator does): fix the threshold as a prediction does, allocate
# 64 buffers of 2 MB (heap-served below the 32 MiB threshold, as a network's activations are),
# each followed by a small one that stays (as a prediction's long-lived tensors do), free the
# large ones and, in "trimmed" mode, trim the heap as a prediction does after each block.
PROBE = """
import sys
import numpy as np
from gigaseg.inference import heap

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

assert heap.bound_heap_growth()
before = rss()
buffers, keepers = [], []
for _ in range(64):
    buffers.append(np.ones(2 * 2**20, np.uint8))
    keepers.append(np.ones(64 * 2**10, np.uint8))
held = rss()
del buffers
if sys.argv[1] == "trimmed":
    heap.release_free_memory()
after = rss()
print(held - before, after - before)
"""


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    held, kept = map(int, out.stdout.split())
    return held, kept


@pytest.mark.skipif(heap._glibc() is None, reason="needs glibc")
def test_freed_buffers_leave_the_process_once_the_heap_is_trimmed():
    assert heap.MMAP_THRESHOLD == 32 * 2**20  # activations of a few MB are reused from the heap
    held, kept = probe("untrimmed")
    assert held > 100 * 2**20 and kept > 100 * 2**20  # heap-served: the holes between the keepers stay resident
    held, kept = probe("trimmed")
    assert held > 100 * 2**20 and kept < 12 * 2**20  # malloc_trim hands the free pages back (the keepers: 4 MB)


def test_release_is_harmless_without_glibc(monkeypatch):
    heap._glibc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    try:
        assert heap._glibc() is None
        heap.release_free_memory()  # no error
    finally:
        monkeypatch.undo()
        heap._glibc.cache_clear()
