"""Data-safety guards of the readers: decode budgets, header bombs, huge strips, decode peaks, palette images.

Each defect of the data-safety issue has a test named after it that failed before the fix:

1. header bombs (PNG, JPEG, TIFF declaring absurd sizes in a few bytes) ended in a MemoryError;
2. a TIFF with one huge strip decoded the whole strip for every small window read;
3. the budget check counted only the decoded array, not the decode's peak;
4. colour images stored as palette PNGs were read as one channel of indices.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import sys
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from tifffile.zarr import ZarrTiffStore

from gigaseg.bench.memory import measure_command
from gigaseg.data.labels import IndexEncoding, LabelSource, PaletteEncoding
from gigaseg.errors import ConfigError, ImageReadError
from gigaseg.geometry import Window
from gigaseg.io import pillow
from gigaseg.io.pillow import PillowSource
from gigaseg.io.sources import open_image
from gigaseg.io.tiff import TiffSource

ENV = "GIGASEG_MAX_DECODE"


@pytest.fixture(autouse=True)
def no_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


# --------------------------------------------------------------------------- crafted files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path, width, height, color_type=2, depth=8):
    """A valid PNG signature and header declaring ``width`` x ``height``, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    data = zlib.compress(b"\x00" * 100)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )
    return path


def jpeg_header_only(path, width, height):
    """A 16x16 RGB JPEG whose frame header is patched to declare ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def tiff_one_strip(path, width, height):
    """A deflate TIFF declaring ``width`` x ``height`` grey pixels in one strip of a few bytes."""
    data = zlib.compress(b"\x00" * 1000)
    pad = len(data) % 2
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, len(data)),
    ]
    out = b"II*\x00" + struct.pack("<I", 8 + len(data) + pad) + data + b"\x00" * pad
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += (
            struct.pack("<HHIHH", tag, kind, count, value, 0)
            if kind == 3
            else struct.pack("<HHII", tag, kind, count, value)
        )
    path.write_bytes(out + struct.pack("<I", 0))
    return path


def tiff_tiled_sparse(path, side, tile):
    """A deflate tiled TIFF of ``side`` x ``side`` grey pixels where only the first tile is stored (others empty)."""
    data = zlib.compress(bytes(range(256)) * (tile * tile // 256))
    tiles = math.ceil(side / tile) ** 2
    offsets_at = 8 + len(data) + len(data) % 2
    counts_at = offsets_at + 4 * tiles
    ifd_at = counts_at + 4 * tiles
    offsets = [8] + [0] * (tiles - 1)
    counts = [len(data)] + [0] * (tiles - 1)
    entries = [
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (277, 3, 1, 1),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, tiles, offsets_at),
        (325, 4, tiles, counts_at),
    ]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + data + b"\x00" * (len(data) % 2)
    out += struct.pack(f"<{tiles}I", *offsets) + struct.pack(f"<{tiles}I", *counts)
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += (
            struct.pack("<HHIHH", tag, kind, count, value, 0)
            if kind == 3
            else struct.pack("<HHII", tag, kind, count, value)
        )
    path.write_bytes(out + struct.pack("<I", 0))
    return path


def smooth_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + 2 * y) // 5 % 256).astype(np.uint8)
    noise = rng.integers(0, 4, (height, width), dtype=np.uint8)
    return np.stack([base + noise, base[::-1] + noise, 255 - base], axis=-1)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- 1. header bombs


def test_png_header_bomb_is_refused_before_decoding(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert path.stat().st_size < 100
    with pytest.raises(ImageReadError) as err:
        open_image(path)  # before the fix: opened, and the first read ended in MemoryError
    message = one_line(err)
    assert message.startswith(f"{path}: ")
    assert "100000x100000x3 uint8" in message and "30.00 GB decoded" in message
    assert "default decode cap" in message and ENV in message
    assert "tiled TIFF" in message and "gdal_translate -co TILED=YES" in message


def test_jpeg_header_bomb_is_refused_before_decoding(tmp_path):
    path = jpeg_header_only(tmp_path / "bomb.jpg", 65_000, 65_000)
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    message = one_line(err)
    assert str(path) in message and "JPEG image of 65000x65000x3 uint8" in message
    assert ENV in message and "tiled TIFF" in message


def test_tiff_header_bomb_one_strip_is_refused_before_decoding(tmp_path):
    path = tiff_one_strip(tmp_path / "bomb.tif", 1_000_000, 1_000_000)
    with pytest.raises(ImageReadError) as err:
        open_image(path)  # before the fix: opened, and the first window decoded the 10 GB strip
    message = one_line(err)
    assert str(path) in message and "1000000x1000000x1 uint8 image stored as one strip" in message
    assert "1000.00 GB decoded" in message and ENV in message
    assert "tiled TIFF" in message and "tile=(512, 512)" in message


def test_tiff_of_absurd_size_in_small_tiles_is_read_lazily(tmp_path):
    # a 100000 x 100000 (10 GB) image in 1 MB tiles: nothing is refused, a window decodes only its tiles
    path = tiff_tiled_sparse(tmp_path / "sparse.tif", 100_000, 1024)
    with open_image(path) as source:
        assert source.shape == (100_000, 100_000, 1)
        tracemalloc.start()
        try:
            corner = source.read(Window(0, 0, 64, 64))
            far = source.read(Window(70_000, 50_000, 300, 300))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert corner[0, :4, 0].tolist() == [0, 1, 2, 3] and not far.any()
    assert peak < 20e6, f"reading two windows allocated {peak / 1e6:.1f} MB"


def test_decode_cap_comes_from_the_environment_and_max_memory_overrides_it(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(smooth_rgb(1000, 1000)).save(path)  # 3 MB decoded
    monkeypatch.setenv(ENV, "5MB")
    with pytest.raises(ImageReadError) as err:
        open_image(path)
    assert f"{ENV}=5MB" in one_line(err) and f"set {ENV}=1GB" in one_line(err)
    with open_image(path, max_memory="100MB") as source:  # an explicit budget wins
        assert source.read(Window(0, 0, 2, 2)).shape == (2, 2, 3)
    monkeypatch.setenv(ENV, "none")
    assert open_image(png_header_only(tmp_path / "bomb.png", 100_000, 100_000)).shape == (100_000, 100_000, 3)
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ConfigError, match=rf"{ENV}='lots'"):
        open_image(path)


def test_default_decode_cap_is_half_the_memory_at_most_the_limit(monkeypatch):
    cap = pillow.default_decode_cap()
    assert 0 < cap <= pillow.DEFAULT_CAP_LIMIT
    if pillow.machine_memory() is not None:
        assert cap <= pillow.machine_memory() // 2
    monkeypatch.setattr(pillow, "machine_memory", lambda: 8 * 10**9)
    assert pillow.default_decode_cap() == 4 * 10**9
    monkeypatch.setattr(pillow, "machine_memory", lambda: 10**12)
    assert pillow.default_decode_cap() == pillow.DEFAULT_CAP_LIMIT
    monkeypatch.setattr(pillow, "machine_memory", lambda: None)
    assert pillow.default_decode_cap() == pillow.DEFAULT_CAP_UNKNOWN


# --------------------------------------------------------------------------- 2. huge strips


def test_huge_strip_is_refused_with_tiling_advice(tmp_path, monkeypatch):
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, smooth_rgb(2000, 2000), compression="zlib", rowsperstrip=2000, photometric="rgb")
    with pytest.raises(ImageReadError) as err:
        TiffSource(path, max_memory="8MB")  # one strip is 12 MB decoded
    message = one_line(err)
    assert str(path) in message and "one strip is 12.00 MB decoded" in message
    assert "memory budget of 8.00 MB" in message and "raise max_memory / --max-memory to 1GB" in message
    assert "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE strip.tif strip_tiled.tif" in message
    assert "tifffile.imwrite(..., tile=(512, 512))" in message
    monkeypatch.setenv(ENV, "8MB")  # the same without max_memory, from the decode cap
    with pytest.raises(ImageReadError, match=rf"more than the decode cap {ENV}=8MB"):
        open_image(path)
    with TiffSource(path, max_memory="64MB") as source:  # within the budget: read as before
        assert source.read(Window(10, 10, 4, 4)).shape == (4, 4, 3)


def count_decodes(monkeypatch) -> list[str]:
    requested: list[str] = []
    original_get = ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key[:1].isdigit():
            requested.append(key)
        return await original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    return requested


def test_large_strip_is_decoded_once_for_many_windows(tmp_path, monkeypatch):
    image = smooth_rgb(6000, 1200)  # two strips of 3000 rows, 10.8 MB decoded each
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, compression="zlib", rowsperstrip=3000, photometric="rgb")
    monkeypatch.setattr("gigaseg.io.tiff.CACHE_MIN_CHUNK_BYTES", 8 * 2**20, raising=False)
    decodes = count_decodes(monkeypatch)
    windows = [Window(top, left, 500, 400) for top in range(0, 6000, 500) for left in range(0, 1200, 400)]
    with TiffSource(path) as source:
        for window in windows:  # raster order; the row of windows at 2500..3000 is followed by one at 3000
            np.testing.assert_array_equal(source.read(window), image[window.slices])
        straddling = Window(2900, 100, 200, 300)
        np.testing.assert_array_equal(source.read(straddling), image[straddling.slices])
        thumb = source.thumbnail(300)
        assert thumb.shape == (300, 60, 3)
    assert len(decodes) == 2, f"{len(windows)} windows decoded {len(decodes)} strips"


def test_large_strip_cache_is_bounded_by_the_budget(tmp_path, monkeypatch):
    image = smooth_rgb(4000, 1000)  # two strips of 6 MB
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, compression="zlib", rowsperstrip=2000, photometric="rgb")
    monkeypatch.setattr("gigaseg.io.tiff.CACHE_MIN_CHUNK_BYTES", 4 * 2**20)
    decodes = count_decodes(monkeypatch)
    windows = [Window(top, 0, 400, 400) for top in range(0, 4000, 400)]
    # a quarter of 16 MB holds no 6 MB strip: every window decodes its strip, as without the cache
    with TiffSource(path, max_memory="16MB") as source:
        for window in windows:
            np.testing.assert_array_equal(source.read(window), image[window.slices])
    assert len(decodes) == len(windows)
    decodes.clear()
    # a quarter of 32 MB holds one strip: each strip is decoded once in raster order
    with TiffSource(path, max_memory="32MB") as source:
        for window in windows:
            source.read(window)
        assert sum(p.nbytes for p in source._levels[0].cache.values()) <= 8 * 10**6
    assert len(decodes) == 2


# --------------------------------------------------------------------------- 3. the decode peak


def test_budget_check_counts_the_decode_peak_not_just_the_array(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(smooth_rgb(1000, 1200)).save(path)  # 3.6 MB decoded
    with pytest.raises(ImageReadError) as err:
        open_image(path, max_memory="4.5MB")  # before the fix: 3.6 MB < 4.5 MB was accepted
    message = one_line(err)
    assert "1000x1200x3 uint8 (3.60 MB decoded, about" in message and "to decode" in message
    source = PillowSource(path, max_memory="100MB")
    expected = 3.6e6 * pillow.DECODE_PEAK_FACTOR["PNG"] + pillow.DECODE_PEAK_FIXED_BYTES
    assert source.estimated_peak_bytes == pytest.approx(expected, rel=1e-6)


_CHILD = """
import json, sys
import numpy
from PIL import Image, JpegImagePlugin, PngImagePlugin
from gigaseg.geometry import Window
from gigaseg.io.sources import open_image
Image.init()
if len(sys.argv) > 1:
    source = open_image(sys.argv[1])
    source.read(Window(0, 0, 1, 1))
    print(json.dumps({"estimate": source.estimated_peak_bytes, "decoded": source.decoded_bytes}))
"""


def _child(*args) -> tuple[int, dict]:
    """Peak RSS of a fresh child (measured by gigaseg.bench's wrapper, so this process's peak does not leak in)."""
    report = measure_command([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, check=True)
    lines = report.stdout.strip().splitlines()
    return report.peak_rss, (json.loads(lines[-1]) if lines else {})


@pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs resource and os.wait4")
def test_decode_peak_estimate_covers_a_measured_decode(tmp_path):
    png, jpeg = tmp_path / "a.png", tmp_path / "p.jpg"
    image = smooth_rgb(3000, 3000)
    Image.fromarray(image).save(png, compress_level=1)
    Image.fromarray(image[:, :, 0]).save(jpeg, quality=90, progressive=True)  # the worst kind measured
    baseline = min(_child()[0] for _ in range(2))
    for path in (png, jpeg):
        peak, run = _child(path)
        above = peak - baseline
        assert above <= run["estimate"], f"{path.name}: {above / 1e6:.1f} MB above baseline, more than the estimate"
        assert run["estimate"] < 1.25 * above + 5e6, f"{path.name}: the estimate is far above the real peak"


# --------------------------------------------------------------------------- 4. palette images


def palette_png(path, indices, colours, transparency=None):
    image = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    image.putpalette([v for colour in colours for v in colour])
    kwargs = {} if transparency is None else {"transparency": transparency}
    image.save(path, **kwargs)
    return path


COLOURS = [(0, 0, 0), (255, 0, 0), (0, 128, 0), (20, 40, 250)]


def test_palette_png_image_is_read_as_colours(tmp_path):
    indices = np.random.default_rng(1).integers(0, 4, (30, 40))
    path = palette_png(tmp_path / "map.png", indices, COLOURS)
    with open_image(path) as source:  # before the fix: 1 channel of indices
        assert source.shape == (30, 40, 3) and source.mode == "P" and source.palette_mode == "colors"
        np.testing.assert_array_equal(source.read(), np.array(COLOURS, np.uint8)[indices])
        window = Window(5, 7, 10, 12)
        np.testing.assert_array_equal(source.read(window), np.array(COLOURS, np.uint8)[indices][window.slices])
    with open_image(path, palette="indices") as source:
        assert source.shape == (30, 40, 1)
        np.testing.assert_array_equal(source.read()[:, :, 0], indices)
        np.testing.assert_array_equal(source.palette[:4], COLOURS)


def test_palette_png_with_transparency_is_read_as_rgba(tmp_path):
    indices = np.array([[0, 1], [2, 3]])
    path = palette_png(tmp_path / "logo.png", indices, COLOURS, transparency=0)
    with open_image(path) as source:
        assert source.channels == 4
        got = source.read()
    assert got[0, 0].tolist() == [0, 0, 0, 0] and got[1, 1].tolist() == [20, 40, 250, 255]


def test_palette_mask_keeps_its_indices(tmp_path):
    indices = np.random.default_rng(2).integers(0, 4, (24, 32))
    path = palette_png(tmp_path / "mask.png", indices, COLOURS)
    with LabelSource(open_image(path), IndexEncoding(4)) as mask:  # the image default: colours
        assert mask.raw.palette_mode == "indices"
        np.testing.assert_array_equal(mask.read()[:, :, 0], indices)
    with LabelSource(open_image(path), PaletteEncoding(COLOURS)) as mask:  # colour-coded through its palette
        np.testing.assert_array_equal(mask.read()[:, :, 0], indices)


def test_palette_choice_survives_pickling_and_is_checked(tmp_path):
    path = palette_png(tmp_path / "mask.png", np.zeros((4, 4), int), COLOURS)
    copy = pickle.loads(pickle.dumps(open_image(path, palette="indices")))
    assert copy.palette_mode == "indices" and copy.channels == 1
    with pytest.raises(ConfigError, match="palette must be 'colors' or 'indices'"):
        open_image(path, palette="rgb")
