"""Peak memory of a function or a command, each measured in a fresh child process.

The rules (see the benchmarks design): on CPU the figure is the peak resident set size
(``ru_maxrss``) of a fresh process that does only the measured work, next to the same
figure for a process that only imports torch (:func:`baseline_rss`), so the runtime's own
share is visible; on CUDA it is ``torch.cuda.max_memory_allocated``.

- :func:`measure` / :func:`measure_call` run an importable top-level function in a fresh
  ``python`` child (started with ``subprocess``, not ``multiprocessing``, so the child
  does not re-import the caller's ``__main__``) and return a :class:`MemoryReport` with
  the child's peak RSS read right after the function returns, its CUDA peak, the return
  value and the function's wall time. An exception in the child is re-raised in the
  parent with the child's traceback as its ``__cause__``.
- :func:`measure_command` runs a command line and reports its peak RSS, exit code and
  wall time.

Every measured process is started by a small wrapper (``python -S``) that spawns it and
reads exactly that process's rusage with ``os.wait4``; so earlier children of the caller
cannot pollute the maximum (as with ``getrusage(RUSAGE_CHILDREN)`` in the caller), and,
more importantly, the caller's own peak does not leak in: on Linux ``execve`` records the
peak RSS of the address space it replaces in the new program's ``ru_maxrss``, so a
program exec'd straight from a large caller would report at least the caller's peak.
The wrapper's own few MB set the floor of any figure.

RSS figures are the largest single process, not a sum over processes (e.g. DataLoader
workers). Linux and macOS only (``resource`` and ``os.wait4``).
"""

from __future__ import annotations

import functools
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gigaseg

from ..memory import format_size
from ._child import RSS_UNIT, noop

__all__ = ["ChildError", "MemoryReport", "baseline_rss", "measure", "measure_call", "measure_command"]


class ChildError(RuntimeError):
    """The measured child failed in a way that cannot be re-raised as its own exception."""


class ChildTraceback(Exception):
    """Carries the child's traceback text; set as ``__cause__`` of a re-raised exception.

    Args:
        text: the traceback as the child formatted it.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nTraceback in the measured child process:\n" + self.text


@dataclass
class MemoryReport:
    """Result of one measurement. Sizes are bytes, times seconds.

    ``baseline_rss`` is the peak RSS of a child that does nothing but the same start-up
    (import torch, by default), ``None`` when not requested. ``cuda_peak`` and
    ``cuda_peak_reserved`` are ``None`` when the work never initialised CUDA.
    """

    target: str
    peak_rss: int
    wall_s: float
    baseline_rss: int | None = None
    cuda_peak: int | None = None
    cuda_peak_reserved: int | None = None
    returncode: int = 0
    value: Any = field(default=None, repr=False)
    stdout: str | None = field(default=None, repr=False)
    stderr: str | None = field(default=None, repr=False)

    @property
    def rss_above_baseline(self) -> int | None:
        """``peak_rss - baseline_rss`` in bytes, None without a baseline."""
        return None if self.baseline_rss is None else self.peak_rss - self.baseline_rss

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict.

        Returns:
            ``target``, ``peak_rss``, ``baseline_rss``, ``rss_above_baseline``, ``cuda_peak``,
            ``cuda_peak_reserved``, ``wall_s`` and ``returncode`` (not the return value or the
            captured output).
        """
        return {
            "target": self.target,
            "peak_rss": self.peak_rss,
            "baseline_rss": self.baseline_rss,
            "rss_above_baseline": self.rss_above_baseline,
            "cuda_peak": self.cuda_peak,
            "cuda_peak_reserved": self.cuda_peak_reserved,
            "wall_s": self.wall_s,
            "returncode": self.returncode,
        }

    def __str__(self) -> str:
        parts = [f"peak RSS {format_size(self.peak_rss)}"]
        if self.baseline_rss is not None:
            parts[0] += f" ({format_size(self.rss_above_baseline)} above the {format_size(self.baseline_rss)} baseline)"
        if self.cuda_peak is not None:
            parts.append(
                f"CUDA peak {format_size(self.cuda_peak)} allocated, "
                f"{format_size(self.cuda_peak_reserved or 0)} reserved"
            )
        parts.append(f"{self.wall_s:.2f} s")
        if self.returncode:
            parts.append(f"exit code {self.returncode}")
        return f"{self.target}: " + ", ".join(parts)


# --------------------------------------------------------------------------- running a child


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# The measured process is started by this small wrapper, never exec'd from the caller
# directly: on Linux, execve records the peak RSS of the address space it replaces in the
# new program's ru_maxrss, and a child exec'd from the caller (fork or vfork) replaces a
# copy of, or the caller's own, address space, so it would report at least the caller's
# peak. The wrapper (``python -S``, a few MB) spawns the command, waits for exactly that
# process with wait4 and writes "exit_code max_rss wall_s" (or "spawn-error errno text").
_WRAPPER = """
import os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as exc:
    with open(result, "w") as f:
        f.write(f"spawn-error {exc.errno} {exc.strerror}")
    sys.exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result, "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} {wall!r}")
"""


def _run_child(
    argv: Sequence[str],
    *,
    timeout: float | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike | None,
    stdout: Any = None,
    stderr: Any = None,
) -> tuple[int, int, float]:
    """Run ``argv`` to completion through the wrapper; (exit code, its peak RSS in bytes, wall seconds).

    The wrapper gets its own process group, so a timeout, an interrupt of the caller or (in
    the main thread) a SIGTERM to the caller ends the measured process together with anything
    it started; the caller then exits as SIGTERM would have made it.
    """
    with tempfile.TemporaryDirectory(prefix="gigaseg-rss-") as tmp:
        result = Path(tmp, "rusage")
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _WRAPPER, str(result), *argv],
            env=None if env is None else dict(env),
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        timed_out = False

        def on_timeout() -> None:
            nonlocal timed_out
            if proc.poll() is None:
                timed_out = True
                _kill_group(proc.pid)

        timer = threading.Timer(timeout, on_timeout) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        previous = None
        if threading.current_thread() is threading.main_thread():
            # a terminated caller (kill, a batch system) must not leave the command running on
            # its own: turn SIGTERM into an exception that the cleanup below sees
            previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            proc.wait()
        except BaseException:  # e.g. KeyboardInterrupt: do not leave the command running
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if timed_out:
            raise subprocess.TimeoutExpired(list(argv), timeout)
        text = result.read_text() if result.exists() else ""
    fields = text.split(maxsplit=2)
    if len(fields) == 3 and fields[0] == "spawn-error":
        raise OSError(int(fields[1]), fields[2], argv[0])
    if len(fields) != 3:
        raise ChildError(f"the measuring wrapper of {argv[0]!r} {_exit_text(proc.returncode)} without a result")
    return int(fields[0]), int(fields[1]) * RSS_UNIT, float(fields[2])


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


# --------------------------------------------------------------------------- functions

_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); from gigaseg.bench._child import main; main(sys.argv[1], sys.argv[2])"
)


def _describe(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    module = getattr(inner, "__module__", None) or "?"
    return f"{module}:{getattr(inner, '__qualname__', repr(inner))}"


def _reraise(outcome: dict[str, Any], target: str) -> None:
    cause = ChildTraceback(outcome["traceback"])
    exc: BaseException | None = None
    if outcome["exception"] is not None:
        try:
            exc = pickle.loads(outcome["exception"])
        except Exception:
            exc = None
    if isinstance(exc, BaseException):
        raise exc from cause
    raise ChildError(f"{target} raised {outcome['type']}: {outcome['message']}") from cause


def measure_call(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    baseline: bool = True,
    import_torch: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> MemoryReport:
    """:func:`measure` with options.

    ``fn`` must be picklable by reference: a top-level function of an importable module
    (not ``__main__``, not a lambda or closure), or a ``functools.partial`` of one; the
    arguments and the return value must be picklable. The child gets the caller's
    ``sys.path``. Importing ``fn``'s module is part of the measured work, so keep measured
    functions in small modules.

    Args:
        fn: the function the child runs.
        args: its positional arguments.
        kwargs: its keyword arguments (None: none).
        baseline: attach :func:`baseline_rss` for the same ``import_torch`` setting.
        import_torch: import torch in the child before ``fn`` (the default, so every child
            carries the same runtime share as the baseline).
        timeout: seconds after which the child is killed (None: no limit).
        env: the child's environment (None: the caller's).

    Returns:
        The child's figures, with ``fn``'s return value as ``value``.

    Raises:
        TypeError: ``fn`` is defined in ``__main__``, or it or its arguments cannot be pickled.
        ChildError: the child died before it reported (out of memory?), or raised an
            exception that cannot be re-created here.
        subprocess.TimeoutExpired: the child ran past ``timeout``.
        Exception: whatever ``fn`` raised in the child, re-raised here with the child's
            traceback as its ``__cause__``.
    """
    target = _describe(fn)
    if getattr(getattr(fn, "func", fn), "__module__", None) == "__main__":
        raise TypeError(
            f"cannot measure {target}: a function defined in __main__ cannot be imported by "
            "the child process; move it into a module"
        )
    try:
        body = pickle.dumps((fn, tuple(args), dict(kwargs or {})))
    except Exception as exc:
        raise TypeError(
            f"cannot send {target} to a child process ({exc}); measure needs a top-level "
            "function of an importable module and picklable arguments"
        ) from exc
    root = str(Path(gigaseg.__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="gigaseg-measure-") as tmp:
        payload, result = Path(tmp, "payload.pkl"), Path(tmp, "result.pkl")
        with open(payload, "wb") as f:
            pickle.dump({"sys_path": list(sys.path), "import_torch": import_torch}, f)
            f.write(body)
        returncode, _, _ = _run_child(
            [sys.executable, "-c", _BOOTSTRAP.format(root=root), str(payload), str(result)],
            timeout=timeout,
            env=env,
            cwd=None,
        )
        if not result.exists():
            raise ChildError(
                f"the child process measuring {target} {_exit_text(returncode)} before it reported (out of memory?)"
            )
        with open(result, "rb") as f:
            outcome = pickle.load(f)
    if not outcome["ok"]:
        _reraise(outcome, target)
    return MemoryReport(
        target=target,
        peak_rss=outcome["peak_rss"],
        wall_s=outcome["wall_s"],
        baseline_rss=baseline_rss(import_torch) if baseline else None,
        cuda_peak=outcome["cuda_peak"],
        cuda_peak_reserved=outcome["cuda_peak_reserved"],
        value=outcome["value"],
    )


def measure(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> MemoryReport:
    """Run ``fn(*args, **kwargs)`` in a fresh child process and report its peak memory.

    Defaults of :func:`measure_call`: torch imported in the child, baseline attached, no
    timeout.

    Args:
        fn: a top-level function of an importable module (see :func:`measure_call`).
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        The child's figures: ``value`` is the return value, ``wall_s`` the function's own run
        time (without the child's start-up).

    Raises:
        TypeError: ``fn`` cannot be sent to a child (see :func:`measure_call`).
        ChildError: the child died before it reported.
        Exception: whatever ``fn`` raised in the child.
    """
    return measure_call(fn, args, kwargs)


def baseline_rss(import_torch: bool = True) -> int:
    """Peak RSS of a measurement child that does nothing (but import torch, by default).

    Measured once per process and setting, then cached.

    Args:
        import_torch: whether the child imports torch (as :func:`measure_call`'s children do).

    Returns:
        The child's peak RSS in bytes.
    """
    return _cached_baseline(bool(import_torch))


@functools.cache
def _cached_baseline(import_torch: bool) -> int:
    return measure_call(noop, baseline=False, import_torch=import_torch).peak_rss


# --------------------------------------------------------------------------- commands


def measure_command(
    argv: Sequence[str] | str,
    *,
    timeout: float | None = None,
    capture_output: bool = False,
    check: bool = False,
    baseline: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> MemoryReport:
    """Run a command line and report its peak RSS, exit code and wall time.

    Args:
        argv: the command as a list (a string is split with ``shlex.split``).
        timeout: seconds after which the command and its process group are killed (None: no limit).
        capture_output: store stdout and stderr as text in the report (else they go to the
            caller's).
        check: raise on a non-zero exit instead of reporting it in ``returncode``.
        baseline: attach :func:`baseline_rss` (torch import) for comparison.
        env: the command's environment (None: the caller's).
        cwd: its working folder (None: the caller's).

    Returns:
        The command's figures (``value`` is None).

    Raises:
        ValueError: ``argv`` is empty.
        OSError: the command cannot be started.
        subprocess.CalledProcessError: with ``check``, a non-zero exit.
        subprocess.TimeoutExpired: the command ran past ``timeout``.
    """
    argv = shlex.split(argv) if isinstance(argv, str) else [os.fspath(a) for a in argv]
    if not argv:
        raise ValueError("empty command line")
    if capture_output:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            returncode, peak, wall = _run_child(argv, timeout=timeout, env=env, cwd=cwd, stdout=out, stderr=err)
            out.seek(0)
            err.seek(0)
            stdout: str | None = out.read().decode(errors="replace")
            stderr: str | None = err.read().decode(errors="replace")
    else:
        returncode, peak, wall = _run_child(argv, timeout=timeout, env=env, cwd=cwd)
        stdout = stderr = None
    if check and returncode != 0:
        raise subprocess.CalledProcessError(returncode, argv, stdout, stderr)
    return MemoryReport(
        target=shlex.join(argv),
        peak_rss=peak,
        wall_s=wall,
        baseline_rss=baseline_rss(True) if baseline else None,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
    )
