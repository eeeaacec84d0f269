"""write_tiled_tiff (pull-based streaming BigTIFF) and MaskWriter (push-based, resumable)."""

from __future__ import annotations

import json
import math
import os
import tracemalloc

import numpy as np
import pytest
import tifffile

from gigaseg.errors import GigasegError
from gigaseg.geometry import Window
from gigaseg.io.writers import MaskWriter, downsample2, pyramid_shapes, write_tiled_tiff

GEO_TAGS = [
    (33550, 12, 3, (0.5, 0.5, 0.0)),  # ModelPixelScaleTag
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0)),  # ModelTiepointTag
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),  # GeoKeyDirectory
    (34737, 2, 0, "WGS 84 / UTM zone 33N|"),  # GeoAsciiParams
]


class ArrayRender:
    """A render callback over an in-memory array that records its windows."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.windows: list[Window] = []

    def __call__(self, window: Window) -> np.ndarray:
        self.windows.append(window)
        return self.array[window.slices].copy()


def make_image(height, width, channels, dtype, seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def area_reference(array: np.ndarray) -> np.ndarray:
    """Independent 2x2 mean: float arithmetic, edge replication, round half up."""
    a = array.astype(np.float64)
    if a.ndim == 2:
        a = a[..., None]
    a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
    mean = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4
    out = np.floor(mean + 0.5).astype(array.dtype)
    return out[..., 0] if array.ndim == 2 else out


def levels_of(path):
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def labels_pattern(height, width, num_classes=7):
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    return ((rows // 37 + cols // 53 + (rows * cols) % 5) % num_classes).astype(np.uint8)


# --------------------------------------------------------------------------- write_tiled_tiff


@pytest.mark.parametrize(
    "channels, dtype",
    [(1, np.uint8), (3, np.uint8), (4, np.uint16)],
    ids=["gray-u8", "rgb-u8", "4ch-u16"],
)
def test_roundtrip_is_identical_tiled_and_compressed(tmp_path, channels, dtype):
    image = make_image(300, 437, channels, dtype)
    render = ArrayRender(image)
    out = write_tiled_tiff(tmp_path / "img.tif", 300, 437, channels, dtype, render, tile=64)

    assert out == tmp_path / "img.tif"
    np.testing.assert_array_equal(tifffile.imread(out), image)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.dtype == np.dtype(dtype)
        assert len(tif.series[0].levels) == 1
        if channels == 3:
            assert page.photometric == tifffile.PHOTOMETRIC.RGB
    # one render call per band of `tile` rows, full width, row-major
    assert render.windows == [Window(top, 0, min(64, 300 - top), 437) for top in range(0, 300, 64)]
    assert os.listdir(tmp_path) == ["img.tif"]


def test_render_width_renders_column_chunks_in_row_major_order(tmp_path):
    image = make_image(200, 300, 3, np.uint8, seed=1)
    render = ArrayRender(image)
    out = write_tiled_tiff(tmp_path / "c.tif", 200, 300, 3, np.uint8, render, tile=64, render_width=128)
    np.testing.assert_array_equal(tifffile.imread(out), image)
    expected = [
        Window(top, left, min(64, 200 - top), min(128, 300 - left))
        for top in range(0, 200, 64)
        for left in range(0, 300, 128)
    ]
    assert render.windows == expected


@pytest.mark.parametrize("name, code", [("zstd", 50000), ("none", 1), ("lzw", 5)])
def test_other_compressions(tmp_path, name, code):
    image = make_image(100, 90, 1, np.uint8, seed=2)
    out = write_tiled_tiff(tmp_path / "z.tif", 100, 90, 1, np.uint8, ArrayRender(image), tile=32, compression=name)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == code
        np.testing.assert_array_equal(tif.asarray(), image)


def test_pyramid_area_levels_shapes_and_content(tmp_path):
    image = make_image(300, 437, 3, np.uint8, seed=3)
    render = ArrayRender(image)
    out = write_tiled_tiff(tmp_path / "p.tif", 300, 437, 3, np.uint8, render, tile=64, pyramid_levels=5)

    levels = levels_of(out)
    # 300x437 -> 150x219 -> 75x110 -> (38x55: longer side < tile, not written)
    assert [lv.shape for lv in levels] == [(300, 437, 3), (150, 219, 3), (75, 110, 3)]
    np.testing.assert_array_equal(levels[0], image)
    np.testing.assert_array_equal(levels[1], area_reference(image))
    np.testing.assert_array_equal(levels[2], area_reference(levels[1]))
    # the scene was rendered once: one call per level-0 band
    assert len(render.windows) == math.ceil(300 / 64)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages[0].subifds) == 2
        for level in tif.series[0].levels[1:]:
            page = level.pages[0]
            assert page.subfiletype == 1
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert os.listdir(tmp_path) == ["p.tif"]  # the pyramid's scratch files are gone


def test_pyramid_area_uint16_and_nearest_labels(tmp_path):
    image = make_image(256, 200, 4, np.uint16, seed=4)
    out = write_tiled_tiff(tmp_path / "u16.tif", 256, 200, 4, np.uint16, ArrayRender(image), tile=32, pyramid_levels=2)
    levels = levels_of(out)
    assert [lv.shape for lv in levels] == [(256, 200, 4), (128, 100, 4), (64, 50, 4)]
    np.testing.assert_array_equal(levels[1], area_reference(image))
    np.testing.assert_array_equal(levels[2], area_reference(levels[1]))

    labels = labels_pattern(250, 333)
    out = write_tiled_tiff(
        tmp_path / "lab.tif",
        250,
        333,
        1,
        np.uint8,
        ArrayRender(labels),
        tile=32,
        pyramid_levels=10,
        pyramid_resample="nearest",
    )
    levels = levels_of(out)
    assert [lv.shape for lv in levels] == [s for s in pyramid_shapes(250, 333, 32, 10)]
    assert len(levels) == 4  # 333 -> 167 -> 84 -> 42 -> (21 < 32)
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, labels[:: 2**k, :: 2**k])


def test_pyramid_levels_caps_the_count(tmp_path):
    image = make_image(256, 256, 1, np.uint8)
    out = write_tiled_tiff(tmp_path / "one.tif", 256, 256, 1, np.uint8, ArrayRender(image), tile=32, pyramid_levels=1)
    assert [lv.shape for lv in levels_of(out)] == [(256, 256), (128, 128)]


def test_downsample2_rounds_half_up_and_replicates_edges():
    block = np.array([[[0], [1], [10]], [[1], [1], [20]], [[7], [8], [255]]], dtype=np.uint8)
    out = downsample2(block, "area")
    # (0+1+1+1)/4 = 0.75 -> 1; (10+10+20+20)/4 = 15; (7+8+7+8)/4 = 7.5 -> 8; 255
    assert out[..., 0].tolist() == [[1, 15], [8, 255]]
    assert downsample2(block, "nearest")[..., 0].tolist() == [[0, 10], [7, 255]]


def test_colormap_is_written_as_palette(tmp_path):
    palette = np.array([[255, 0, 0], [0, 128, 0], [0, 0, 255], [12, 34, 56]], dtype=np.uint8)
    labels = labels_pattern(100, 120, num_classes=4)
    out = write_tiled_tiff(tmp_path / "m.tif", 100, 120, 1, np.uint8, ArrayRender(labels), tile=32, colormap=palette)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        colormap = page.colormap
        assert colormap.shape == (3, 256)
        np.testing.assert_array_equal(colormap[:, :4], palette.T.astype(np.uint16) * 257)
        assert not colormap[:, 4:].any()
        np.testing.assert_array_equal(page.asarray(), labels)  # indices, not colours


def test_colormap_needs_single_channel_uint8(tmp_path):
    with pytest.raises(ValueError, match="colormap"):
        write_tiled_tiff(tmp_path / "x.tif", 10, 10, 3, np.uint8, lambda w: None, tile=16, colormap=[[0, 0, 0]])


def test_geo_tags_and_description_read_back(tmp_path):
    image = make_image(64, 80, 3, np.uint8)
    out = write_tiled_tiff(
        tmp_path / "geo.tif",
        64,
        80,
        3,
        np.uint8,
        ArrayRender(image),
        tile=32,
        geo_tags=GEO_TAGS,
        description='{"note": "hello"}',
        pyramid_levels=1,
    )
    with tifffile.TiffFile(out) as tif:
        tags = tif.pages[0].tags
        assert tags[33550].value == (0.5, 0.5, 0.0)
        assert tags[33922].value == (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0)
        assert tags[34735].value == GEO_TAGS[2][3]
        assert tags[34737].value == "WGS 84 / UTM zone 33N|"
        assert tif.pages[0].description == '{"note": "hello"}'
        assert tif.is_geotiff


def test_error_in_render_leaves_no_file(tmp_path):
    image = make_image(300, 200, 3, np.uint8)

    def render(window):
        if window.top >= 128:
            raise RuntimeError("renderer failed")
        return image[window.slices]

    with pytest.raises(RuntimeError, match="renderer failed"):
        write_tiled_tiff(tmp_path / "bad.tif", 300, 200, 3, np.uint8, render, tile=64, pyramid_levels=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "bad",
    [lambda w: np.zeros((w.height, w.width + 1, 3), np.uint8), lambda w: np.zeros((w.height, w.width, 3), np.float32)],
    ids=["shape", "dtype"],
)
def test_wrong_render_output_is_an_error_and_leaves_no_file(tmp_path, bad):
    with pytest.raises(ValueError, match=r"render\(Window"):
        write_tiled_tiff(tmp_path / "bad.tif", 100, 100, 3, np.uint8, bad, tile=32)
    assert os.listdir(tmp_path) == []


def test_progress_counts_bands_of_all_levels(tmp_path):
    calls = []
    image = make_image(128, 128, 1, np.uint8)
    write_tiled_tiff(
        tmp_path / "p.tif",
        128,
        128,
        1,
        np.uint8,
        ArrayRender(image),
        tile=32,
        pyramid_levels=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 6) for i in range(1, 7)]  # 4 bands at level 0 + 2 at level 1


# --------------------------------------------------------------------------- MaskWriter

H, W, T = 700, 450, 128
PALETTE = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [9, 9, 9]], np.uint8
)
CLASSES = ["a", "b", "c", "d", "e", "f", "g"]


def mask_writer(path, **kw):
    return MaskWriter(path, H, W, tile=T, palette=PALETTE, class_names=CLASSES, geo_tags=GEO_TAGS, **kw)


def test_maskwriter_out_of_order_matches_in_order(tmp_path):
    labels = labels_pattern(H, W)
    with mask_writer(tmp_path / "in_order.tif") as writer:
        assert writer.band_height == T
        assert writer.band_tops == list(range(0, H, T))
        for top in writer.band_tops:
            writer.write_band(top, labels[top : top + T])
    with mask_writer(tmp_path / "shuffled.tif") as writer:
        order = np.random.default_rng(0).permutation(writer.band_tops)
        for top in order:
            writer.write_band(int(top), labels[top : top + T])
            assert writer.is_done(int(top))
        assert writer.done_bands == writer.band_tops

    first, second = levels_of(tmp_path / "in_order.tif"), levels_of(tmp_path / "shuffled.tif")
    assert [lv.shape for lv in first] == [(700, 450), (350, 225), (175, 113)]
    for k, (a, b) in enumerate(zip(first, second)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, labels[:: 2**k, :: 2**k])  # nearest pyramid
    with tifffile.TiffFile(tmp_path / "shuffled.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == T
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        np.testing.assert_array_equal(page.colormap[:, :7] // 257, PALETTE.T)
        assert json.loads(page.description) == {"classes": CLASSES}
        assert page.tags[33922].value == GEO_TAGS[1][3]
    assert sorted(os.listdir(tmp_path)) == ["in_order.tif", "shuffled.tif"]  # scratch removed


def test_maskwriter_interrupted_then_resumed_matches_uninterrupted(tmp_path):
    labels = labels_pattern(H, W)
    with mask_writer(tmp_path / "reference.tif") as writer:
        for top in writer.band_tops:
            writer.write_band(top, labels[top : top + T])

    target = tmp_path / "mask.tif"
    first_batch = [512, 0, 256]
    with pytest.raises(KeyboardInterrupt):
        with mask_writer(target) as writer:
            for top in first_batch:
                writer.write_band(top, labels[top : top + T])
            raise KeyboardInterrupt
    assert not target.exists()
    scratch = tmp_path / ".mask.tif.scratch"
    assert scratch.is_dir()
    assert not (tmp_path / ".mask.tif.partial").exists()

    with mask_writer(target, resume=True) as writer:
        assert writer.done_bands == sorted(first_batch)
        assert writer.is_done(256) and not writer.is_done(128)
        for top in writer.band_tops:
            if not writer.is_done(top):
                writer.write_band(top, labels[top : top + T])
    assert not scratch.exists()
    for a, b in zip(levels_of(tmp_path / "reference.tif"), levels_of(target)):
        np.testing.assert_array_equal(a, b)


def test_maskwriter_without_resume_starts_afresh(tmp_path):
    labels = labels_pattern(H, W)
    with pytest.raises(RuntimeError):
        with mask_writer(tmp_path / "m.tif") as writer:
            writer.write_band(0, labels[:T])
            raise RuntimeError
    writer = mask_writer(tmp_path / "m.tif", resume=False)
    assert writer.done_bands == []
    writer.discard()
    assert os.listdir(tmp_path) == []


def test_maskwriter_incompatible_resume_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError):
        with MaskWriter(tmp_path / "m.tif", 700, 450, tile=128) as writer:
            writer.write_band(0, np.zeros((128, 450), np.uint8))
            raise RuntimeError
    with pytest.raises(GigasegError, match=r"cannot resume.*700x450.*128-row.*not 700x400"):
        MaskWriter(tmp_path / "m.tif", 700, 400, tile=128, resume=True)
    with pytest.raises(GigasegError, match=r"128-row bands, not 700x450 in 64-row"):
        MaskWriter(tmp_path / "m.tif", 700, 450, tile=64, resume=True)
    # the compatible writer still resumes
    writer = MaskWriter(tmp_path / "m.tif", 700, 450, tile=128, resume=True)
    assert writer.done_bands == [0]
    writer.abort()


def test_maskwriter_resumes_only_bands_of_the_same_producer(tmp_path):
    with pytest.raises(RuntimeError):
        with MaskWriter(tmp_path / "m.tif", 300, 200, tile=128, producer="model-a") as writer:
            writer.write_band(0, np.ones((128, 200), np.uint8))
            raise RuntimeError
    with pytest.raises(
        GigasegError, match=r"m.tif: cannot resume.*made from another input image, by another model.*--restart"
    ):
        MaskWriter(tmp_path / "m.tif", 300, 200, tile=128, resume=True, producer="model-b")
    writer = MaskWriter(tmp_path / "m.tif", 300, 200, tile=128, resume=True, producer="model-a")
    assert writer.done_bands == [0]
    writer.abort()


def test_maskwriter_missing_bands_are_listed(tmp_path):
    labels = labels_pattern(H, W)
    writer = mask_writer(tmp_path / "m.tif")
    for top in (0, 128, 512):
        writer.write_band(top, labels[top : top + T])
    assert writer.missing_bands == [256, 384, 640]
    with pytest.raises(GigasegError, match=r"3 of 6 bands missing: rows 256-383, 384-511, 640-699"):
        writer.close()
    assert not (tmp_path / "m.tif").exists()
    # the writer is still usable: finish and close
    for top in writer.missing_bands:
        writer.write_band(top, labels[top : top + T])
    writer.close()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), labels)

    with pytest.raises(GigasegError, match="rows 128-255"):
        with mask_writer(tmp_path / "n.tif") as writer:
            writer.write_band(0, labels[:T])
    assert not (tmp_path / "n.tif").exists()
    assert (tmp_path / ".n.tif.scratch").is_dir()


@pytest.mark.parametrize(
    "palette, message",
    [
        ([[300, 0, 0]], r"integers 0\.\.255, got 300 in entry 0 \(\[300, 0, 0\]\)"),
        ([[0, 0, 0], [1, -1, 2]], r"integers 0\.\.255, got -1 in entry 1"),
        ([[0.5, 0, 0]], r"integers 0\.\.255, got 0\.5 in entry 0"),
        ([[0, 0]], r"\(N, 3\) array with 1 <= N <= 256, got shape \(1, 2\)"),
        (np.zeros((257, 3), np.uint8), r"got shape \(257, 3\)"),
    ],
)
def test_maskwriter_rejects_palette_colours_a_colormap_would_wrap(tmp_path, palette, message):
    # 300 used to be stored as 44 (300 % 256) and -1 as 255 in the TIFF ColorMap
    with pytest.raises(ValueError, match=message):
        MaskWriter(tmp_path / "m.tif", H, W, tile=T, palette=palette)
    assert not (tmp_path / ".m.tif.scratch").exists()


def test_maskwriter_checks_bands(tmp_path):
    writer = mask_writer(tmp_path / "m.tif")
    with pytest.raises(ValueError, match="multiple of 128"):
        writer.write_band(100, np.zeros((128, W), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(60, 450\)"):
        writer.write_band(640, np.zeros((128, W), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        writer.write_band(0, np.full((128, W), 300, np.int64))
    writer.write_band(640, np.full((60, W), 3, np.int64))  # integer labels in range are fine
    assert writer.done_bands == [640]
    writer.discard()


def test_maskwriter_memory_stays_small_for_8192_square(tmp_path):
    size, tile = 8192, 512
    col_part = (np.arange(size) // 131 % 7).astype(np.uint8)[None, :]
    tracemalloc.start()
    try:
        with MaskWriter(tmp_path / "big.tif", size, size, tile=tile, palette=PALETTE) as writer:
            for top in writer.band_tops:
                row_part = ((np.arange(tile) + top) // 97 % 7).astype(np.uint8)[:, None]
                band = row_part + col_part  # uint8, 4 MiB
                band %= 7
                writer.write_band(top, band)
                del band
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one 4 MiB band plus codec buffers (measured ~13 MiB); the whole mask would be 64 MiB
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(8192 >> k, 8192 >> k) for k in range(5)]
        corner = levels[0].pages[0].asarray()[-3:, -3:]
    expected = ((np.arange(8189, 8192)[:, None]) // 97 + np.arange(8189, 8192)[None, :] // 131) % 7
    np.testing.assert_array_equal(corner, expected)


def test_maskwriter_abort_keeps_scratch_and_refuses_to_finish(tmp_path):
    writer = mask_writer(tmp_path / "m.tif")
    writer.write_band(0, np.ones((T, W), np.uint8))
    writer.abort()
    with pytest.raises(ValueError, match="aborted"):
        writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write_band(128, np.ones((T, W), np.uint8))
    assert not (tmp_path / "m.tif").exists()
    (tmp_path / ".m.tif.scratch" / "labels.raw").unlink()
    with pytest.raises(GigasegError, match="labels.raw is missing"):
        mask_writer(tmp_path / "m.tif", resume=True)
    # resume=True without any scratch area simply starts
    fresh = mask_writer(tmp_path / "other.tif", resume=True)
    assert fresh.done_bands == []
    fresh.discard()
