"""Cloud-optimized GeoTIFF layout: every IFD first, then the tiles from the smallest level to the largest.

tifffile writes each page's IFD followed by its tiles, level after level. A cloud-optimized
GeoTIFF (https://github.com/cogeotiff/cog-spec) keeps the same pages and tags but orders the
bytes so that a reader fetching the file's head learns every level's layout at once, and finds
the coarse levels' tiles before the full resolution's: the IFDs of full resolution and of each
reduced level (in the main IFD chain, ``NewSubfileType`` 1, not SubIFDs) come first, in that
order, then the tiles of the smallest level, ..., then those of full resolution. That is what
GDAL's COG driver writes and what rio-cogeo's ``cog_validate`` checks.

:func:`relayout_cog` rewrites a tiled BigTIFF written level by level into that order. It copies
the tiles' encoded bytes one at a time (nothing is decoded or re-encoded), so memory stays at
one tile plus the IFDs whatever the image size, and the pixels and tags are exactly those of
the source.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

#: bytes per value of each TIFF data type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, SLONG8, IFD8)
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
#: integer formats of the data types an offset or byte-count tag may use
_INT_FORMATS = {3: "H", 4: "I", 16: "Q"}
_TILE_OFFSETS, _TILE_BYTECOUNTS, _SUBIFDS = 324, 325, 330
#: BigTIFF: 8-byte entry count, 20-byte entries, 8-byte link to the next IFD
_ENTRY = 20


class _Page:
    """One IFD of the source: its tags' raw values and where its tiles are."""

    def __init__(self, tags: list[tuple[int, int, int, bytes]], offsets: list[int], bytecounts: list[int]):
        self.tags = sorted(tags)  # IFD entries must be sorted by tag code
        self.offsets = offsets
        self.bytecounts = bytecounts
        self.new_offsets = [0] * len(offsets)
        self.position = 0  # of the IFD in the new file

    def size(self) -> int:
        """Bytes the IFD and its out-of-line values take (each value padded to 8 bytes)."""
        size = 8 + _ENTRY * len(self.tags) + 8
        for _, _, _, raw in self.tags:
            if len(raw) > 8:
                size += _padded(len(raw))
        return size

    def encode(self, next_ifd: int) -> bytes:
        """The IFD, as it sits at :attr:`position`, linking to ``next_ifd`` (0: the last)."""
        entries = [struct.pack("<Q", len(self.tags))]
        values = []
        value_at = self.position + 8 + _ENTRY * len(self.tags) + 8
        for code, dtype, count, raw in self.tags:
            if code == _TILE_OFFSETS:
                raw = struct.pack(f"<{count}{_INT_FORMATS[dtype]}", *self.new_offsets)
            if len(raw) <= 8:
                entries.append(struct.pack("<HHQ", code, dtype, count) + raw.ljust(8, b"\0"))
            else:
                entries.append(struct.pack("<HHQQ", code, dtype, count, value_at))
                values.append(raw.ljust(_padded(len(raw)), b"\0"))
                value_at += _padded(len(raw))
        entries.append(struct.pack("<Q", next_ifd))
        return b"".join(entries + values)


def _padded(size: int) -> int:
    return (size + 7) // 8 * 8


def relayout_cog(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a tiled little-endian BigTIFF into the cloud-optimized layout.

    The source's pyramid must be in the main IFD chain (full resolution first, then each
    reduced level), as :func:`gigaseg.io.writers.write_tiled_tiff` writes it with
    ``pyramid_layout="cog"``. The target gets the same pages, tags and encoded tiles: the
    header, the IFDs in chain order, then the tiles of the last (smallest) page first and those
    of the first page last.

    Args:
        source: the tiled BigTIFF to read.
        target: the file to write (overwritten).

    Returns:
        ``target`` as a ``Path``.

    Raises:
        ValueError: the source is not a little-endian BigTIFF, a page is not tiled, or it
            has SubIFDs.
    """
    import tifffile

    target = Path(target)
    with tifffile.TiffFile(source) as tif:
        if not tif.is_bigtiff or tif.byteorder != "<":
            raise ValueError(f"{source}: the COG layout is written from little-endian BigTIFF only")
        handle = tif.filehandle
        pages = []
        for page in tif.pages:
            if not page.is_tiled or _SUBIFDS in page.tags:
                raise ValueError(f"{source}: page {page.index} is not tiled or has SubIFDs")
            tags = []
            for tag in page.tags.values():
                handle.seek(tag.valueoffset)
                raw = handle.read(_TYPE_SIZES[int(tag.dtype)] * tag.count)
                tags.append((int(tag.code), int(tag.dtype), int(tag.count), raw))
            pages.append(_Page(tags, [int(o) for o in page.dataoffsets], [int(b) for b in page.databytecounts]))

        position = 16
        for page in pages:
            page.position = position
            position += page.size()
        with open(target, "wb") as out:
            out.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, pages[0].position))
            out.seek(position)
            for page in reversed(pages):  # the smallest level's tiles first, full resolution's last
                for index, (offset, count) in enumerate(zip(page.offsets, page.bytecounts, strict=True)):
                    if count == 0:
                        continue  # an empty tile keeps offset 0
                    page.new_offsets[index] = out.tell()
                    handle.seek(offset)
                    out.write(handle.read(count))
            for index, page in enumerate(pages):
                out.seek(page.position)
                next_ifd = pages[index + 1].position if index + 1 < len(pages) else 0
                out.write(page.encode(next_ifd))
    return target
