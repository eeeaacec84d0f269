"""write_png, overlay (blend values computed by hand) and write_overlay_png."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gigaseg.io.base import ImageSource, thumbnail_size
from gigaseg.io.overlay import overlay, read_mask_preview, resize_nearest, write_overlay_png, write_png
from gigaseg.io.writers import MaskWriter

PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44]], dtype=np.uint8)


class SmallArraySource(ImageSource):
    """Just enough of an ImageSource for these tests (integer-factor area thumbnails)."""

    def __init__(self, array: np.ndarray):
        self.array = array if array.ndim == 3 else array[..., None]

    height = property(lambda self: self.array.shape[0])
    width = property(lambda self: self.array.shape[1])
    channels = property(lambda self: self.array.shape[2])
    dtype = property(lambda self: self.array.dtype)

    def read(self, window=None, out_size=None, resample="area"):
        window = window or self.bounds
        data = self.array[window.slices]
        if out_size is None:
            return data
        assert resample == "nearest"
        return resize_nearest(data, out_size)

    def thumbnail(self, max_side, resample="area"):
        h, w = thumbnail_size(self.height, self.width, max_side)
        fy, fx = self.height // h, self.width // w
        assert (h * fy, w * fx) == (self.height, self.width), "test sizes divide exactly"
        blocks = self.array.reshape(h, fy, w, fx, self.channels).astype(np.float64)
        return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(self.array.dtype)


def test_write_png_roundtrips_gray_rgb_and_16bit(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    for name, array, mode in (("g.png", gray, "L"), ("c.png", rgb, "RGB"), ("d.png", deep, "I;16")):
        out = write_png(tmp_path / name, array)
        with Image.open(out) as image:
            assert image.format == "PNG" and image.mode == mode
            np.testing.assert_array_equal(np.asarray(image), array)
    assert sorted(os.listdir(tmp_path)) == ["c.png", "d.png", "g.png"]  # no partial files left


def test_write_png_rejects_other_arrays(tmp_path):
    with pytest.raises(ValueError, match="write_png"):
        write_png(tmp_path / "f.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="write_png"):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 2), np.uint8))
    assert os.listdir(tmp_path) == []


def test_overlay_blend_values_by_hand():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = (100, 50, 200)
    image[1, 1] = (7, 8, 9)
    labels = np.array([[0, 2], [1, 255]], np.uint8)

    out = overlay(image, labels, PALETTE, alpha=0.5)
    # 0.5*100 + 0.5*31 = 65.5 -> 66; 0.5*50 + 0.5*119 = 84.5 -> 85; 0.5*200 + 0.5*180 = 190
    assert out[0, 0].tolist() == [66, 85, 190]
    assert out[0, 1].tolist() == [22, 80, 22]  # half of (44, 160, 44)
    assert out[1, 1].tolist() == [7, 8, 9]  # ignore_index: the image unchanged
    out = overlay(image, labels, PALETTE, alpha=0.25)
    # 0.75*100 + 0.25*31 = 82.75 -> 83; 0.75*50 + 0.25*119 = 67.25 -> 67; 0.75*200 + 0.25*180 = 195
    assert out[0, 0].tolist() == [83, 67, 195]
    np.testing.assert_array_equal(overlay(image, labels, PALETTE, alpha=0.0), image)


def test_overlay_accepts_gray_and_rejects_size_mismatch():
    gray = np.full((2, 2), 100, np.uint8)
    out = overlay(gray, np.zeros((2, 2), np.uint8), PALETTE, alpha=0.5)
    assert out.shape == (2, 2, 3) and out[0, 0].tolist() == [66, 110, 140]
    with pytest.raises(ValueError, match="differ in size"):
        overlay(gray, np.zeros((3, 2), np.uint8), PALETTE)


def make_scene(height=512, width=768):
    rows = np.arange(height)[:, None, None]
    cols = np.arange(width)[None, :, None]
    image = ((rows * 3 + cols * 5 + np.array([0, 80, 160])) % 256).astype(np.uint8)
    labels = ((rows[..., 0] // 64 + cols[..., 0] // 64) % 3).astype(np.uint8)  # 64-px blocks
    labels[:64, :64] = 255
    return image, labels


def test_write_overlay_png_from_array_mask(tmp_path):
    image, labels = make_scene()
    source = SmallArraySource(image)
    out = write_overlay_png(tmp_path / "o.png", source, labels, PALETTE, max_side=192, alpha=0.4)
    with Image.open(out) as picture:
        assert picture.mode == "RGB" and picture.size == (192, 128)
        got = np.asarray(picture)
    expected = overlay(source.thumbnail(192), resize_nearest(labels, (128, 192)), PALETTE, alpha=0.4)
    np.testing.assert_array_equal(got, expected)
    assert os.listdir(tmp_path) == ["o.png"]


@pytest.mark.parametrize("pyramid", [True, False], ids=["pyramid", "flat"])
def test_write_overlay_png_from_mask_tiff_matches_array_mask(tmp_path, pyramid):
    image, labels = make_scene()
    with MaskWriter(tmp_path / "mask.tif", 512, 768, tile=64, palette=PALETTE, pyramid=pyramid) as writer:
        for top in writer.band_tops:
            writer.write_band(top, labels[top : top + 64])
    source = SmallArraySource(image)
    from_file = write_overlay_png(tmp_path / "file.png", source, tmp_path / "mask.tif", PALETTE, max_side=192)
    from_array = write_overlay_png(tmp_path / "array.png", source, labels, PALETTE, max_side=192)
    with Image.open(from_file) as a, Image.open(from_array) as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the preview itself: nearest samples of the mask, whichever level was read
    preview = read_mask_preview(tmp_path / "mask.tif", (128, 192))
    np.testing.assert_array_equal(preview, resize_nearest(labels, (128, 192)))


def test_write_overlay_png_from_mask_source_and_size_check(tmp_path):
    image, labels = make_scene()
    source = SmallArraySource(image)
    out = write_overlay_png(tmp_path / "s.png", source, SmallArraySource(labels), PALETTE, max_side=192)
    with Image.open(out) as picture:
        assert picture.size == (192, 128)
    with pytest.raises(ValueError, match="differ in size"):
        write_overlay_png(tmp_path / "x.png", source, SmallArraySource(labels[:256]), PALETTE, max_side=192)
    Image.fromarray(labels[:256]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="mask is 256x768, the image is 512x768"):
        write_overlay_png(tmp_path / "x.png", source, tmp_path / "small.png", PALETTE, max_side=192)
    assert not (tmp_path / "x.png").exists()
