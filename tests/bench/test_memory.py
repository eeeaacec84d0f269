"""Peak memory of functions and commands in fresh child processes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gigaseg.bench.memory import ChildError, MemoryReport, baseline_rss, measure, measure_call, measure_command

MB = 10**6


# Functions the children run: top-level in an importable module. This module does not
# import torch at the top, so children started with import_torch=False stay small and fast.
def touch_bytes(nbytes: int) -> int:
    array = np.ones(nbytes // 8)  # np.ones writes every page
    return int(array.size)


def add(a: int, b: int = 0) -> dict:
    return {"sum": a + b, "pid": os.getpid()}


def raise_value_error() -> None:
    raise ValueError("boom in the child")


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # not re-creatable by pickle (args=(message,))
        super().__init__(f"{a}/{b}")


def raise_unpicklable() -> None:
    raise NeedsTwoArgs(1, 2)


def hard_exit() -> None:
    os._exit(3)


def return_lambda():
    return lambda: None


def allocate_cuda(nbytes: int) -> None:
    import torch

    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    del x


def test_peak_rss_against_torch_baseline():
    """Two torch-importing children (~2 s each): the baseline and one touching 200 MB."""
    report = measure(touch_bytes, 200 * MB)
    assert report.value == 200 * MB // 8
    base = baseline_rss()
    assert report.baseline_rss == base
    assert 0 < base < report.peak_rss
    assert report.rss_above_baseline >= 200 * MB
    assert report.cuda_peak is None  # CPU work never initialises CUDA
    assert report.wall_s > 0
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d and d["rss_above_baseline"] == report.peak_rss - base
    assert "above the" in str(report) and "MB" in str(report)


def test_without_torch_value_args_and_isolation():
    small = measure_call(add, (2,), {"b": 3}, baseline=False, import_torch=False)
    assert small.value["sum"] == 5 and small.value["pid"] != os.getpid()
    assert small.baseline_rss is None and "torch" not in str(small.target)
    big = measure_call(touch_bytes, (100 * MB,), baseline=False, import_torch=False)
    assert big.peak_rss - small.peak_rss >= 0.95 * 100 * MB
    # a later, small child is not polluted by the earlier big one
    again = measure_call(functools.partial(add, 1), baseline=False, import_torch=False)
    assert again.value["sum"] == 1 and again.peak_rss < big.peak_rss - 90 * MB


def test_child_exception_is_reraised_with_traceback():
    with pytest.raises(ValueError, match="boom in the child") as info:
        measure_call(raise_value_error, baseline=False, import_torch=False)
    cause = info.value.__cause__
    assert cause is not None and "raise_value_error" in str(cause) and "Traceback" in str(cause)
    with pytest.raises(ChildError, match="NeedsTwoArgs: 1/2") as info:
        measure_call(raise_unpicklable, baseline=False, import_torch=False)
    assert "raise_unpicklable" in str(info.value.__cause__)


def test_child_crash_and_bad_targets():
    with pytest.raises(ChildError, match="exited with code 3"):
        measure_call(hard_exit, baseline=False, import_torch=False)
    with pytest.raises(TypeError, match="cannot be pickled"):
        measure_call(return_lambda, baseline=False, import_torch=False)
    with pytest.raises(TypeError, match="top-level"):
        measure(lambda: None)
    main_fn = type(add)(add.__code__, {}, "in_main")
    main_fn.__module__ = "__main__"
    with pytest.raises(TypeError, match="__main__"):
        measure(main_fn)
    with pytest.raises(subprocess.TimeoutExpired):
        measure_call(__import__("time").sleep, (30,), baseline=False, import_torch=False, timeout=0.5)


def test_cuda_peak():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    report = measure(allocate_cuda, 100 * MB)
    assert report.cuda_peak >= 100 * MB and report.cuda_peak_reserved >= report.cuda_peak
    assert "CUDA peak" in str(report)


def alloc_command(nbytes: int) -> list[str]:
    code = f"import numpy as np; a = np.ones({nbytes} // 8); print(a.size)"
    return [sys.executable, "-c", code]


def test_measure_command():
    big = measure_command(alloc_command(100 * MB), capture_output=True)
    small = measure_command(alloc_command(0), capture_output=True)
    assert big.returncode == 0 and big.stdout.strip() == str(100 * MB // 8)
    assert big.peak_rss - small.peak_rss >= 0.95 * 100 * MB
    assert big.peak_rss >= 100 * MB
    assert small.peak_rss < big.peak_rss - 90 * MB  # the earlier, bigger child does not pollute it
    assert big.wall_s > 0 and big.cuda_peak is None and big.baseline_rss is None
    assert big.target.startswith(sys.executable)

    failing = measure_command(
        [sys.executable, "-c", "import sys; print('bad', file=sys.stderr); sys.exit(5)"], capture_output=True
    )
    assert failing.returncode == 5 and "bad" in failing.stderr and "exit code 5" in str(failing)
    with pytest.raises(subprocess.CalledProcessError):
        measure_command(f"{sys.executable} -c 'raise SystemExit(2)'", check=True)
    with pytest.raises(subprocess.TimeoutExpired):
        measure_command([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    killed = measure_command([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == -9


def test_a_terminated_caller_takes_the_measured_command_with_it(tmp_path):
    """SIGTERM to a process waiting in measure_command ends the command too, not only the caller."""
    pid_file = tmp_path / "pid"
    command = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    caller = subprocess.Popen(
        [sys.executable, "-c", f"from gigaseg.bench.memory import measure_command; measure_command({command!r})"]
    )
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    measured = int(pid_file.read_text())
    os.kill(measured, 0)  # running
    caller.terminate()
    assert caller.wait(timeout=20) == 143  # 128 + SIGTERM, as an unhandled SIGTERM would say
    for _ in range(100):
        try:
            os.kill(measured, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(measured, signal.SIGKILL)
        raise AssertionError("the measured command outlived its terminated caller")


def test_report_str_without_baseline():
    report = MemoryReport(
        target="x", peak_rss=1_500_000, wall_s=0.25, cuda_peak=2 * 10**9, cuda_peak_reserved=3 * 10**9
    )
    assert str(report) == "x: peak RSS 1.50 MB, CUDA peak 2.00 GB allocated, 3.00 GB reserved, 0.25 s"
