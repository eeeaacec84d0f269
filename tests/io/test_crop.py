"""CroppedSource: a window of a source read as an image of its own."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gigaseg.geometry import Window
from gigaseg.io.crop import CroppedSource
from gigaseg.io.sources import open_image


@pytest.fixture
def tiled_tiff(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return path, image


def test_reads_are_the_parents_window_shifted(tiled_tiff):
    path, image = tiled_tiff
    parent = open_image(path)
    crop = CroppedSource(parent, Window(40, 30, 200, 150))
    assert crop.shape == (200, 150, 3) and crop.dtype == np.uint8 and crop.name == "scene"
    np.testing.assert_array_equal(crop.read(), image[40:240, 30:180])
    np.testing.assert_array_equal(crop.read(Window(10, 20, 30, 40)), image[50:80, 50:90])
    # a thumbnail of the crop is the parent's window resampled (area averaging)
    np.testing.assert_array_equal(crop.read(out_size=(50, 30)), parent.read(Window(40, 30, 200, 150), (50, 30)))
    np.testing.assert_array_equal(crop.thumbnail(40), parent.read(Window(40, 30, 200, 150), (40, 30)))


def test_windows_outside_the_crop_or_the_parent_are_refused(tiled_tiff):
    path, _ = tiled_tiff
    parent = open_image(path)
    crop = CroppedSource(parent, Window(0, 0, 100, 100))
    with pytest.raises(ValueError, match="reaches outside the 100x100 image"):
        crop.read(Window(50, 50, 60, 10))
    with pytest.raises(ValueError, match="reaches outside"):
        CroppedSource(parent, Window(250, 0, 100, 10))
