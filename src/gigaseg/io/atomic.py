"""Write-then-rename, so an output exists under its final name only when complete."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: str | os.PathLike) -> Path:
    """Where an output is built before it is complete (same folder, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, keep_partial_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed (unless ``keep_partial_on_error``,
    which resumable writers use) and nothing appears under the final name.
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
    os.replace(tmp, final)
