"""User-facing errors.

Every error a user can cause (bad file, bad dataset, impossible budget) is a
``GigasegError``. The CLI prints its message on one line and exits non-zero; it
never shows a traceback for these. Messages name the file and the problem.
"""

from __future__ import annotations

import os


class GigasegError(Exception):
    """Base class: an error whose message is meant for the user."""


class ImageReadError(GigasegError):
    """An image file is missing, unreadable, truncated or in an unsupported layout.

    Args:
        path: the file (kept as ``self.path``, a str), or None when there is none.
        problem: what is wrong (kept as ``self.problem``); the message is ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class DatasetError(GigasegError):
    """A dataset folder or one of its files is malformed (missing masks, bad labels, ...).

    Args:
        path: the folder or file (kept as ``self.path``, a str), or None when there is none.
        problem: what is wrong (kept as ``self.problem``); the message is ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class SplitNotFound(DatasetError):
    """A dataset has no such split, or the split holds no images (a broken split is a plain DatasetError)."""


class BudgetError(GigasegError):
    """A memory budget is too small for the requested work."""


class ConfigError(GigasegError):
    """An option or configuration value is invalid (unknown method, bad size, ...)."""


class GigasegNotice(UserWarning):
    """Something gigaseg decided for the user (a grey image's channel repeated, say): shown as one line."""


class TrainingDiverged(GigasegError):
    """Training produced a non-finite loss, gradients or weights; the run stopped without saving them.

    The message names the stage, epoch and step, what was not finite and the likely causes.
    """
