"""One writer per output: an advisory lock next to the file being written.

Two ``gigaseg predict`` runs writing the same mask would interleave their bands in one
scratch folder. :func:`output_lock` takes an exclusive, non-blocking ``flock`` on
``.<name>.lock`` next to the output for as long as the output is being made; a second run
is refused at once with a message naming the output. The lock is released by the kernel
when its process dies (a killed run leaves no stale lock to clear), and the lock file is
removed when the run ends. On systems without ``fcntl`` (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["output_lock"]


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``path`` while the block runs.

    Args:
        path: the output file to be written (its folder is made if missing).

    Yields:
        The lock file's path.

    Raises:
        ConfigError: another process holds the lock of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    if fcntl is None:  # pragma: no cover - Windows
        yield lock
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{path}: another gigaseg process is writing this output (it holds {lock}); "
                f"wait for it to finish or choose another output"
            ) from None
        # the holder before us may have removed the file between our open and our lock:
        # then we hold a lock nobody else can see, so take the lock of the file that is there now
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # unlinked while still locked: a waiting opener re-checks (above)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
