"""Write-then-rename, so an output exists under its final name only when complete."""

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

    The parent folder of ``path`` is created if needed. On an exception the
    temporary file is removed (unless ``keep_partial_on_error``) and the exception
    propagates; nothing appears under the final name.

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
    os.replace(tmp, final)
