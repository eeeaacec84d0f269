"""Where and from what a benchmark figure came: machine, commit, command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime


def cpu_model() -> str:
    """The CPU's model name.

    Returns:
        Linux's ``/proc/cpuinfo`` model name, else ``platform.processor()`` or the machine type.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int | None:
    """Cores this process may run on (fewer than ``os.cpu_count()`` under a CPU mask or container).

    Returns:
        The number of usable cores, or None where unknown.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def memory_bytes() -> int | None:
    """Physical memory of the machine (Linux ``/proc/meminfo``).

    Returns:
        The memory in bytes, or None where unknown.
    """
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_name() -> str | None:
    """The name of the first CUDA device, if torch sees one.

    Returns:
        The device name, or None without torch, CUDA or a working driver.
    """
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch or a broken driver: report no GPU
        return None


def git_commit() -> str | None:
    """The commit of the gigaseg checkout this module runs from.

    Returns:
        The short hash, with ``-dirty`` when tracked files have changes; None outside a git
        checkout or without git.
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> dict:
    """Machine and provenance facts stamped on every benchmark result.

    Returns:
        A JSON-ready dict: ``cpu``, ``cores``, ``usable_cores``, ``memory_bytes``, ``gpu``,
        ``platform``, ``python``, ``torch`` (None without torch), ``commit``, ``command`` (this
        process's command line) and ``date`` (UTC, ISO 8601).
    """
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def markdown_header(machine: dict) -> str:
    """The provenance lines that open a benchmark's Markdown report.

    Args:
        machine: what :func:`describe` returned (as stored in the results).

    Returns:
        Machine, GPU, torch version, commit and date on one line, then the command line.
    """
    gpu = machine["gpu"] or "none (CPU only)"
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores; GPU: {gpu}; torch {machine['torch']}; "
        f"commit {machine['commit']}; {machine['date']}\n\nCommand: `{machine['command']}`\n"
    )
