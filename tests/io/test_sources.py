"""open_image dispatch and ArraySource."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigaseg.errors import ImageReadError
from gigaseg.geometry import Window
from gigaseg.io.array import ArraySource
from gigaseg.io.pillow import PillowSource
from gigaseg.io.sources import open_image
from gigaseg.io.tiff import TiffSource


@pytest.mark.parametrize("name", ["a.tif", "a.tiff", "a.TIF", "a.btf", "a.ome.tif", "a.ome.tiff"])
def test_tiff_suffixes(tmp_path, name):
    tifffile.imwrite(tmp_path / name, np.zeros((8, 8), np.uint8))
    with open_image(tmp_path / name) as src:
        assert isinstance(src, TiffSource)
        assert src.name == "a"


@pytest.mark.parametrize("name,fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.jpeg", "JPEG")])
def test_pillow_suffixes(tmp_path, name, fmt):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, format=fmt)
    with open_image(str(tmp_path / name)) as src:
        assert isinstance(src, PillowSource)


def test_content_decides_over_suffix(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "really_png.tif", format="PNG")
    with open_image(tmp_path / "really_png.tif") as src:
        assert isinstance(src, PillowSource)
    tifffile.imwrite(tmp_path / "really_tiff.png", np.zeros((8, 8), np.uint8), photometric="minisblack")
    with open_image(tmp_path / "really_tiff.png") as src:
        assert isinstance(src, TiffSource)


def test_other_pillow_formats(tmp_path):
    Image.fromarray(np.full((8, 9, 3), 7, np.uint8)).save(tmp_path / "a.bmp")
    with open_image(tmp_path / "a.bmp") as src:
        assert src.shape == (8, 9, 3) and (src.read() == 7).all()


def test_errors_name_the_file(tmp_path):
    for path, match in [
        (tmp_path / "missing.png", "file not found"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(ImageReadError, match=match) as err:
            open_image(path)
        assert str(path) in str(err.value)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        open_image(empty)
    junk = tmp_path / "junk.xyz"
    junk.write_bytes(b"\x00\x01\x02" * 50)
    with pytest.raises(ImageReadError) as err:
        open_image(junk)
    assert str(junk) in str(err.value)


def test_source_passes_through():
    src = ArraySource(np.zeros((4, 4)))
    assert open_image(src) is src
    with pytest.raises(TypeError):
        open_image(42)


def test_array_source_wraps_without_copy():
    a = np.arange(5 * 6 * 3, dtype=np.uint16).reshape(5, 6, 3)
    src = open_image(a)
    assert isinstance(src, ArraySource)
    assert np.shares_memory(src.array, a)
    assert src.shape == (5, 6, 3) and src.dtype == np.uint16 and src.path is None and src.name == "array"
    window = Window(1, 2, 3, 4)
    out = src.read(window)
    np.testing.assert_array_equal(out, a[window.slices])
    assert not np.shares_memory(out, a)


def test_array_source_2d_is_one_channel():
    a = np.arange(20, dtype=np.float32).reshape(4, 5)
    src = open_image(a)
    assert src.shape == (4, 5, 1)
    assert np.shares_memory(src.array, a)
    np.testing.assert_array_equal(src.read()[:, :, 0], a)


def test_array_source_resampling_and_thumbnail():
    a = np.random.default_rng(0).integers(0, 5, (40, 60), dtype=np.uint8)
    src = open_image(a)
    thumb = src.thumbnail(30, resample="nearest")
    assert thumb.shape == (20, 30, 1) and set(np.unique(thumb)) <= set(np.unique(a))
    area = src.read(Window(0, 0, 40, 60), out_size=(20, 30))
    expected = a.astype(float).reshape(20, 2, 30, 2).mean(axis=(1, 3))
    assert np.abs(area[:, :, 0] - expected).max() <= 0.5


def test_array_source_rejects_bad_input():
    with pytest.raises(ValueError):
        ArraySource(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError):
        ArraySource(np.zeros(5))
    src = ArraySource(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="outside"):
        src.read(Window(5, 5, 6, 5))


def test_pathlike(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((3, 3), np.uint8))
    with open_image(Path(tmp_path / "a.tif")) as src:
        assert src.read().sum() == 9
