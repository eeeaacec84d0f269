"""Shared fixtures of the fault-injection suite: one tiny checkpoint and one fork server per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gigaseg
from gigaseg.io.normalize import Normalization
from gigaseg.training.checkpoint import save_checkpoint

from .forkserver import ForkServer

#: a patch model small enough that a child predicts a 7000 x 256 scene in about a second
PATCH_OPTIONS = {"patch_size": 64, "overlap": 16, "fpn_channels": 16}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A patch model on test_resnet with fixed random weights, sharpened so the classes differ across a scene."""
    torch.manual_seed(0)
    model = gigaseg.create_model("patch", encoder="test_resnet", num_classes=3, **PATCH_OPTIONS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(20)
    data = {
        "classes": ["a", "b", "c"],
        "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        "ignore_index": 255,
        "exclude_from_miou": [],
        "normalization": Normalization.for_image(3, np.uint8).to_dict(),
    }
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.ckpt", model, data)


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
