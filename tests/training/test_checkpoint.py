"""Checkpoints are self-describing, load with weights_only=True and rebuild the model."""

import numpy as np
import pytest
import torch

from gigaseg.api import load_model
from gigaseg.errors import ConfigError
from gigaseg.io.normalize import Normalization
from gigaseg.methods.registry import create_model
from gigaseg.training.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint


def test_round_trip_rebuilds_identical_model(tmp_path):
    model = create_model("patch", encoder="test_resnet", num_classes=5, patch_size=64, overlap=16)
    data = {
        "classes": list("abcde"),
        "palette": [[i, i, i] for i in range(5)],
        "ignore_index": 255,
        "exclude_from_miou": [0],
        "normalization": Normalization.for_image(3, np.uint8).to_dict(),
    }
    path = save_checkpoint(tmp_path / "m.ckpt", model, data, train_state={"epoch": 3, "rng": rng_state()})
    raw = torch.load(path, weights_only=True)  # the format promise: no pickled objects
    assert raw["model"]["config"]["method"] == "patch" and raw["train"]["epoch"] == 3
    rebuilt, info = load_model(path)
    assert info["classes"] == list("abcde") and info["exclude_from_miou"] == [0]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    assert not list(tmp_path.glob(".*"))  # atomic write left no temp file


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3))
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_checkpoints_have_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.ckpt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="junk.ckpt: not a readable gigaseg checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ConfigError, match="other.ckpt: not a gigaseg checkpoint"):
        load_checkpoint(other)
    with pytest.raises(ConfigError, match="no best.ckpt or last.ckpt"):
        load_checkpoint(tmp_path)
