"""TiffSource: layouts, pyramids, lazy tile decoding, GeoTIFF tags, errors."""

import os
import pickle
import tracemalloc

import numpy as np
import pytest
import tifffile
from tifffile.zarr import ZarrTiffStore

from gigaseg.errors import ImageReadError
from gigaseg.geometry import Window
from gigaseg.io.resample import resize
from gigaseg.io.sources import open_image
from gigaseg.io.tiff import TiffSource


def windows(h, w):
    """A corner pixel, an interior window, one touching the far corner, and the whole image."""
    return [Window(0, 0, 1, 1), Window(h // 5, w // 7, h // 2, w // 3), Window(h - 37, w - 41, 37, 41), None]


def rgb(h=200, w=200, dtype=np.uint8, c=3, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random((h, w, c)).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, (h, w, c), dtype=dtype, endpoint=True)


def check_windows(path, expected):
    """Every window read equals numpy slicing of the (H, W, C) array that was written."""
    with open_image(path) as src:
        assert isinstance(src, TiffSource)
        assert src.shape == expected.shape
        assert src.dtype == expected.dtype
        for window in windows(*expected.shape[:2]):
            got = src.read(window)
            want = expected if window is None else expected[window.slices]
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, want)


def test_tiled(tmp_path):
    a = rgb(200, 250)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(64, 64), compression="zlib", photometric="rgb")
    check_windows(tmp_path / "a.tif", a)


def test_tiled_jpeg_compressed_is_close(tmp_path):
    a = np.zeros((128, 128, 3), np.uint8) + np.arange(128, dtype=np.uint8)[None, :, None]
    tifffile.imwrite(
        tmp_path / "j.tif", a, tile=(64, 64), compression="jpeg", compressionargs={"level": 95}, photometric="rgb"
    )
    with open_image(tmp_path / "j.tif") as src:
        got = src.read(Window(10, 10, 50, 60))
    assert np.abs(got.astype(int) - a[10:60, 10:70]).mean() < 2


def test_stripped_compressed(tmp_path):
    a = rgb(150, 120)
    tifffile.imwrite(tmp_path / "s.tif", a, rowsperstrip=16, compression="zlib", photometric="rgb")
    check_windows(tmp_path / "s.tif", a)


def test_single_strip_uncompressed_is_memory_mapped(tmp_path):
    a = rgb(150, 120)
    tifffile.imwrite(tmp_path / "s.tif", a, photometric="rgb")  # tifffile's default: one strip
    check_windows(tmp_path / "s.tif", a)
    with open_image(tmp_path / "s.tif") as src:
        assert src._levels[0].memmap is not None


def test_bigtiff(tmp_path):
    a = rgb(130, 140)
    tifffile.imwrite(tmp_path / "b.tif", a, bigtiff=True, tile=(32, 32), photometric="rgb")
    with open(tmp_path / "b.tif", "rb") as fh:
        assert fh.read(4) == b"II+\x00"
    check_windows(tmp_path / "b.tif", a)


def test_btf_suffix(tmp_path):
    a = rgb(64, 64)
    tifffile.imwrite(tmp_path / "b.btf", a, bigtiff=True, tile=(32, 32), photometric="rgb")
    check_windows(tmp_path / "b.btf", a)


def test_ome_planar_channels(tmp_path):
    a = rgb(200, 180, np.uint16, c=5)
    path = tmp_path / "scene.ome.tif"
    tifffile.imwrite(path, a.transpose(2, 0, 1), tile=(64, 64), photometric="minisblack", metadata={"axes": "CYX"})
    check_windows(path, a)
    with open_image(path) as src:
        assert src.name == "scene"
        assert src.channels == 5


def test_planar_separate_rgb(tmp_path):
    a = rgb(160, 170)
    tifffile.imwrite(
        tmp_path / "p.tif",
        a.transpose(2, 0, 1),
        photometric="rgb",
        planarconfig="separate",
        tile=(32, 32),
        compression="zlib",
    )
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        assert tif.series[0].axes == "SYX"
    check_windows(tmp_path / "p.tif", a)


def test_four_band_uint16_rgbn(tmp_path):
    a = rgb(120, 130, np.uint16, c=4)
    tifffile.imwrite(tmp_path / "rgbn.tif", a, photometric="rgb", extrasamples=[0], tile=(32, 32), compression="zlib")
    check_windows(tmp_path / "rgbn.tif", a)


def test_float32_single_channel(tmp_path):
    a = rgb(100, 90, np.float32, c=1)
    tifffile.imwrite(tmp_path / "f.tif", a[:, :, 0], tile=(32, 32))
    check_windows(tmp_path / "f.tif", a)


def test_multipage_stack_becomes_channels(tmp_path):
    a = rgb(50, 60, np.uint8, c=4)
    tifffile.imwrite(tmp_path / "m.tif", a.transpose(2, 0, 1), photometric="minisblack")
    check_windows(tmp_path / "m.tif", a)


# -- pyramids ------------------------------------------------------------------------------


def write_pyramid(path, levels, **kwargs):
    with tifffile.TiffWriter(path) as w:
        w.write(levels[0], tile=(64, 64), subifds=len(levels) - 1, **kwargs)
        for level in levels[1:]:
            w.write(level, tile=(64, 64), subfiletype=1, **kwargs)


def test_pyramid_thumbnail_comes_from_the_level(tmp_path, monkeypatch):
    full = np.zeros((1024, 768, 3), np.uint8)
    half = np.full((512, 384, 3), 100, np.uint8)
    quarter = np.full((256, 192, 3), 200, np.uint8)  # distinguishable content per level
    write_pyramid(tmp_path / "pyr.tif", [full, half, quarter], photometric="rgb", compression="zlib")
    read_levels = []
    original = TiffSource._read_level

    def spy(self, level, *args):
        read_levels.append(level.index)
        return original(self, level, *args)

    monkeypatch.setattr(TiffSource, "_read_level", spy)
    with open_image(tmp_path / "pyr.tif") as src:
        assert src.levels == [(1024, 768), (512, 384), (256, 192)]
        thumb = src.thumbnail(256)
        assert thumb.shape == (256, 192, 3)
        assert (thumb == 200).all() and set(read_levels) == {2}
        read_levels.clear()
        assert (src.thumbnail(300) == 100).all() and set(read_levels) == {1}  # 256 px level is too coarse
        read_levels.clear()
        again = src.thumbnail(256)  # cached: no read
        assert read_levels == [] and (again == thumb).all()
        assert (src.read() == 0).all()


def test_pyramid_window_read_maps_to_level_coordinates(tmp_path):
    rows = np.arange(1024, dtype=np.uint16)[:, None] * np.ones((1, 1024), np.uint16)
    cols = np.arange(1024, dtype=np.uint16)[None, :] * np.ones((1024, 1), np.uint16)
    full = np.stack([rows, cols], axis=-1)
    half = full[::2, ::2] // 2  # level 1 holds coordinates / 2 ... and a marker
    write_pyramid(tmp_path / "pyr.tif", [full, half + 5000], photometric="minisblack", planarconfig="contig")
    with open_image(tmp_path / "pyr.tif") as src:
        assert src.channels == 2 and len(src.levels) == 2
        window = Window(256, 512, 512, 256)
        out = src.read(window, out_size=(256, 128))
        np.testing.assert_array_equal(out, half[128:384, 256:384] + 5000)  # level 1, window / 2
        # asking for more pixels than level 1 has over the window -> full resolution
        fine = src.read(window, out_size=(300, 150))
        assert fine.max() < 5000
        # no out_size: always full resolution
        np.testing.assert_array_equal(src.read(window), full[window.slices])


def test_ome_pyramid_levels(tmp_path):
    base = np.zeros((3, 512, 512), np.uint8)
    with tifffile.TiffWriter(tmp_path / "p.ome.tif", ome=True) as w:
        w.write(base, tile=(64, 64), subifds=1, metadata={"axes": "CYX"})
        w.write(base[:, ::2, ::2] + 9, tile=(64, 64), subfiletype=1)
    with open_image(tmp_path / "p.ome.tif") as src:
        assert src.levels == [(512, 512), (256, 256)] and src.channels == 3
        assert (src.thumbnail(256) == 9).all()
        assert (src.read(Window(0, 0, 64, 64), out_size=(32, 32)) == 9).all()


def test_thumbnail_without_pyramid_equals_direct_area_resize(tmp_path):
    a = rgb(2100, 1470, seed=3)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(64, 64), compression="zlib", photometric="rgb")
    # a small budget (bands of 1 MiB = a few tile rows) forces many bands
    with TiffSource(tmp_path / "a.tif", max_memory=8 * 2**20) as src:
        thumb = src.thumbnail(301)
        assert thumb.shape == (301, 211, 3)
        direct = resize(a, (301, 211), "area")
        assert np.abs(thumb.astype(int) - direct).max() <= 1
        # a real area average (7 x 7 blocks when the ratio is whole), not a subsample
        block = src.thumbnail(300)
        assert block.shape == (300, 210, 3)
        ref = a.astype(float).reshape(300, 7, 210, 7, 3).mean(axis=(1, 3))
        assert np.abs(block.astype(float) - ref).max() <= 0.5 + 1e-6
        labels = src.thumbnail(100, resample="nearest")
        assert set(np.unique(labels)) <= set(np.unique(a))


def test_thumbnail_memory_is_bounded_by_band(tmp_path):
    a = np.zeros((2048, 2048, 3), np.uint8)
    a[::7] = 255
    tifffile.imwrite(tmp_path / "big.tif", a, tile=(128, 128), compression="zlib", photometric="rgb")
    del a
    with TiffSource(tmp_path / "big.tif", max_memory=8 * 2**20) as src:  # bands of 1 MiB
        tracemalloc.start()
        try:
            thumb = src.thumbnail(256)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert thumb.shape == (256, 256, 3)
    image_bytes = 2048 * 2048 * 3
    assert peak < image_bytes / 3, f"thumbnail peak {peak / 1e6:.1f} MB for a {image_bytes / 1e6:.1f} MB image"


def test_small_window_of_big_tiled_tiff_decodes_only_touched_tiles(tmp_path, monkeypatch):
    size, tile = 8192, 256
    n = size // tile

    def tiles():  # streamed: never the whole 64 MB image in memory
        for i in range(n):
            for j in range(n):
                yield np.full((tile, tile), (i * n + j) % 251, np.uint8)

    path = tmp_path / "big.tif"
    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint8, tile=(tile, tile), compression="zlib")

    requested = []
    original_get = ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key[:1].isdigit():  # chunk keys look like "3.7"
            requested.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    with open_image(path) as src:
        window = Window(1000, 2000, 300, 300)
        out = src.read(window)
    expected_tiles = {
        f"{i}.{j}" for i in range(1000 // tile, 1299 // tile + 1) for j in range(2000 // tile, 2299 // tile + 1)
    }
    assert set(requested) == expected_tiles  # 3 x 2 of 1024 tiles
    assert len(requested) == len(expected_tiles)
    i0, j0 = 1000 // tile, 2000 // tile
    assert out[0, 0, 0] == (i0 * n + j0) % 251


# -- GeoTIFF -----------------------------------------------------------------------------

GEO = [
    (33550, "d", 3, (0.5, 0.5, 0.0)),
    (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4649776.0, 0.0)),
    (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),
    (34736, "d", 2, (1.5, 2.5)),
    (34737, "s", 0, "WGS 84 / UTM zone 33N|"),
    (42112, "s", 0, '<GDALMetadata><Item name="x">1</Item></GDALMetadata>'),
    (42113, "s", 0, "0"),
]


def test_geo_tags_round_trip(tmp_path):
    a = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    tifffile.imwrite(tmp_path / "geo.tif", a, tile=(32, 32), extratags=GEO)
    with open_image(tmp_path / "geo.tif") as src:
        tags = src.geo_tags
    by_code = {t[0]: t for t in tags}
    assert sorted(by_code) == [33550, 33922, 34735, 34736, 34737, 42112, 42113]
    assert by_code[33550][3] == (0.5, 0.5, 0.0)
    assert by_code[34735][3] == GEO[2][3]
    assert by_code[34737][3] == "WGS 84 / UTM zone 33N|"
    # what geo_tags returns is valid tifffile extratags: copying it reproduces the tags
    tifffile.imwrite(tmp_path / "copy.tif", a, extratags=tags)
    with open_image(tmp_path / "copy.tif") as copy:
        assert copy.geo_tags == tags
    with tifffile.TiffFile(tmp_path / "copy.tif") as tif:
        assert tif.pages[0].geotiff_tags["ProjectedCSTypeGeoKey"] == 32633


def test_model_transformation_tag_and_no_geo(tmp_path):
    matrix = (0.5, 0.0, 0.0, 100.0, 0.0, -0.5, 0.0, 200.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((8, 8), np.uint8), extratags=[(34264, "d", 16, matrix)])
    with open_image(tmp_path / "m.tif") as src:
        assert src.geo_tags == [(34264, 12, 16, matrix)]
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    with open_image(tmp_path / "plain.tif") as src:
        assert src.geo_tags == []


# -- errors and lifetime -----------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(ImageReadError, match="file not found") as err:
        open_image(path)
    assert str(path) in str(err.value)


def test_random_bytes_with_tif_suffix(tmp_path):
    path = tmp_path / "noise.tif"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match="not a TIFF") as err:
        open_image(path)
    assert str(path) in str(err.value)


def test_tiff_header_but_garbage(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 60)
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "layout",
    [
        dict(tile=(64, 64)),
        dict(tile=(64, 64), compression="zlib"),
        dict(rowsperstrip=16, compression="zlib"),
        dict(tile=(64, 64), compression="zlib", planarconfig="separate"),
    ],
    ids=["tiled-raw", "tiled-zlib", "strips-zlib", "planar-tiled"],
)
def test_truncated_file(tmp_path, layout):
    a = rgb(512, 512)
    full = tmp_path / "full.tif"
    if layout.get("planarconfig") == "separate":
        tifffile.imwrite(full, a.transpose(2, 0, 1), photometric="rgb", **layout)
    else:
        tifffile.imwrite(full, a, photometric="rgb", **layout)
    data = full.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    src = open_image(path)  # the header is intact: opening works
    if layout.get("planarconfig") != "separate":  # (planar: the last plane of every window is lost)
        np.testing.assert_array_equal(src.read(Window(0, 0, 64, 64)), a[:64, :64])  # intact tiles still read
    window = Window(448, 448, 64, 64)
    with pytest.raises(ImageReadError) as err:
        src.read(window)
    message = str(err.value)
    assert str(path) in message and str(window) in message and "truncated" in message
    with pytest.raises(ImageReadError, match="truncated"):
        src.thumbnail(64)
    src.close()


def test_truncated_contiguous_file(tmp_path):
    a = rgb(256, 256)
    tifffile.imwrite(tmp_path / "full.tif", a, photometric="rgb")
    data = (tmp_path / "full.tif").read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    with open_image(path) as src:
        np.testing.assert_array_equal(src.read(Window(0, 0, 10, 256)), a[:10])
        with pytest.raises(ImageReadError, match="truncated") as err:
            src.read(Window(200, 0, 10, 10))
        assert str(path) in str(err.value)


def test_corrupt_tile_is_reported(tmp_path):
    a = rgb(128, 128)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = b"\x00" * 40
    path.write_bytes(bytes(data))
    with open_image(path) as src:
        with pytest.raises(ImageReadError, match="cannot decode") as err:
            src.read(Window(64, 64, 64, 64))
        assert str(path) in str(err.value)


def test_unsupported_layout(tmp_path):
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 20, 30), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageReadError, match="unsupported layout") as err:
        open_image(path)
    assert str(path) in str(err.value)


def test_window_outside_image(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", rgb(50, 60), photometric="rgb")
    with open_image(tmp_path / "a.tif") as src:
        with pytest.raises(ValueError, match="outside"):
            src.read(Window(40, 0, 20, 10))
        with pytest.raises(ValueError, match="outside"):
            src.read(Window(-1, 0, 5, 5))
        with pytest.raises(ValueError):
            src.read(None, out_size=(10, 10), resample="cubic")


def test_close_releases_the_file_and_pickle_reopens(tmp_path):
    a = rgb(64, 64)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(32, 32), photometric="rgb")
    src = open_image(tmp_path / "a.tif")
    src.read(Window(0, 0, 8, 8))
    fh = src._tif.filehandle
    clone = pickle.loads(pickle.dumps(src))
    src.close()
    assert fh.closed
    with pytest.raises(ValueError, match="closed"):
        src.read()
    np.testing.assert_array_equal(clone.read(), a)
    clone.close()


def test_file_handle_stays_open_between_reads(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", rgb(64, 64), tile=(32, 32), photometric="rgb")
    with open_image(tmp_path / "a.tif") as src:
        fh = src._tif.filehandle
        src.read(Window(0, 0, 8, 8))
        assert not fh.closed
        src.read(Window(32, 32, 8, 8))
        assert src._tif.filehandle is fh and not fh.closed
    assert fh.closed
    assert os.path.exists(tmp_path / "a.tif")


def test_thumbnail_decodes_each_tile_once(tmp_path, monkeypatch):
    a = rgb(1000, 700)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(64, 64), compression="zlib", photometric="rgb")
    requested = []
    original_get = ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key[:1].isdigit():
            requested.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    with TiffSource(tmp_path / "a.tif", max_memory=8 * 2**20) as src:  # several bands
        src.thumbnail(97)
    tiles = -(-1000 // 64) * -(-700 // 64)
    assert len(requested) == len(set(requested)) == tiles


def _read_in_child(args):
    path, top = args
    with_src = _FORKED["src"]
    return with_src.read(Window(top, 0, 16, 64)).sum()


_FORKED = {}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_source_survives_fork(tmp_path):
    import multiprocessing

    a = rgb(256, 64)
    tifffile.imwrite(tmp_path / "a.tif", a, tile=(16, 16), compression="zlib", photometric="rgb")
    src = open_image(tmp_path / "a.tif")
    src.read(Window(0, 0, 16, 16))  # file handle and zarr arrays in use before the fork
    _FORKED["src"] = src
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            sums = pool.map(_read_in_child, [(str(tmp_path / "a.tif"), top) for top in range(0, 256, 16)] * 4)
    finally:
        _FORKED.clear()
    expected = [int(a[top : top + 16].astype(np.int64).sum()) for top in range(0, 256, 16)] * 4
    assert [int(s) for s in sums] == expected
    np.testing.assert_array_equal(src.read(), a)  # the parent's handle is unaffected
    src.close()
