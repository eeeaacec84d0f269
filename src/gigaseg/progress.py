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


class Counter:
    """What :func:`progress_counter` yields: a bar whose total can grow while it runs.

    Args:
        advance: moves the bar ``n`` steps.
        grow: adds ``n`` steps to the total.
    """

    def __init__(self, advance: Callable[[int], None], grow: Callable[[int], None]):
        self.advance = advance
        self.grow = grow


@contextlib.contextmanager
def progress_counter(description: str, total: int = 0, enabled: bool = True) -> Iterator[Counter]:
    """Like :func:`progress_bar`, for work whose size is learnt as it goes (units of many images).

    Args:
        description: the text left of the bar.
        total: the steps known at the start.
        enabled: False shows nothing even on a terminal.

    Yields:
        A :class:`Counter` (its methods are no-ops without a bar).
    """
    if not enabled or not sys.stderr.isatty():
        yield Counter(lambda n=1: None, lambda n: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        size = [total]

        def grow(n: int) -> None:
            size[0] += n
            bar.update(task, total=size[0])

        yield Counter(lambda n=1: bar.advance(task, n), grow)
