"""Progress bars (rich) that vanish when output is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A context manager showing a rich progress bar on a TTY, nothing otherwise.

    Args:
        description: the text left of the bar.
        total: the number of steps.
        enabled: False shows nothing even on a terminal.

    Yields:
        ``advance(n=1)``, which moves the bar ``n`` steps (a no-op without a bar).
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
