"""Write-then-rename, so an output exists under its final name only when complete.

The finished output is flushed to the disk (``fsync``) before the rename, and its folder after
it (where the OS allows opening a folder), so a crash right after a save leaves either the
previous file or the complete new one under the final name, never an empty or partial one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: str | os.PathLike) -> Path:
    """Where an output is built before it is complete.

    The partial file sits in the same folder as the output, so renaming it is atomic.

    Args:
        path: the final output path.

    Returns:
        ``<folder>/.<name>.partial`` for ``path = <folder>/<name>``.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, keep_partial_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    The parent folder of ``path`` is created if needed. On success the temporary output
    (a file, or a folder whose files are all synced) is flushed to the disk, renamed to
    ``path``, and the parent folder is flushed so the rename itself is durable. On an
    exception the temporary file is removed (unless ``keep_partial_on_error``) and the
    exception propagates; nothing appears under the final name.

    Args:
        path: the final output path.
        keep_partial_on_error: keep the temporary file when the block raises
            (for resumable writers).

    Yields:
        The temporary path (:func:`partial_path` of ``path``) to write the output to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
    except BaseException:
        if not keep_partial_on_error:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    _fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_folder(final.parent)


def _fsync_tree(path: Path) -> None:
    """Flush a written file, or every file and folder of a written folder, to the disk."""
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(folder) / name)
            _fsync_folder(Path(folder))
    elif path.exists():
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows syncs writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it); skipped where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on folders
            os.fsync(fd)
    finally:
        os.close(fd)
