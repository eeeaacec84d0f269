"""Normalization: defaults, dtype scaling, numpy/torch agreement, serialisation."""

import json

import numpy as np
import pytest
import torch

from gigaseg.errors import ConfigError
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalization


def test_defaults():
    rgb = Normalization.for_image(3, np.uint8)
    assert rgb.mean == IMAGENET_MEAN and rgb.std == IMAGENET_STD and rgb.scale == 255
    rgbn = Normalization.for_image(4, np.uint16)
    assert rgbn.mean == IMAGENET_MEAN + (0.5,) and rgbn.std == IMAGENET_STD + (0.25,) and rgbn.scale == 65535
    grey = Normalization.for_image(1, np.float32)
    assert grey.mean == (0.5,) and grey.std == (0.25,) and grey.scale == 1.0
    assert Normalization.for_source(ArraySource(np.zeros((2, 2, 2), np.uint8))).channels == 2


def test_apply_uint8_matches_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    norm = Normalization.for_image(3, a.dtype)
    out = norm.apply(a)
    assert out.dtype == np.float32 and out.shape == (3, 5, 7)
    expected = ((a / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_apply_uint16_and_float():
    a16 = np.array([[[0], [65535]]], dtype=np.uint16)
    np.testing.assert_allclose(Normalization.for_image(1, np.uint16).apply(a16)[0, 0], [-2.0, 2.0], atol=1e-5)
    af = np.array([[0.5, 1.0]], dtype=np.float32)  # (H, W): one channel, floats pass as they are
    np.testing.assert_allclose(Normalization.for_image(1, np.float32).apply(af)[0, 0], [0.0, 2.0], atol=1e-6)


def test_torch_matches_numpy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (6, 8, 4), dtype=np.uint16)
    norm = Normalization.for_image(4, a.dtype)
    want = norm.apply(a)
    batch = torch.from_numpy(a.astype(np.int32)).permute(2, 0, 1)[None]
    got = norm.apply_torch(batch)
    assert got.dtype == torch.float32 and got.shape == (1, 4, 6, 8)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-5)
    single = norm.apply_torch(batch[0])
    assert single.shape == (4, 6, 8)
    half = norm.apply_torch(batch[0].to(torch.float64))
    assert half.dtype == torch.float64


def test_round_trip_through_json():
    norm = Normalization((0.1, 0.2), (0.3, 0.4), 255)
    data = json.loads(json.dumps(norm.to_dict()))
    assert Normalization.from_dict(data) == norm
    assert data == {"mean": [0.1, 0.2], "std": [0.3, 0.4], "scale": 255.0}


def test_invert_undoes_apply():
    a = np.random.default_rng(2).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    norm = Normalization.for_image(3, np.uint8)
    np.testing.assert_allclose(norm.invert(norm.apply(a)), a, atol=1e-3)


def test_validation():
    with pytest.raises(ConfigError):
        Normalization((0.5,), (0.0,))
    with pytest.raises(ConfigError):
        Normalization((0.5, 0.5), (0.25,))
    with pytest.raises(ConfigError):
        Normalization.from_dict({"mean": [0.5]})
    with pytest.raises(ConfigError):
        Normalization.from_dict({"mean": ["x"], "std": [1]})
    norm = Normalization.for_image(3, np.uint8)
    with pytest.raises(ValueError, match="channel"):
        norm.apply(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="channel"):
        norm.apply_torch(torch.zeros(1, 1, 2, 2))
