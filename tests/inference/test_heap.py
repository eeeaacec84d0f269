"""glibc allocator settings that keep a streamed prediction's resident memory bounded."""

import ctypes
import subprocess
import sys

import pytest

from gigaseg.inference import heap

# In a fresh process (a long test session's heap holds free resident pages that new buffers
# reuse, which hides what the allocator does): free a 20 MB buffer, which raises glibc's
# dynamic mmap threshold, then allocate 64 buffers of 2 MB, each followed by a small one
# that stays (as a prediction's long-lived tensors do), and free the large ones.
PROBE = """
import sys
import numpy as np
from gigaseg.inference import heap

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

if sys.argv[1] == "bounded":
    assert heap.bound_heap_growth()
large = np.ones(20 * 2**20, np.uint8)
del large
before = rss()
buffers, keepers = [], []
for _ in range(64):
    buffers.append(np.ones(2 * 2**20, np.uint8))
    keepers.append(np.ones(64 * 2**10, np.uint8))
held = rss()
del buffers
after = rss()
print(held - before, after - before)
"""


def probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    held, kept = map(int, out.stdout.split())
    return held, kept


@pytest.mark.skipif(heap._glibc() is None, reason="needs glibc")
def test_freed_buffers_leave_the_process_once_the_threshold_is_fixed():
    held, kept = probe("default")
    assert held > 100 * 2**20 and kept > 100 * 2**20  # glibc's default: holes between the keepers stay resident
    held, kept = probe("bounded")
    assert held > 100 * 2**20 and kept < 12 * 2**20  # mmap-served, unmapped when freed (the keepers: 4 MB)


def test_release_is_harmless_without_glibc(monkeypatch):
    heap._glibc.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    try:
        assert heap._glibc() is None
        heap.release_free_memory()  # no error
    finally:
        monkeypatch.undo()
        heap._glibc.cache_clear()
