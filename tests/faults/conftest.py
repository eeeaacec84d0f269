"""Shared fixtures of the fault-injection suite: one fork server per session (the checkpoint is tests/conftest.py's)."""

from __future__ import annotations

import pytest
import torch

from .forkserver import ForkServer


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """A process that has imported gigaseg and torch, forking one child per ``gigaseg`` command (forkserver.py)."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"), env=_environment())
    yield server
    server.close()


def _environment() -> dict:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("GIGASEG_MAX_DECODE", None)
    env.pop("GIGASEG_TEST_STOP", None)
    return env
