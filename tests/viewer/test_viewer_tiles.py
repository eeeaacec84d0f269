"""Deep Zoom tiles against the source's own pixels, the tile cache, and exact class counts."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigaseg.errors import ImageReadError
from gigaseg.geometry import Window
from gigaseg.io.sources import open_image
from gigaseg.io.writers import MaskWriter
from gigaseg.viewer.tiles import ClassCounter, DeepZoomGeometry, ImageLayer, TileCache, open_mask

H, W = 1000, 1300


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def block_mean(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Mean of every whole ``scale x scale`` block (the partial blocks at the edges dropped)."""
    h, w = pixels.shape[0] // scale, pixels.shape[1] // scale
    blocks = pixels[: h * scale, : w * scale].astype(np.float64).reshape(h, scale, w, scale, -1)
    return blocks.mean(axis=(1, 3))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A 1000 x 1300 RGB TIFF without a pyramid: 8-px blocks of random colour plus fine noise."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (H // 8 + 1, W // 8 + 1, 3))
    pixels = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:H, :W]
    pixels = np.clip(pixels + rng.integers(-4, 5, (H, W, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("rgb") / "image.tif"
    tifffile.imwrite(path, pixels, tile=(128, 128), photometric="rgb")
    return path, pixels


@pytest.fixture(scope="module")
def mask(tmp_path_factory):
    """A 1000 x 1300 mask in 8-px blocks of classes 0, 1, 3, 9 and 255, written by MaskWriter with 4 names."""
    rng = np.random.default_rng(1)
    coarse = rng.choice(np.array([0, 1, 3, 9, 255], np.uint8), (H // 8 + 1, W // 8 + 1), p=[0.4, 0.3, 0.2, 0.05, 0.05])
    labels = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:H, :W]
    path = tmp_path_factory.mktemp("mask") / "mask.tif"
    palette = [(10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200)]
    names = ["water", "forest", "cropland", "urban"]
    with MaskWriter(path, H, W, palette=palette, class_names=names, tile=32) as writer:
        for top in writer.band_tops:
            writer.write_band(top, labels[writer.band_window(top).slices])
    return path, labels, palette, names


# -- geometry --------------------------------------------------------------------------------------


def test_levels_and_tiles_follow_openseadragons_deep_zoom_rules():
    geometry = DeepZoomGeometry(H, W, 256)
    assert geometry.max_level == 11  # 2**11 = 2048 is the first power of two >= 1300
    for level in range(12):
        # OpenSeadragon's DziTileSource: ceil(size * 2**(level - max_level))
        assert geometry.level_size(level) == (math.ceil(H / 2 ** (11 - level)), math.ceil(W / 2 ** (11 - level)))
    assert geometry.level_size(0) == (1, 1)
    assert geometry.tile_counts(11) == (4, 6)
    assert geometry.tile_window(11, 5, 3) == Window(768, 1280, 232, 20)
    assert geometry.tile_window(10, 0, 0) == Window(0, 0, 256, 256)
    assert geometry.has_tile(11, 5, 3)
    for level, col, row in ((11, 6, 0), (11, 0, 4), (12, 0, 0), (-1, 0, 0), (0, 1, 0)):
        assert not geometry.has_tile(level, col, row)
    dzi = geometry.dzi("png")
    assert 'TileSize="256"' in dzi and 'Overlap="0"' in dzi and 'Format="png"' in dzi
    assert '<Size Width="1300" Height="1000"/>' in dzi
    assert DeepZoomGeometry(8192, 8192, 512).max_level == 13
    assert DeepZoomGeometry(1, 1, 512).max_level == 0


# -- image tiles ---------------------------------------------------------------------------------------


def test_full_resolution_png_tiles_are_the_source_pixels(rgb):
    path, pixels = rgb
    layer = ImageLayer(open_image(path), tile_size=256, tile_format="png")
    for col, row in ((0, 0), (2, 1), (5, 3)):  # (5, 3) is the 20 x 232 corner tile
        window = layer.geometry.tile_window(11, col, row)
        np.testing.assert_array_equal(decode(layer.tile(11, col, row)), pixels[window.slices])


@pytest.mark.parametrize("overview_side", [4096, 300], ids=["from the file", "from the overview"])
def test_reduced_tiles_are_block_means_of_the_source(rgb, overview_side):
    path, pixels = rgb
    layer = ImageLayer(open_image(path), tile_size=256, tile_format="png", overview_side=overview_side)
    assert layer.overview_level == (11 if overview_side == 4096 else 8)  # level 8 is 125 x 163, level 9 250 x 325
    for level in (10, 9, 8, 7, 5):
        scale = 2 ** (11 - level)
        expected = block_mean(pixels, scale)
        for col, row in ((0, 0), (1, 0), (0, 1)):
            if not layer.geometry.has_tile(level, col, row):
                continue
            window = layer.geometry.tile_window(level, col, row)
            tile = decode(layer.tile(level, col, row)).astype(np.float64)
            assert tile.shape == (*window.shape, 3)
            whole = expected[window.slices]  # the tile's pixels whose blocks lie inside the image
            diff = np.abs(tile[: whole.shape[0], : whole.shape[1]] - whole)
            assert diff.max() <= 1.0, (level, col, row, diff.max())


def test_the_overview_is_bounded_and_read_once(rgb):
    path, _ = rgb
    layer = ImageLayer(open_image(path), tile_size=256, tile_format="png", overview_side=300)
    reads = []
    original = layer.source.read
    layer.source.read = lambda *a, **k: reads.append(a) or original(*a, **k)
    layer.tile(8, 0, 0)
    # level 8's one tile, in two parts: 162 whole columns of 8 px and the last 4-px column
    assert [read[0] for read in reads] == [Window(0, 0, 1000, 1296), Window(0, 1296, 1000, 4)]
    assert layer.overview().array.shape == (125, 163, 3)
    for level in range(8):
        layer.tile(level, 0, 0)
    assert len(reads) == 2  # the levels below are cut from the overview
    layer.tile(9, 0, 0)
    assert len(reads) == 3  # level 9 is read from the file


def test_jpeg_tiles_are_close_to_the_source(rgb):
    path, pixels = rgb
    layer = ImageLayer(open_image(path), tile_size=256)
    assert layer.tile_format == "jpeg" and layer.content_type == "image/jpeg"
    data = layer.tile(11, 1, 1)
    assert data[:2] == b"\xff\xd8"
    tile = decode(data).astype(np.int16)
    assert np.abs(tile - pixels[256:512, 256:512]).mean() < 4


def test_uint16_images_are_stretched_between_the_overviews_percentiles(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(1000, 3000, (300, 400)).astype(np.uint16)
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, pixels, tile=(64, 64))
    layer = ImageLayer(open_image(path), tile_size=256, tile_format="png")
    low, high = layer.display_range()
    assert low == pytest.approx(np.percentile(pixels, 2), abs=1) and high == pytest.approx(np.percentile(pixels, 98))
    tile = decode(layer.tile(layer.geometry.max_level, 0, 0))
    expected = np.clip(np.floor((pixels[:256, :256] - low) * 255 / (high - low) + 0.5), 0, 255)
    assert tile.shape == (256, 256, 3)
    for channel in range(3):  # grey shown as grey
        np.testing.assert_array_equal(tile[..., channel], expected)


# -- mask tiles --------------------------------------------------------------------------------------


def test_mask_tiles_are_palette_pngs_of_the_labels(mask):
    path, labels, palette, names = mask
    layer = open_mask(path, tile_size=256)
    assert layer.class_names == names
    for level, col, row in ((11, 0, 0), (11, 5, 3), (10, 1, 1), (9, 0, 0), (8, 0, 0)):
        scale = 2 ** (11 - level)
        window = layer.geometry.tile_window(level, col, row)
        image = Image.open(io.BytesIO(layer.tile(level, col, row)))
        assert image.mode == "P"
        indices = np.asarray(image)
        # labels are constant over 8-px blocks, so any nearest sample of a block is its label
        full = Window.from_bounds(window.top * scale, window.left * scale, window.bottom * scale, window.right * scale)
        expected = labels[full.top : min(H, full.bottom) : scale, full.left : min(W, full.right) : scale]
        np.testing.assert_array_equal(indices, expected, err_msg=str((level, col, row)))
        colours = np.array(image.getpalette()[: 3 * 256]).reshape(256, 3)
        np.testing.assert_array_equal(colours[:4], palette)
        # label 255 (no class) transparent, every class opaque: Pillow reads a tRNS chunk whose only
        # transparent entry is 255 as that index
        assert image.info["transparency"] == 255


def test_mask_layer_names_colours_and_single_pixels(mask):
    path, labels, palette, names = mask
    layer = open_mask(path)
    assert [layer.class_name(i) for i in (0, 3, 9, 255)] == ["water", "urban", "class 9", "no class"]
    assert layer.color(1) == "#c80000"
    for y, x in ((0, 0), (517, 1299), (999, 4)):
        assert layer.label_at(x, y) == labels[y, x]
    with pytest.raises(ValueError):
        layer.label_at(W, 0)


def test_rgb_and_16_bit_masks_are_refused_naming_the_file(rgb, tmp_path):
    with pytest.raises(ImageReadError, match=r"image\.tif: has 3 channels; a label mask has one"):
        open_mask(rgb[0])
    path = tmp_path / "labels16.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    with pytest.raises(ImageReadError, match=r"labels16\.tif: holds uint16 values"):
        open_mask(path)


# -- cache and counts -------------------------------------------------------------------------------


def test_tile_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = TileCache(100)
    cache.put("a", b"x" * 40)
    cache.put("b", b"y" * 40)
    assert cache.get("a") == b"x" * 40  # a is now the most recent
    cache.put("c", b"z" * 40)  # 120 bytes: the least recently used (b) goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.size_bytes == 80 and len(cache) == 2
    cache.put("huge", b"h" * 101)  # larger than the cache: not kept, nothing dropped
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("a", b"x" * 10)  # replaced, not counted twice
    assert cache.size_bytes == 50


def test_class_counts_are_exact_over_bands_that_do_not_divide_the_mask(mask):
    path, labels, _, names = mask
    counter = ClassCounter(open_mask(path), band_bytes=1)  # one 32-row band of file tiles at a time
    assert counter.start().wait(60) and counter.error is None
    assert counter.rows_done == H
    hand = np.bincount(labels.ravel(), minlength=256)
    np.testing.assert_array_equal(counter.counts, hand)
    status = counter.status()
    assert status["done"] and status["progress"] == 1.0
    listed = {c["id"]: c for c in status["classes"]}
    # the four named classes (cropland, id 2, occurs nowhere: 0 pixels) and every other label that occurs
    assert sorted(listed) == [0, 1, 2, 3, 9, 255]
    assert [listed[i]["name"] for i in (0, 1, 2, 3, 9, 255)] == [*names, "class 9", "no class"]
    assert listed[2]["pixels"] == 0
    for label, entry in listed.items():
        assert entry["pixels"] == hand[label]
        assert entry["fraction"] == pytest.approx(hand[label] / (H * W))


def test_a_count_that_fails_reports_the_error(mask, tmp_path):
    path = tmp_path / "mask.tif"
    path.write_bytes(mask[0].read_bytes())
    layer = open_mask(path)
    with open(path, "r+b") as file:  # the tiles' bytes go: decoding fails
        file.truncate(path.stat().st_size // 2)
    counter = ClassCounter(layer).start()
    assert counter.wait(60)
    assert counter.counts is None and "mask.tif" in counter.error
    assert counter.status()["done"] is False and counter.status()["classes"] == []
