"""User-facing errors.

Every error a user can cause (bad file, bad dataset, impossible budget) is a
``GigasegError``. The CLI prints its message on one line and exits non-zero; it
never shows a traceback for these. Messages name the file and the problem.
"""

from __future__ import annotations

import errno
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

    def __reduce__(self):
        # rebuilt from its two arguments, so it survives pickling (e.g. from a Dask worker to the client)
        return type(self), (self.path, self.problem)


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

    def __reduce__(self):
        return type(self), (self.path, self.problem)


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


#: OS errors that the user's environment causes (a full disk, a read-only folder, a path that is a
#: file): reported in one line naming the path, not as a traceback
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "ENOTDIR",
        "EISDIR",
        "EACCES",
        "EPERM",
        "ENOENT",
        "EEXIST",
        "ENAMETOOLONG",
        "ELOOP",
        "EMFILE",
        "ENFILE",
        "EFBIG",
        "EIO",
    )
    if hasattr(errno, name)
)


def describe_os_error(error: OSError, command: str = "") -> str:
    """One line for an OS error: the path(s) it names and the system's explanation.

    Args:
        error: the error.
        command: the subcommand that failed, for the hint after a full disk.

    Returns:
        ``"<path>: <strerror>"`` (or ``"<path> -> <path2>: ..."`` for a rename), without a path
        when the error names none.
    """
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        rerun = "rerun with --resume" if command == "train" else "rerun the same command"
        reason += f" (free some space and {rerun}: finished parts are kept)"
    where = error.filename
    if where is not None and error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    return f"{where}: {reason}" if where is not None else reason
