"""Checkpoints written by the layout before the re-layout (tests/fixtures/checkpoints_v0) still load and predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gigaseg
from gigaseg.training.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v0"
REFERENCE = json.loads((FIXTURES / "reference_outputs.json").read_text())
ADDED_AFTER_THE_RELAYOUT = {"fcos", "patchgd_detector"}  # the detectors: no checkpoint of theirs predates it


def test_every_method_has_an_old_checkpoint():
    assert sorted(REFERENCE) == sorted(set(gigaseg.available_methods()) - ADDED_AFTER_THE_RELAYOUT)
    assert ADDED_AFTER_THE_RELAYOUT <= set(gigaseg.available_methods())


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_old_checkpoint_loads_with_the_same_outputs(method):
    path = FIXTURES / f"{method}.ckpt"
    assert load_checkpoint(path)["model"]["config"]["method"] == method
    model, info = gigaseg.load_model(path)
    assert model.method_name == method and info["classes"] == ["a", "b", "c"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = model.predict(x).double()
    expected = REFERENCE[method]
    assert list(y.shape) == expected["shape"]
    assert y.sum().item() == pytest.approx(expected["sum"], rel=1e-4, abs=1e-6)
    assert y.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=1e-4, abs=1e-6)
    assert y.flatten()[:8].tolist() == pytest.approx(expected["first"], rel=1e-4, abs=1e-7)


def test_old_glnet_checkpoint_keeps_its_frozen_global_copy():
    model, _ = gigaseg.load_model(FIXTURES / "glnet.ckpt")
    assert model.stage == 3 and not model.fixed_is_tied
