"""Hostile input files, written by the tests themselves (raw bytes, struct, tifffile, Pillow).

Each :class:`Hostile` names a file gigaseg must refuse with one line (exit code 2) naming it, without
decoding what its header promises and without leaving anything under the output's name. ``stage`` says
where the refusal happens:

- ``"open"``: :func:`gigaseg.open_image` raises ``ImageReadError`` (header bombs, empty files, links
  that lead nowhere, a folder, unsupported samples);
- ``"read"``: the file opens (its header is sound) and reading its pixels raises ``ImageReadError``
  (truncated pixel data);
- ``"model"``: a readable image that does not fit an RGB uint8 model (band counts, float pixels
  outside [0, 1]): refused by ``predict`` and ``evaluate`` before anything is predicted;
- ``"predict"``: a readable image whose pixels give no class (NaN): refused when the network sees them.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

#: GIGASEG_MAX_DECODE for the cases with genuine (not forged) large strips and tiles
SMALL_DECODE_CAP = "8MB"

#: the cases :func:`write_corpus` writes, in its order (the tests are parametrized by these ids)
NAMES = (
    "png-bomb",
    "jpeg-bomb",
    "tiff-strip-bomb",
    "tiff-tile-bomb",
    "huge-strip",
    "huge-tile",
    "tiff-ifd-past-end",
    "text-as-tiff",
    "cut-tiled-tiff",
    "cut-strip-tiff",
    "cut-raw-tiff",
    "cut-png",
    "cut-jpeg",
    "empty-tif",
    "empty-tiff",
    "empty-png",
    "empty-jpg",
    "empty-jpeg",
    "complex-tiff",
    "float64-0-255",
    "float-nan",
    "two-band-tiff",
    "five-band-tiff",
    "two-band-png",
    "symlink-loop",
    "dangling-symlink",
    "folder-named-scene.tif",
)


@dataclass(frozen=True)
class Hostile:
    """One hostile input.

    Attributes:
        name: the case's id.
        path: the file (or link, or folder) to give gigaseg.
        stage: ``"open"``, ``"read"``, ``"model"`` or ``"predict"`` (see the module docstring).
        words: a fragment the one-line error must contain (besides the path).
        env: environment the case needs (a small decode cap for genuine large chunks).
    """

    name: str
    path: Path
    stage: str
    words: str
    env: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- raw writers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG of a few bytes whose IHDR declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def jpeg_header_bomb(path: Path, width: int = 65_000, height: int = 65_000) -> Path:
    """A 16x16 JPEG whose SOF0 frame header is patched to declare ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def _tiff(entries: list[tuple[int, int, int, int]], payload: bytes, extra: bytes = b"") -> bytes:
    """A little-endian classic TIFF: header, ``payload`` at offset 8, ``extra`` after it, then the IFD.

    ``entries`` are ``(tag, type, count, value)`` with type 3 (SHORT) or 4 (LONG) and values that fit
    the entry (offsets into the file for longer arrays).
    """
    body = payload + b"\x00" * (len(payload) % 2) + extra
    out = b"II*\x00" + struct.pack("<I", 8 + len(body)) + body + struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        if kind == 3:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<I", 0)


def tiff_strip_bomb(path: Path, side: int = 1_000_000) -> Path:
    """A deflate TIFF declaring ``side`` x ``side`` grey pixels in one strip of a few bytes."""
    data = zlib.compress(b"\x00" * 1000)
    entries = [
        (256, 4, 1, side),
        (257, 4, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, side),
        (279, 4, 1, len(data)),
    ]
    path.write_bytes(_tiff(entries, data))
    return path


def tiff_tile_bomb(path: Path, tile: int = 1 << 20) -> Path:
    """A deflate TIFF of one ``tile`` x ``tile`` RGB tile (3 TB decoded for ``1 << 20``) stored in a few bytes."""
    data = zlib.compress(b"\x00" * 1000)
    bits_at = 8 + len(data) + len(data) % 2
    entries = [
        (256, 4, 1, tile),
        (257, 4, 1, tile),
        (258, 3, 3, bits_at),
        (259, 3, 1, 8),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 4, 1, tile),
        (323, 4, 1, tile),
        (324, 4, 1, 8),
        (325, 4, 1, len(data)),
    ]
    path.write_bytes(_tiff(entries, data, struct.pack("<HHH", 8, 8, 8)))
    return path


def tiff_ifd_past_the_end(path: Path) -> Path:
    """A TIFF header whose first IFD offset points far past the end of the file."""
    path.write_bytes(b"II*\x00" + struct.pack("<I", 1 << 30) + b"\x00" * 64)
    return path


# --------------------------------------------------------------------------- pixel files


def noise(height: int, width: int, channels: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Random pixels (incompressible, so a cut file really loses pixel data)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8).astype(dtype)


def gradient(height: int, width: int) -> np.ndarray:
    """Smooth RGB pixels (they compress well, so a file with a huge strip or tile stays small)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def cut(path: Path, at: int) -> Path:
    """Truncate ``path`` to its first ``at`` bytes."""
    with open(path, "r+b") as handle:
        handle.truncate(at)
    return path


def tiff_cut_in_pixel_data(path: Path, **write) -> Path:
    """A TIFF written with ``write`` options, cut in the middle of its pixel data."""
    tifffile.imwrite(path, noise(600, 500), photometric="rgb", **write)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    middle = len(offsets) // 2
    return cut(path, int(offsets[middle]) + int(counts[middle]) // 2)


def pillow_cut_in_pixel_data(path: Path, fmt: str) -> Path:
    """A PNG or JPEG of random pixels cut in half (the middle of IDAT or of the entropy-coded scan)."""
    Image.fromarray(noise(400, 300)).save(path, fmt)
    return cut(path, path.stat().st_size // 2)


# --------------------------------------------------------------------------- the corpus


def write_corpus(folder: Path) -> list[Hostile]:
    """Write every hostile input into ``folder``.

    Args:
        folder: an empty folder.

    Returns:
        The cases, in a fixed order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Hostile] = []

    def add(name, path, stage, words, **kw):
        cases.append(Hostile(name, Path(path), stage, words, **kw))

    # header bombs: a few bytes declaring more than any budget
    add("png-bomb", png_header_bomb(folder / "png_bomb.png"), "open", "100000x100000x3 uint8")
    add("jpeg-bomb", jpeg_header_bomb(folder / "jpeg_bomb.jpg"), "open", "65000x65000x3 uint8")
    add("tiff-strip-bomb", tiff_strip_bomb(folder / "strip_bomb.tif"), "open", "stored as one strip")
    add("tiff-tile-bomb", tiff_tile_bomb(folder / "tile_bomb.tif"), "open", "one tile is")
    # genuine large chunks (real, compressible pixel data) over a small decode cap: the check the bombs meet
    cap = {"GIGASEG_MAX_DECODE": SMALL_DECODE_CAP}
    tifffile.imwrite(folder / "huge_strip.tif", gradient(2000, 1600), compression="zlib", rowsperstrip=2000)
    add("huge-strip", folder / "huge_strip.tif", "open", "one strip is 9.60 MB decoded", env=cap)
    tifffile.imwrite(folder / "huge_tile.tif", gradient(2100, 2100), compression="zlib", tile=(2048, 2048))
    add("huge-tile", folder / "huge_tile.tif", "open", "one tile is 12.58 MB decoded", env=cap)
    # broken structure
    add("tiff-ifd-past-end", tiff_ifd_past_the_end(folder / "ifd_past_end.tif"), "open", "TIFF")
    (folder / "text.tif").write_text("this is not an image\n" * 10)
    add("text-as-tiff", folder / "text.tif", "open", "not a TIFF file")
    # truncated in the middle of the pixel data
    add(
        "cut-tiled-tiff",
        tiff_cut_in_pixel_data(folder / "cut_tiled.tif", tile=(128, 128), compression="zlib"),
        "read",
        "truncated",
    )
    add(
        "cut-strip-tiff",
        tiff_cut_in_pixel_data(folder / "cut_strips.tif", rowsperstrip=64, compression="zlib"),
        "read",
        "truncated",
    )
    add("cut-raw-tiff", tiff_cut_in_pixel_data(folder / "cut_raw.tif"), "read", "truncated")
    add("cut-png", pillow_cut_in_pixel_data(folder / "cut.png", "PNG"), "read", "truncated")
    add("cut-jpeg", pillow_cut_in_pixel_data(folder / "cut.jpg", "JPEG"), "read", "truncated")
    # zero-length files with each extension
    for suffix in ("tif", "tiff", "png", "jpg", "jpeg"):
        (folder / f"empty.{suffix}").write_bytes(b"")
        add(f"empty-{suffix}", folder / f"empty.{suffix}", "open", "empty")
    # samples no model reads
    tifffile.imwrite(folder / "complex.tif", noise(64, 64, 1).astype(np.complex64))
    add("complex-tiff", folder / "complex.tif", "open", "complex64")
    # readable, but not what an RGB uint8 model takes
    tifffile.imwrite(folder / "float64_0_255.tif", noise(96, 96).astype(np.float64), photometric="rgb")
    add("float64-0-255", folder / "float64_0_255.tif", "model", "float image with values in [0, 255]")
    nan = noise(96, 96).astype(np.float32) / 255
    nan[10:40, 20:60] = np.nan
    tifffile.imwrite(folder / "float_nan.tif", nan, photometric="rgb")
    add("float-nan", folder / "float_nan.tif", "predict", "NaN or infinite pixel values")
    tifffile.imwrite(folder / "two_bands.tif", noise(96, 96, 2), planarconfig="contig", photometric="minisblack")
    add("two-band-tiff", folder / "two_bands.tif", "model", "has 2 channels, the model expects 3")
    tifffile.imwrite(folder / "five_bands.tif", noise(96, 96, 5), planarconfig="contig", photometric="minisblack")
    add("five-band-tiff", folder / "five_bands.tif", "model", "has 5 channels, the model expects 3")
    Image.fromarray(noise(96, 96, 2), "LA").save(folder / "two_bands.png")
    add("two-band-png", folder / "two_bands.png", "model", "has 2 channels, the model expects 3")
    # links that lead nowhere, and a folder with an image's name
    os.symlink("loop_b.tif", folder / "loop_a.tif")
    os.symlink("loop_a.tif", folder / "loop_b.tif")
    add("symlink-loop", folder / "loop_a.tif", "open", "loop of links")
    os.symlink("gone.tif", folder / "dangling.tif")
    add("dangling-symlink", folder / "dangling.tif", "open", "symbolic link to gone.tif, which does not exist")
    (folder / "scene.tif").mkdir()
    add("folder-named-scene.tif", folder / "scene.tif", "open", "is a directory")
    return cases
