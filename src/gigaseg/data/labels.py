"""Label encodings (how a mask file stores classes) and the lazy ``LabelSource``.

A mask file stores classes in one of a few ways; an encoding turns a decoded window
of the file into a ``(h, w)`` uint8 array of class ids (``ignore_index`` for pixels
that are not scored):

- ``IndexEncoding``: the pixels are the class ids (gigaseg's own masks, paletted PNGs);
- ``PaletteEncoding``: RGB colours, one per class (DeepGlobe; optionally each channel
  thresholded first);
- ``LookupEncoding``: a 256-entry table from stored value to class id (Cityscapes
  labelIds -> trainIds);
- ``BinaryEncoding``: grey values thresholded into 0/1 (Inria's 0/255 building masks).

Encodings are small, picklable and serialise to plain dicts (``to_dict`` /
``LabelEncoding.from_dict``), so a checkpoint can store how its labels were read.
A value the encoding does not know (an unknown colour, an id out of range) is a
``DatasetError`` naming the file, the value and a pixel position.

``LabelSource`` wraps a raw mask ``ImageSource`` and an encoding and is itself a
1-channel uint8 ``ImageSource`` of class ids. It resamples with nearest neighbour
only: labels are never averaged.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..errors import DatasetError
from ..geometry import Window
from ..io.base import ImageSource
from ..io.palette import as_palette, rgb_to_index

#: the label value that marks pixels no loss or metric counts (never a class id)
IGNORE_INDEX = 255


def _describe_window(window: Window) -> str:
    return f"window (top={window.top}, left={window.left}, {window.height}x{window.width} HxW)"


def _pixel(flat_index: int, shape: tuple[int, int], window: Window) -> tuple[int, int]:
    """Image coordinates (row, col) of element ``flat_index`` of an array covering ``window``.

    When the array was resampled (its shape differs from the window's), the position
    is the centre of the output pixel mapped back into the window.
    """
    h, w = shape
    r, c = divmod(int(flat_index), w)
    row = window.top + int((r + 0.5) * window.height / h) if h != window.height else window.top + r
    col = window.left + int((c + 0.5) * window.width / w) if w != window.width else window.left + c
    return row, col


def _where(bad: np.ndarray, window: Window) -> tuple[int, str]:
    """First bad element and a text locating it: ``(flat_index, "at row R, col C (...)")``."""
    flat = np.flatnonzero(bad)
    first = int(flat[0])
    row, col = _pixel(first, bad.shape, window)
    return first, f"at row {row}, col {col} ({len(flat)} such pixels in {_describe_window(window)})"


def _one_band(raw: np.ndarray, encoding: LabelEncoding, path) -> np.ndarray:
    """``raw`` as ``(h, w)`` integers, or a DatasetError if it is not a 1-channel integer mask."""
    if raw.ndim == 3:
        if raw.shape[2] != 1:
            raise DatasetError(
                path,
                f"mask has {raw.shape[2]} channels but the {encoding.kind} encoding reads 1-channel "
                "masks (colour-coded masks need a palette / mask_encoding: rgb)",
            )
        raw = raw[:, :, 0]
    if raw.dtype == bool:
        raw = raw.view(np.uint8)
    if raw.dtype.kind not in "ui":
        raise DatasetError(path, f"mask has dtype {raw.dtype}; class masks must hold integers")
    return raw


class LabelEncoding(ABC):
    """How a mask file stores classes; ``encode`` maps a decoded window to class ids.

    Subclasses set ``kind`` (which registers them for ``from_dict``), ``num_classes`` and
    ``ignore_index``.
    """

    #: name used in ``to_dict`` / ``from_dict`` (and in dataset.yaml's spirit)
    kind: ClassVar[str]
    #: channels the raw mask has: 1 (ids or grey values) or 3 (RGB colours)
    raw_channels: ClassVar[int] = 1
    _registry: ClassVar[dict[str, type[LabelEncoding]]] = {}

    num_classes: int
    ignore_index: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            LabelEncoding._registry[cls.kind] = cls

    @abstractmethod
    def encode(
        self,
        raw: np.ndarray,
        *,
        path: str | os.PathLike | None = None,
        window: Window | None = None,
    ) -> np.ndarray:
        """Class ids ``(h, w)`` uint8 of a decoded mask window ``raw`` (``(h, w)`` or ``(h, w, C)``).

        Args:
            raw: the decoded mask pixels.
            path: the mask file; only serves error messages.
            window: the image window ``raw`` covers (default: the whole array); only serves error
                messages, which locate a bad pixel in image coordinates.

        Returns:
            ``(h, w)`` uint8 class ids, ``ignore_index`` where not scored.

        Raises:
            DatasetError: ``raw`` has the wrong channels or dtype, or holds a value the encoding does
                not know (an unknown colour, an id out of range).
        """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON/YAML-safe) description, with ``"type"``; ``from_dict`` inverts it.

        Returns:
            ``{"type": kind, ...}`` holding the constructor's arguments.
        """

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelEncoding:
        """The encoding that ``to_dict`` described.

        Args:
            data: a ``to_dict`` result: ``"type"`` names the encoding, the other keys are its
                constructor's arguments.

        Returns:
            A new encoding of the class ``"type"`` names.

        Raises:
            ValueError: ``"type"`` names no encoding (or one that is not a subclass of ``cls``).
        """
        kind = data.get("type")
        sub = LabelEncoding._registry.get(kind)
        if sub is None or not issubclass(sub, cls):
            known = ", ".join(sorted(LabelEncoding._registry))
            raise ValueError(f"unknown label encoding type {kind!r} (known: {known})")
        return sub(**{k: v for k, v in data.items() if k != "type"})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelEncoding) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k not in ("type", "palette", "lut"))
        return f"{type(self).__name__}({fields})"

    @staticmethod
    def _check_ignore(num_classes: int, ignore_index: int) -> None:
        if not 1 <= num_classes <= 255:
            raise ValueError(f"num_classes must lie in 1..255 (ids are stored as uint8), got {num_classes}")
        if not num_classes <= ignore_index <= 255:
            raise ValueError(f"ignore_index must lie in {num_classes}..255 (not a class id), got {ignore_index}")


class IndexEncoding(LabelEncoding):
    """The mask's pixels are the class ids ``0..num_classes-1``, or ``ignore_index``.

    Args:
        num_classes: number of classes, 1..255.
        ignore_index: the value of pixels that are not scored, ``num_classes..255``.

    Raises:
        ValueError: ``num_classes`` or ``ignore_index`` is out of range.
    """

    kind = "index"

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self._check_ignore(int(num_classes), int(ignore_index))
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)

    def encode(self, raw, *, path=None, window=None):
        """The ids of a 1-channel integer mask, checked to be in range (see ``LabelEncoding.encode``).

        Args:
            raw: the decoded mask pixels, ``(h, w)`` or ``(h, w, 1)``.
            path: the mask file, for error messages.
            window: the image window ``raw`` covers, for error messages.

        Returns:
            ``(h, w)`` uint8 class ids.

        Raises:
            DatasetError: ``raw`` is not a 1-channel integer mask, or holds an id that is neither a class
                nor ``ignore_index``.
        """
        ids = _one_band(np.asarray(raw), self, path)
        window = window or Window(0, 0, *ids.shape)
        if ids.size and (int(ids.max()) >= self.num_classes or int(ids.min()) < 0):
            bad = (ids >= self.num_classes) & (ids != self.ignore_index) | (ids < 0)
            if bad.any():
                first, where = _where(bad, window)
                raise DatasetError(
                    path,
                    f"class id {int(ids.flat[first])} is out of range {where}: there are "
                    f"{self.num_classes} classes (ids 0..{self.num_classes - 1}) and "
                    f"ignore_index is {self.ignore_index}",
                )
        return ids.astype(np.uint8, copy=False)

    def to_dict(self):
        """Plain description (see ``LabelEncoding.to_dict``).

        Returns:
            ``{"type": "index", "num_classes": ..., "ignore_index": ...}``.
        """
        return {"type": self.kind, "num_classes": self.num_classes, "ignore_index": self.ignore_index}


class PaletteEncoding(LabelEncoding):
    """RGB masks: row ``i`` of ``palette`` is the colour of class ``i``.

    ``ignore_color`` (optional) marks pixels mapped to ``ignore_index``. With
    ``threshold``, each channel is first binarised (``>= threshold`` -> 255, else 0);
    this is the official reading of DeepGlobe's masks, whose colours are slightly off
    because they went through JPEG compression before being saved as PNG. Any other
    colour is an error.

    Args:
        palette: one RGB colour per class (anything ``as_palette`` reads); colours must be distinct.
        ignore_color: the RGB colour of pixels that are not scored; None: every pixel is a class.
        ignore_index: the label given to ``ignore_color`` pixels, ``len(palette)..255``.
        threshold: per-channel binarisation threshold, 1..255; None: colours must match exactly.
            With a threshold every palette (and ignore) colour may use only 0 and 255.

    Raises:
        ValueError: two classes share a colour, ``ignore_color`` is a class's colour, or a value
            is out of range.
    """

    kind = "palette"
    raw_channels = 3

    def __init__(
        self,
        palette,
        ignore_color: tuple[int, int, int] | list[int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        threshold: int | None = None,
    ):
        self.palette = as_palette(palette)
        self._check_ignore(len(self.palette), int(ignore_index))
        self.ignore_index = int(ignore_index)
        self.num_classes = len(self.palette)
        colours = [tuple(int(v) for v in c) for c in self.palette]
        for i, colour in enumerate(colours):
            if colours.index(colour) != i:
                raise ValueError(f"classes {colours.index(colour)} and {i} share the colour {colour}")
        self.ignore_color = None
        if ignore_color is not None:
            self.ignore_color = tuple(int(v) for v in as_palette([ignore_color])[0])
            if self.ignore_color in colours:
                raise ValueError(
                    f"ignore_color {self.ignore_color} is also the colour of class {colours.index(self.ignore_color)}"
                )
        self.threshold = None if threshold is None else int(threshold)
        if self.threshold is not None:
            if not 1 <= self.threshold <= 255:
                raise ValueError(f"threshold must lie in 1..255, got {threshold}")
            extra = [] if self.ignore_color is None else [self.ignore_color]
            if any(v not in (0, 255) for c in colours + extra for v in c):
                raise ValueError("with a threshold every palette (and ignore) colour must use only 0 and 255")
        lookup = self.palette if self.ignore_color is None else np.vstack([self.palette, [self.ignore_color]])
        self._lookup = lookup.astype(np.uint8)

    def encode(self, raw, *, path=None, window=None):
        """The class of each pixel's colour (see ``LabelEncoding.encode``); an alpha channel is ignored.

        Args:
            raw: the decoded mask pixels, ``(h, w, 3)`` or ``(h, w, 4)`` uint8.
            path: the mask file, for error messages.
            window: the image window ``raw`` covers, for error messages.

        Returns:
            ``(h, w)`` uint8 class ids, ``ignore_index`` where the colour is ``ignore_color``.

        Raises:
            DatasetError: ``raw`` is not an 8-bit RGB(A) mask, or holds a colour that is neither a
                class's nor ``ignore_color`` (after thresholding, with ``threshold``).
        """
        raw = np.asarray(raw)
        if raw.ndim != 3 or raw.shape[2] not in (3, 4):
            channels = 1 if raw.ndim == 2 else raw.shape[2]
            raise DatasetError(path, f"mask has {channels} channel(s) but the palette encoding reads RGB masks")
        if raw.dtype != np.uint8:
            raise DatasetError(path, f"RGB mask has dtype {raw.dtype}; colour-coded masks must be 8-bit")
        rgb = raw[:, :, :3]
        if self.threshold is not None:
            rgb = np.where(rgb >= self.threshold, np.uint8(255), np.uint8(0))
        labels, unknown = rgb_to_index(rgb, self._lookup)
        if unknown.any():
            window = window or Window(0, 0, *labels.shape)
            first, where = _where(unknown, window)
            colour = tuple(int(v) for v in raw.reshape(-1, raw.shape[2])[first, :3])
            seen = colour
            if self.threshold is not None:
                seen = tuple(int(v) for v in rgb.reshape(-1, 3)[first])
                colour = f"{colour} (thresholded at {self.threshold}: {seen})"
            known = [tuple(int(v) for v in c) for c in self._lookup]
            listed = ", ".join(str(c) for c in known[:10]) + (", ..." if len(known) > 10 else "")
            raise DatasetError(path, f"unknown mask colour {colour} {where}; the known colours are {listed}")
        if self.ignore_color is not None:
            labels[labels == self.num_classes] = self.ignore_index
        return labels

    def to_dict(self):
        """Plain description (see ``LabelEncoding.to_dict``).

        Returns:
            ``{"type": "palette", "palette", "ignore_color", "ignore_index", "threshold"}``, colours as lists.
        """
        return {
            "type": self.kind,
            "palette": self.palette.tolist(),
            "ignore_color": None if self.ignore_color is None else list(self.ignore_color),
            "ignore_index": self.ignore_index,
            "threshold": self.threshold,
        }


class LookupEncoding(LabelEncoding):
    """Stored value ``v`` (0..255) means class ``lut[v]``; ``ignore_index`` entries are not scored.

    E.g. Cityscapes' labelIds -> the 19 trainIds, everything else -> 255.

    Args:
        lut: 256 integers in 0..255, the class id (or ``ignore_index``) of each stored value.
        ignore_index: the table entry that marks values not scored.
        num_classes: number of classes; None: the largest non-ignore entry + 1.

    Raises:
        ValueError: the table is not 256 integers in 0..255, ``num_classes`` is smaller than
            the table needs, or ``ignore_index`` is a class id.
    """

    kind = "lookup"

    def __init__(self, lut, ignore_index: int = IGNORE_INDEX, num_classes: int | None = None):
        table = np.asarray(lut)
        if table.shape != (256,):
            raise ValueError(f"a lookup table has 256 entries (one per uint8 value), got shape {table.shape}")
        if table.dtype.kind not in "ui" or table.min() < 0 or table.max() > 255:
            raise ValueError("lookup table entries must be integers in 0..255")
        self.lut = table.astype(np.uint8)
        used = self.lut[self.lut != ignore_index]
        derived = int(used.max()) + 1 if used.size else 1
        self.num_classes = derived if num_classes is None else int(num_classes)
        if self.num_classes < derived:
            raise ValueError(f"num_classes {num_classes} is smaller than the table's largest class id + 1 ({derived})")
        self._check_ignore(self.num_classes, int(ignore_index))
        self.ignore_index = int(ignore_index)

    def encode(self, raw, *, path=None, window=None):
        """The table entry of each stored value (see ``LabelEncoding.encode``).

        Args:
            raw: the decoded mask pixels, ``(h, w)`` or ``(h, w, 1)`` integers.
            path: the mask file, for error messages.
            window: the image window ``raw`` covers, for error messages.

        Returns:
            ``(h, w)`` uint8 class ids (or ``ignore_index``).

        Raises:
            DatasetError: ``raw`` is not a 1-channel integer mask, or holds a value outside 0..255.
        """
        values = _one_band(np.asarray(raw), self, path)
        if values.dtype != np.uint8 and values.size and (int(values.max()) > 255 or int(values.min()) < 0):
            bad = (values > 255) | (values < 0)
            first, where = _where(bad, window or Window(0, 0, *values.shape))
            raise DatasetError(
                path, f"mask value {int(values.flat[first])} {where} is outside the lookup table (0..255)"
            )
        return self.lut[values]

    def to_dict(self):
        """Plain description (see ``LabelEncoding.to_dict``).

        Returns:
            ``{"type": "lookup", "lut": [256 ints], "ignore_index", "num_classes"}``.
        """
        return {
            "type": self.kind,
            "lut": self.lut.tolist(),
            "ignore_index": self.ignore_index,
            "num_classes": self.num_classes,
        }


class BinaryEncoding(LabelEncoding):
    """Grey values ``>= threshold`` are class 1, others class 0 (Inria's 0/255 building masks).

    No pixel is ``ignore_index``; it is kept so that losses and metrics know which value to skip.

    Args:
        threshold: the least grey value of class 1: an integer, at least 1 and at most the largest
            value of the masks' dtype (255 for uint8 masks; checked by ``encode``).
        ignore_index: the value reported as not scored, 2..255.

    Raises:
        ValueError: ``threshold`` is not an integer >= 1, or ``ignore_index`` is out of range.
    """

    kind = "binary"
    num_classes = 2

    def __init__(self, threshold: int = 128, ignore_index: int = IGNORE_INDEX):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")
        self._check_ignore(2, int(ignore_index))
        self.threshold = int(threshold)
        self.ignore_index = int(ignore_index)

    def encode(self, raw, *, path=None, window=None):
        """1 where ``raw >= threshold``, else 0 (see ``LabelEncoding.encode``).

        Args:
            raw: the decoded mask pixels, ``(h, w)`` or ``(h, w, 1)`` integers (or bool).
            path: the mask file, for error messages.
            window: unused (no value is unknown to this encoding).

        Returns:
            ``(h, w)`` uint8 class ids 0 and 1.

        Raises:
            DatasetError: ``raw`` is not a 1-channel integer mask, or ``threshold`` is above the
                largest value its dtype holds (every pixel would be class 0).
        """
        raw = np.asarray(raw)
        values = _one_band(raw, self, path)
        top = 1 if raw.dtype == bool else int(np.iinfo(values.dtype).max)
        if self.threshold > top:
            raise DatasetError(
                path,
                f"binary threshold {self.threshold} is outside the range of this {raw.dtype} mask "
                f"(values 0..{top}), so every pixel would be class 0; use a threshold in 1..{top}",
            )
        return (values >= self.threshold).view(np.uint8)

    def to_dict(self):
        """Plain description (see ``LabelEncoding.to_dict``).

        Returns:
            ``{"type": "binary", "threshold": ..., "ignore_index": ...}``.
        """
        return {"type": self.kind, "threshold": self.threshold, "ignore_index": self.ignore_index}


class LabelSource(ImageSource):
    """A mask file read as class ids: a 1-channel uint8 ``ImageSource``.

    ``read`` / ``thumbnail`` decode the raw window (resampled with nearest neighbour
    by the raw source, which commutes with the per-pixel encodings) and encode it.
    Labels are never averaged: the ``resample`` argument is accepted for
    compatibility with ``ImageSource`` and always treated as ``"nearest"``.
    A paletted (1-channel) PNG read with a ``PaletteEncoding`` is first expanded
    through the file's own palette. Masks are read as palette indices: a paletted
    ``raw`` opened with its colours (``open_image``'s default) is reopened with
    ``palette="indices"``.

    Args:
        raw: the mask file, opened as an image (``open_image``); closed by ``close``.
        encoding: how ``raw`` stores classes.

    Raises:
        DatasetError: ``raw`` has the wrong number of channels for ``encoding``.
    """

    def __init__(self, raw: ImageSource, encoding: LabelEncoding):
        if getattr(raw, "palette_mode", None) == "colors" and getattr(raw, "palette", None) is not None:
            raw, colours = raw.with_palette("indices"), raw  # masks keep their palette indices
            colours.close()
        self.raw = raw
        self.encoding = encoding
        self.path = raw.path
        self._colours = None
        raw_palette = getattr(raw, "palette", None)
        if encoding.raw_channels == 3 and raw.channels == 1 and raw_palette is not None:
            colours = np.zeros((256, 3), dtype=np.uint8)
            palette = as_palette(raw_palette)[:256]
            colours[: len(palette)] = palette
            self._colours = colours
        elif encoding.raw_channels == 3 and raw.channels not in (3, 4):
            raise DatasetError(
                self.path, f"mask has {raw.channels} channel(s) but the {encoding.kind} encoding reads RGB masks"
            )
        elif encoding.raw_channels == 1 and raw.channels != 1:
            raise DatasetError(
                self.path,
                f"mask has {raw.channels} channels but the {encoding.kind} encoding reads 1-channel masks "
                "(colour-coded masks need a palette / mask_encoding: rgb)",
            )

    @property
    def height(self) -> int:
        """Rows of the mask."""
        return self.raw.height

    @property
    def width(self) -> int:
        """Columns of the mask."""
        return self.raw.width

    @property
    def channels(self) -> int:
        """Always 1: one class id per pixel."""
        return 1

    @property
    def dtype(self) -> np.dtype:
        """Always uint8."""
        return np.dtype(np.uint8)

    @property
    def geo_tags(self):
        """The raw mask file's GeoTIFF georeferencing (see ``ImageSource.geo_tags``)."""
        return self.raw.geo_tags

    def _encode(self, raw: np.ndarray, window: Window) -> np.ndarray:
        if self._colours is not None:
            raw = self._colours[_one_band(raw, self.encoding, self.path)]
        return self.encoding.encode(raw, path=self.path, window=window)[:, :, None]

    def read(self, window=None, out_size=None, resample="nearest"):
        """Class ids of ``window`` (see ``ImageSource.read``), resampled with nearest neighbour.

        Args:
            window: the region to read; None: the whole mask.
            out_size: ``(h, w)`` to resample to; None: the window's own size.
            resample: ignored: labels are always resampled with ``"nearest"``.

        Returns:
            ``(h, w, 1)`` uint8 class ids.

        Raises:
            DatasetError: the window holds a value the encoding does not know.
        """
        window = self.bounds if window is None else window
        return self._encode(self.raw.read(window, out_size, resample="nearest"), window)

    def thumbnail(self, max_side, resample="nearest"):
        """The whole mask's class ids with the longer side scaled to ``max_side`` (nearest neighbour).

        Args:
            max_side: the longer side of the result, in pixels.
            resample: ignored: labels are always resampled with ``"nearest"``.

        Returns:
            ``(h, w, 1)`` uint8 class ids.

        Raises:
            DatasetError: the mask holds a value the encoding does not know.
        """
        return self._encode(self.raw.thumbnail(max_side, resample="nearest"), self.bounds)

    def close(self) -> None:
        """Close the raw mask file."""
        self.raw.close()
