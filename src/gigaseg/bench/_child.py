"""Entry point of the fresh child process that :func:`gigaseg.bench.memory.measure` starts.

Standard library only, so the child's own footprint stays small and the same for every
measurement. Protocol (files named on the command line):

- payload: a pickled header dict ``{"sys_path": [...], "import_torch": bool}``, then the
  pickled ``(fn, args, kwargs)``;
- result: one pickled dict, ``{"ok": True, "value", "peak_rss", "cuda_peak",
  "cuda_peak_reserved", "wall_s"}`` or ``{"ok": False, "type", "message", "traceback",
  "exception"}`` (``exception`` = the pickled exception, or None if it cannot be pickled).
"""

from __future__ import annotations

import importlib
import pickle
import resource
import sys
import time
import traceback
from typing import Any

# ru_maxrss is in kilobytes (KiB) on Linux, in bytes on macOS
RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss() -> int:
    """Peak RSS of this process or of any of its waited-for children, whichever is larger.

    Returns:
        The peak resident set size in bytes.
    """
    return RSS_UNIT * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )


def noop() -> None:
    """The work of a baseline measurement: nothing."""


def _cuda_peaks() -> tuple[int | None, int | None]:
    """CUDA peak allocated / reserved bytes (current device), if the work initialised CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None, None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def _failure(exc: BaseException) -> dict[str, Any]:
    try:
        pickled: bytes | None = pickle.dumps(exc)
    except Exception:
        pickled = None
    cls = type(exc)
    return {
        "ok": False,
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "traceback": traceback.format_exc(),
        "exception": pickled,
    }


def _run(payload_path: str) -> dict[str, Any]:
    try:
        with open(payload_path, "rb") as f:
            header = pickle.load(f)
            sys.path[:] = header["sys_path"]
            if header["import_torch"]:  # the runtime share that baseline_rss also carries
                importlib.import_module("torch")
            fn, args, kwargs = pickle.load(f)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # only if unpickling touched CUDA
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        wall = time.perf_counter() - start
        rss = peak_rss()  # before anything else can raise it
        cuda_peak, cuda_reserved = _cuda_peaks()
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which re-raises)
        return _failure(exc)
    return {
        "ok": True,
        "value": value,
        "peak_rss": rss,
        "cuda_peak": cuda_peak,
        "cuda_peak_reserved": cuda_reserved,
        "wall_s": wall,
    }


def main(payload_path: str, result_path: str) -> None:
    """Run the pickled call of ``payload_path`` and write its outcome to ``result_path``.

    Args:
        payload_path: the payload file the parent wrote (see the module docstring).
        result_path: the file the outcome dict is pickled to (the parent reads it).
    """
    outcome = _run(payload_path)
    try:
        data = pickle.dumps(outcome)
    except Exception as exc:  # the return value cannot be pickled
        try:
            raise TypeError(f"the measured function's return value cannot be pickled: {exc}") from exc
        except TypeError as err:
            data = pickle.dumps(_failure(err))
    with open(result_path, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
