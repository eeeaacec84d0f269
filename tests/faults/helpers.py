"""Child processes for the fault-injection tests: start ``python -m gigaseg``, stop it at a point, kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

#: the folder whose sitecustomize.py gives a child its fault points (see hook/sitecustomize.py)
HOOK_DIR = Path(__file__).parent / "hook"

#: peak RSS a refused command may reach. Python + torch + timm + gigaseg alone peak at 0.89 GB in a fresh
#: ``python -m gigaseg predict`` refusing the PNG bomb (0.43-0.47 GB in the fork server's children, whose peak
#: starts from the server's settled size); 1.5 GB leaves room for a checkpoint, a small image and allocator
#: noise, and is far below what any case here would take if its header were believed (the smallest, the JPEG
#: bomb, is 12.7 GB decoded) or if a genuine over-cap strip or tile were decoded anyway
PEAK_RSS_CAP = 1_500_000_000

#: how long one child may take before a test gives up on it
CHILD_TIMEOUT = 240


def child_env(stop: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a ``gigaseg`` child: this one, this process's torch threads, a fault point when given.

    Args:
        stop: ``"<point>:<n>"`` for ``GIGASEG_TEST_STOP`` (hook/sitecustomize.py), or None.
        **extra: more variables.

    Returns:
        The environment.
    """
    # the threads of this process's torch: a child's training must add up its numbers as an in-process run does
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}
    env.pop("GIGASEG_TEST_STOP", None)
    if "GIGASEG_MAX_DECODE" not in extra:
        env.pop("GIGASEG_MAX_DECODE", None)
    if stop is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK_DIR), env.get("PYTHONPATH")) if p)
        env["GIGASEG_TEST_STOP"] = stop
    return env


class Child:
    """``python -m gigaseg *argv`` as a real child process, its output in files under ``logs``.

    Args:
        logs: a folder for its stdout and stderr.
        *argv: the arguments after ``gigaseg``.
        stop: a fault point (see :func:`child_env`), or None.
        env: more variables.
    """

    count = 0

    def __init__(self, logs: Path, *argv, stop: str | None = None, env: dict | None = None):
        Child.count += 1
        logs.mkdir(parents=True, exist_ok=True)
        self.argv = [str(a) for a in argv]
        self.out_path, self.err_path = logs / f"{Child.count}.out", logs / f"{Child.count}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gigaseg", *self.argv],
                stdout=out,
                stderr=err,
                env=child_env(stop, **(env or {})),
            )
        self.pid = self.process.pid
        self.code: int | None = None
        self.stopped = False

    @property
    def stderr(self) -> str:
        """What the child printed on stderr."""
        return self.err_path.read_text()

    @property
    def stdout(self) -> str:
        """What the child printed on stdout."""
        return self.out_path.read_text()

    def poll(self) -> bool:
        """Whether the child stopped itself or exited (recorded in ``stopped`` / ``code``)."""
        if self.code is not None or self.stopped:
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
        if pid == 0:
            return False
        if os.WIFSTOPPED(status):
            self.stopped = True
        else:
            self._exited(status)
        return True

    def _exited(self, status: int) -> None:
        self.code = os.waitstatus_to_exitcode(status)
        self.process.returncode = self.code  # reaped here: keep Popen from waiting for it again

    def wait_stopped(self, timeout: float = CHILD_TIMEOUT) -> None:
        """Wait until the child stops itself at its fault point; fail if it exits instead."""
        self._wait(lambda: False, timeout)
        assert self.stopped, (
            f"gigaseg {' '.join(self.argv)} exited with {self.code} before its fault point:\n{self.stderr}"
        )

    def _wait(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.poll() and not condition():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"gigaseg {' '.join(self.argv)} ran for more than {timeout} s:\n{self.stderr}")
            time.sleep(0.005)

    def kill_when(self, condition: Callable[[], bool], timeout: float = CHILD_TIMEOUT) -> None:
        """SIGKILL the running child as soon as ``condition()`` holds (polled every 5 ms)."""
        self._wait(condition, timeout)
        assert self.code is None, f"gigaseg {' '.join(self.argv)} exited with {self.code} first:\n{self.stderr}"
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child (running or stopped) and reap it."""
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self._exited(status)

    def resume(self) -> None:
        """Let a stopped child go on (SIGCONT)."""
        assert self.stopped
        self.stopped = False
        os.kill(self.pid, signal.SIGCONT)

    def wait(self, timeout: float = CHILD_TIMEOUT) -> int:
        """Wait for the child to exit; its exit code."""
        deadline = time.monotonic() + timeout
        while self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._exited(status)
            elif time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"gigaseg {' '.join(self.argv)} ran for more than {timeout} s:\n{self.stderr}")
            else:
                time.sleep(0.01)
        return self.code


def run_child(logs: Path, *argv, env: dict | None = None) -> Child:
    """Run ``python -m gigaseg *argv`` to its end.

    Args:
        logs: a folder for its output.
        *argv: the arguments after ``gigaseg``.
        env: more variables.

    Returns:
        The finished child (``code``, ``stdout``, ``stderr``).
    """
    child = Child(logs, *argv, env=env)
    child.wait()
    return child


def one_line_error(stderr: str, command: str, *fragments: str) -> str:
    """Check that ``stderr`` is exactly one ``gigaseg <command>: error:`` line holding every fragment.

    Args:
        stderr: what a command printed.
        command: the subcommand.
        *fragments: what the line must contain (the file it names, the problem).

    Returns:
        The line.
    """
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, f"not one line:\n{stderr}"
    assert lines[0].startswith(f"gigaseg {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} is not in: {lines[0]}"
    return lines[0]


def done_bands(scratch: Path) -> list[int]:
    """The bands a mask's scratch folder lists as finished (none when there is no readable progress.json)."""
    try:
        return json.loads((scratch / "progress.json").read_text())["done"]
    except (OSError, ValueError):
        return []


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels with some structure (the top half darker), so a mask is not one class."""
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2] //= 4
    return pixels
