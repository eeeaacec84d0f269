"""PillowSource: PNG/JPEG modes, palettes, lazy decoding, the memory budget, errors."""

import numpy as np
import pytest
from PIL import Image

from gigaseg.errors import ImageReadError
from gigaseg.geometry import Window
from gigaseg.io.pillow import PillowSource
from gigaseg.io.sources import open_image

RNG = np.random.default_rng(0)


def save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.mark.parametrize("channels,mode", [(None, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_png_modes_read_exactly(tmp_path, channels, mode):
    shape = (61, 83) if channels is None else (61, 83, channels)
    a = RNG.integers(0, 256, shape, dtype=np.uint8)
    path = save(tmp_path / "a.png", a)
    with open_image(path) as src:
        assert isinstance(src, PillowSource)
        assert src.mode == mode
        want = a if a.ndim == 3 else a[:, :, None]
        assert src.shape == want.shape and src.dtype == np.uint8
        np.testing.assert_array_equal(src.read(), want)
        window = Window(10, 20, 30, 40)
        np.testing.assert_array_equal(src.read(window), want[window.slices])
        assert src.palette is None


def test_png_16_bit_grey(tmp_path):
    a = RNG.integers(0, 65536, (40, 50), dtype=np.uint16)
    path = save(tmp_path / "g16.png", a)
    with open_image(path) as src:
        assert src.mode.startswith("I;16") and src.dtype == np.uint16 and src.channels == 1
        np.testing.assert_array_equal(src.read()[:, :, 0], a)


def test_palette_png_returns_indices_and_palette(tmp_path):
    indices = RNG.integers(0, 4, (30, 40), dtype=np.uint8)
    image = Image.frombytes("P", (40, 30), indices.tobytes())
    colours = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]
    image.putpalette(colours)
    image.save(tmp_path / "mask.png")
    with open_image(tmp_path / "mask.png", palette="indices") as src:
        assert src.mode == "P" and src.channels == 1
        np.testing.assert_array_equal(src.read()[:, :, 0], indices)
        palette = src.palette
        assert palette.dtype == np.uint8 and palette.shape[1] == 3
        np.testing.assert_array_equal(palette[:4], np.array(colours).reshape(4, 3))
        small = src.read(None, out_size=(7, 9), resample="nearest")
        assert set(np.unique(small)) <= set(np.unique(indices))
        assert set(np.unique(src.thumbnail(13, resample="nearest"))) <= {0, 1, 2, 3}


def test_bilevel_png_is_zero_one(tmp_path):
    bits = RNG.integers(0, 2, (20, 24)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    with open_image(tmp_path / "b.png") as src:
        got = src.read()
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got[:, :, 0], bits.astype(np.uint8))


def test_jpeg_is_approximately_the_written_image(tmp_path):
    y, x = np.mgrid[0:120, 0:160]
    a = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    path = save(tmp_path / "photo.jpg", a, quality=95)
    with open_image(path) as src:
        assert src.shape == (120, 160, 3)
        got = src.read(Window(20, 30, 50, 60)).astype(int)
        assert np.abs(got - a[20:70, 30:90]).mean() < 2.0
        assert src.name == "photo"


def test_decodes_lazily_once(tmp_path):
    path = save(tmp_path / "a.png", RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    src = open_image(path)
    assert not src.is_decoded
    first = src.read(Window(0, 0, 4, 4))
    assert src.is_decoded
    array = src._array
    src.read(Window(4, 4, 4, 4))
    assert src._array is array
    first[:] = 0  # reads are copies
    assert src.read(Window(0, 0, 4, 4)).any()
    src.close()


def test_memory_budget_refuses_large_png(tmp_path):
    path = save(tmp_path / "large.png", np.zeros((1000, 1200, 3), np.uint8))
    with pytest.raises(ImageReadError) as err:
        open_image(path, max_memory="1MB")
    message = str(err.value)
    assert str(path) in message
    assert "1000x1200x3" in message and "3.60 MB" in message
    assert "tiled TIFF" in message
    # a budget that fits the decode's peak (not just the 3.6 MB array) is fine
    with open_image(path, max_memory="20MB") as src:
        assert src.read(Window(0, 0, 2, 2)).shape == (2, 2, 3)


def test_truncated_png(tmp_path):
    path = save(tmp_path / "full.png", RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    src = open_image(cut)  # the header is intact
    with pytest.raises(ImageReadError, match="truncated") as err:
        src.read()
    assert str(cut) in str(err.value)


def test_not_a_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"hello, not an image" * 10)
    with pytest.raises(ImageReadError, match="not a PNG") as err:
        open_image(path)
    assert str(path) in str(err.value)


def test_thumbnail_and_resize(tmp_path):
    a = RNG.integers(0, 256, (90, 60, 3), dtype=np.uint8)
    path = save(tmp_path / "a.png", a)
    with open_image(path) as src:
        thumb = src.thumbnail(30)
        assert thumb.shape == (30, 20, 3) and thumb.dtype == np.uint8
        expected = a.astype(float).reshape(30, 3, 20, 3, 3).mean(axis=(1, 3))
        assert np.abs(thumb - expected).max() <= 0.5 + 1e-9
        np.testing.assert_array_equal(src.thumbnail(30), thumb)
        with pytest.raises(ValueError, match="outside"):
            src.read(Window(80, 0, 20, 10))


def test_pickle_reopens(tmp_path):
    import pickle

    a = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    path = save(tmp_path / "a.png", a)
    src = open_image(path)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read()[:, :, 0], a)
    src.close()
    clone.close()
