"""Files a run reads and writes: encoder weights load without unpickling code, outputs reach the disk."""

import os
import sys

import pytest
import safetensors.torch
import timm
import torch

import gigaseg.io.atomic
from gigaseg.errors import ConfigError
from gigaseg.io.atomic import atomic_output
from gigaseg.nn.encoders import Encoder


class RunsCode:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def old_timm_load_state_dict(path, *args, **kwargs):
    """timm releases before weights_only=True was their default: a plain unpickling torch.load."""
    return torch.load(path, map_location="cpu", weights_only=False)


def test_encoder_weights_file_is_loaded_with_weights_only_whatever_timm_does(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCode(marker)}, path)
    monkeypatch.setattr(timm.models, "load_state_dict", old_timm_load_state_dict)
    with pytest.raises(ConfigError, match=r"evil\.pth: not a readable weights file"):
        Encoder("test_resnet", pretrained=str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "suffix, wrapper",
    [(".pth", None), (".pth", "state_dict"), (".pth", "model"), (".pth", "state_dict_ema"), (".pth", "model_ema")]
    + [(".safetensors", None)],
)
def test_encoder_weights_formats_that_worked_through_timm_still_work(tmp_path, suffix, wrapper):
    reference = timm.create_model("test_resnet")
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        decoy = {k: torch.zeros_like(v) for k, v in state.items()}
        payload = state if wrapper is None else {wrapper: state, "epoch": 3}
        if wrapper in ("state_dict_ema", "model_ema"):  # timm prefers the EMA weights
            payload["state_dict" if wrapper == "state_dict_ema" else "model"] = decoy
        torch.save(payload, path)
    encoder = Encoder("test_resnet", pretrained=str(path))
    source = reference.state_dict()
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, source[key]), key


def test_atomic_output_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if sys.platform == "linux" else fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(gigaseg.io.atomic.os, "fsync", fsync)
    monkeypatch.setattr(gigaseg.io.atomic.os, "replace", replace)
    final = tmp_path / "out" / "model.ckpt"
    with atomic_output(final) as tmp:
        tmp.write_bytes(b"weights")
    assert final.read_bytes() == b"weights"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    if sys.platform == "linux":
        assert events[0][1] == str(tmp_path / "out" / ".model.ckpt.partial")
        assert events[2][1] == str(tmp_path / "out")


def test_atomic_output_fsyncs_every_file_of_a_folder_output(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(gigaseg.io.atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    final = tmp_path / "probabilities.zarr"
    with atomic_output(final) as tmp:
        (tmp / "0").mkdir(parents=True)
        (tmp / "0" / "chunk").write_bytes(b"x")
        (tmp / ".zarray").write_text("{}")
    assert (final / "0" / "chunk").read_bytes() == b"x"
    assert len(synced) >= 4  # two files, the two folders inside, and the parent folder after the rename
