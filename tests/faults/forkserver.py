"""Run ``gigaseg`` commands as forked children of one process that has already imported gigaseg and torch.

A fresh ``python -m gigaseg`` spends about 5 s of CPU importing torch, timm and torchvision before it
looks at its arguments; the hostile-file corpus runs dozens of commands, so each would cost more than
the whole check. The server (this file run as a script) imports what ``gigaseg predict`` / ``evaluate``
import, then, per request, forks a child that runs ``gigaseg/__main__.py`` exactly as ``python -m
gigaseg`` does (``runpy``, with ``sys.argv`` set), with its own environment, stdout and stderr files.
An exception escaping the command is printed as the interpreter would (a traceback) and exits with
code 1, so a missing one-line error shows up as it would on a terminal.

The server reaps each child with ``os.wait4``: the exit code and the child's own peak RSS (which
includes the imports it shares with the server: the same as a fresh process after its imports). Each
child's address space is capped (``RLIMIT_AS``: the server's size plus ``ADDRESS_SPACE_HEADROOM``), so a
regression that decodes a "decompression bomb" fails with a MemoryError instead of exhausting the machine.

Protocol: one JSON object per line on stdin (``argv``, ``env``, ``stdout``, ``stderr``); one JSON line back
per request (``code``, ``peak_rss`` in bytes, ``wall_s``). The first line the server writes is ``ready``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: address space a child may map beyond the server's own (torch maps much more than it touches)
ADDRESS_SPACE_HEADROOM = 6 * 2**30


def _serve() -> None:  # pragma: no cover - runs in the server process
    import resource
    import runpy
    import traceback

    import torch  # noqa: F401

    import gigaseg.api  # noqa: F401
    import gigaseg.cli  # noqa: F401
    import gigaseg.commands.evaluate  # noqa: F401
    import gigaseg.commands.predict  # noqa: F401
    import gigaseg.methods  # noqa: F401

    with open("/proc/self/statm") as handle:
        size = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = size + ADDRESS_SPACE_HEADROOM
    protocol = sys.stdout
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for key, value in request["env"].items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
                    target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                sys.argv = ["gigaseg", *request["argv"]]
                try:
                    runpy.run_module("gigaseg", run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as exit:
                    if exit.code is None or isinstance(exit.code, int):
                        code = exit.code or 0
                    else:
                        print(exit.code, file=sys.stderr)
                        code = 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        protocol.write(
            json.dumps(
                {
                    "code": os.waitstatus_to_exitcode(status),
                    "peak_rss": usage.ru_maxrss * 1024,
                    "wall_s": time.perf_counter() - start,
                }
            )
            + "\n"
        )
        protocol.flush()


@dataclass
class Outcome:
    """What one command did.

    Attributes:
        code: its exit code (negative: killed by that signal).
        stdout: what it printed.
        stderr: what it printed on stderr.
        peak_rss: its peak resident set size in bytes.
        wall_s: the seconds from fork to exit.
    """

    code: int
    stdout: str
    stderr: str
    peak_rss: int
    wall_s: float


class ForkServer:
    """The client: starts the server, sends it commands one at a time.

    Args:
        scratch: a folder for the children's stdout and stderr files.
        env: the server's environment (None: this process's).
    """

    def __init__(self, scratch: Path, env: dict | None = None):
        self.scratch = Path(scratch)
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._ready = False

    def run(self, *argv, env: dict | None = None) -> Outcome:
        """Run ``gigaseg *argv`` in a forked child and wait for it.

        Args:
            *argv: the arguments after ``gigaseg``.
            env: variables to set in the child (None values remove them).

        Returns:
            The child's exit code, output and peak RSS.
        """
        if not self._ready:
            line = self.process.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the fork server did not start (it said {line!r})")
            self._ready = True
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        request = {"argv": [str(a) for a in argv], "env": env or {}, "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        reply = json.loads(line)
        return Outcome(reply["code"], out.read_text(), err.read_text(), reply["peak_rss"], reply["wall_s"])

    def close(self) -> None:
        """Stop the server."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


if __name__ == "__main__":
    _serve()
