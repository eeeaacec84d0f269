"""Label masks as OME-Zarr: OME-NGFF 0.5 multiscale labels on Zarr v3, filled band by band by any number of writers.

The store ``<name>.ome.zarr`` is a label image at its root, what ome-zarr-py's ``Reader`` and
napari's OME-Zarr plugin open as labels::

    zarr.json            group; attributes {"ome": {"version": "0.5", "multiscales": [...],
                         "image-label": {"colors": [...], "properties": [...]}}}
    0/ 1/ 2/ ...         uint8 labels (y, x); level k has ceil(size / 2**k) pixels a side, made from
                         level k - 1 by 2x2 mode (ties go to the top-left pixel, so a block without a
                         majority keeps the nearest-neighbour label); levels stop before the longer side
                         drops below one chunk (as the TIFF mask's pyramid does)
    probabilities/       optional: the class probabilities, float16 (c, y, x), one level, an NGFF
                         image of its own ("multiscales" with a channel axis)

``image-label`` holds each class's colour (``colors``: ``label-value`` and ``rgba``) and name
(``properties``: ``label-value`` and ``class``). Georeferencing has no place in NGFF 0.5: the
scale is in pixels (the TIFF mask keeps the GeoTIFF tags).

Concurrent writers without locks: level 0 is cut in ``chunk x chunk`` chunks (no sharding), a band
is ``chunk`` rows of the whole width, and every band is written by one writer at a time, so two
writers never touch one chunk file. Zarr's local store writes each chunk file under a temporary
name and renames it; :meth:`OmeZarrMaskWriter.write_band` then flushes the band's chunk files and
records the band as done with a marker file of its own (no shared progress file to lose updates
to). Writing a band again writes the same bytes, so a unit of work that dies half-way is simply
redone.

While it is made the store is ``.<name>.ome.zarr.partial`` next to the final name, with its
settings and the done markers in ``.gigaseg/`` inside it; :meth:`OmeZarrMaskWriter.close` writes
the reduced levels (streamed: a band of ``2 * chunk`` rows and at most ``_PYRAMID_COLUMNS``
columns at a time), the metadata, drops ``.gigaseg/`` and renames the store into place. So the
store under its final name is complete, and a killed run resumes from the bands it finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import GigasegError
from ..geometry import Window
from .atomic import _fsync_file, _fsync_folder, _fsync_tree, partial_path
from .writers import _checked_palette, pyramid_shapes

__all__ = [
    "NGFF_VERSION",
    "OME_ZARR_SUFFIX",
    "OmeZarrMaskWriter",
    "mode_downsample2",
    "ome_zarr_path",
    "read_label_metadata",
]

#: the OME-NGFF version written (Zarr v3; ome-zarr-py reads it from 0.18 on)
NGFF_VERSION = "0.5"
OME_ZARR_SUFFIX = ".ome.zarr"
#: folder inside a store being made: meta.json and done/<top> markers
_STATE = ".gigaseg"
_FORMAT = "gigaseg-ome-zarr-bands"
#: level-k columns downsampled at once when the pyramid is built (a multiple of any chunk side used)
_PYRAMID_COLUMNS = 4096
#: name of the probability image inside the store
PROBABILITIES = "probabilities"


def ome_zarr_path(mask: str | os.PathLike) -> Path:
    """The OME-Zarr store of a mask: ``<stem>.ome.zarr`` next to the mask's TIFF name.

    Args:
        mask: the mask's TIFF path (``scene.tif``), or the store's own path (returned as it is).

    Returns:
        ``<folder>/<stem>.ome.zarr``.
    """
    mask = Path(mask)
    if mask.name.lower().endswith(".zarr"):
        return mask
    return mask.with_name(f"{mask.stem}{OME_ZARR_SUFFIX}")


def mode_downsample2(labels: np.ndarray) -> np.ndarray:
    """Halve a label array by the most frequent label of each 2x2 block.

    Ties go to the first of top-left, top-right, bottom-left, bottom-right that has the top count,
    so a block whose four labels differ keeps its top-left one (the nearest-neighbour choice). An
    odd last row or column is paired with itself (edge replication).

    Args:
        labels: ``(h, w)`` integer labels.

    Returns:
        ``(ceil(h / 2), ceil(w / 2))`` labels of the same dtype.
    """
    h, w = labels.shape
    if h % 2 or w % 2:
        labels = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    a, b = labels[0::2, 0::2], labels[0::2, 1::2]
    c, d = labels[1::2, 0::2], labels[1::2, 1::2]
    ab, ac, ad, bc, bd, cd = a == b, a == c, a == d, b == c, b == d, c == d
    # how many of the four equal each one (itself included), in uint8
    votes = [
        1 + ab.view(np.uint8) + ac.view(np.uint8) + ad.view(np.uint8),
        1 + ab.view(np.uint8) + bc.view(np.uint8) + bd.view(np.uint8),
        1 + ac.view(np.uint8) + bc.view(np.uint8) + cd.view(np.uint8),
        1 + ad.view(np.uint8) + bd.view(np.uint8) + cd.view(np.uint8),
    ]
    out, best = a.copy(), votes[0]
    for candidate, count in zip((b, c, d), votes[1:]):
        better = count > best
        out[better] = candidate[better]
        best = np.maximum(best, count)
    return out


def read_label_metadata(path: str | os.PathLike) -> dict:
    """The ``ome`` attributes of a finished store (for tools that do not bring an NGFF reader).

    Args:
        path: the ``.ome.zarr`` store.

    Returns:
        The ``ome`` attributes: ``version``, ``multiscales``, ``image-label``.

    Raises:
        GigasegError: the store is missing or has no OME-NGFF metadata.
    """
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
        return meta["attributes"]["ome"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GigasegError(f"{path}: not an OME-Zarr store written by gigaseg ({error})") from None


class OmeZarrMaskWriter:
    """Collects label bands (and block probabilities) of a ``height x width`` mask into an OME-Zarr store.

    Made by the process that plans a prediction (``OmeZarrMaskWriter(path, ...)``: it creates or
    resumes the store under its partial name); the processes that fill it open it with
    :meth:`attach`. ``write_band(top, labels)`` takes a band of :attr:`band_height` rows (shorter
    at the bottom) whose ``top`` is a multiple of it, in any order, from any process;
    ``write_probabilities(window, probs)`` takes the probabilities of a chunk-aligned window and
    must come before its band's labels (the band's marker covers both). ``close()`` checks every
    band arrived and finishes the store (see the module docstring).

    Args:
        path: the final store (``<stem>.ome.zarr``).
        height: rows of the mask.
        width: columns of the mask.
        palette: ``(N, 3)`` class colours (N <= 256), written as ``image-label`` ``colors``; None for none.
        class_names: written as ``image-label`` ``properties`` (``class``); None for none.
        chunk: chunk side of every level and height of a band, a positive multiple of 16.
        num_classes: also keep the class probabilities (float16) of this many classes; None for none.
        resume: continue from the bands of an existing partial store; otherwise (or without one)
            start a fresh, empty one (an old one is deleted).
        producer: fingerprint of what makes the bands; a resume requires the same one.
        name: the multiscale image's name in the metadata (the input's stem); None: the store's stem.

    Raises:
        ValueError: a bad size, ``chunk`` or palette.
        GigasegError: resuming a partial store that is unreadable, holds another size, band height
            or probabilities, or was made by another ``producer``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        height: int,
        width: int,
        *,
        palette=None,
        class_names: Iterable[str] | None = None,
        chunk: int = 512,
        num_classes: int | None = None,
        resume: bool = False,
        producer: str | None = None,
        name: str | None = None,
    ):
        if height <= 0 or width <= 0:
            raise ValueError(f"cannot write a mask of size {height}x{width}")
        if chunk <= 0 or chunk % 16:
            raise ValueError(f"chunk must be a positive multiple of 16, got {chunk}")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.path = Path(path)
        self.meta = {
            "format": _FORMAT,
            "version": 1,
            "height": int(height),
            "width": int(width),
            "band_height": int(chunk),
            "num_classes": None if num_classes is None else int(num_classes),
            "producer": producer,
            "palette": None if palette is None else _checked_palette(palette).tolist(),
            "class_names": None if class_names is None else [str(n) for n in class_names],
            "name": name if name is not None else self.path.name.removesuffix(OME_ZARR_SUFFIX),
        }
        self._open_state()
        if resume and self._meta_path.exists():
            self._resume()
        else:
            self._start()
        self._open_arrays()

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def attach(cls, path: str | os.PathLike) -> OmeZarrMaskWriter:
        """Open the partial store of ``path`` that another process made, to write bands into it.

        Args:
            path: the final store's path.

        Returns:
            A writer over the existing partial store.

        Raises:
            GigasegError: no partial store is there (it was finished, discarded or never made).
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        self._open_state()
        try:
            self.meta = json.loads(self._meta_path.read_text())
        except (OSError, ValueError) as error:
            raise GigasegError(f"{self.path}: no store being made at {self.partial} ({error})") from None
        self._open_arrays()
        return self

    def _open_state(self) -> None:
        self.partial = partial_path(self.path)
        self._state = self.partial / _STATE
        self._meta_path = self._state / "meta.json"
        self._done_dir = self._state / "done"
        self._closed = False

    def _start(self) -> None:
        import zarr

        shutil.rmtree(self.partial, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        chunk = self.band_height
        root.create_array(
            "0",
            shape=(self.height, self.width),
            chunks=(chunk, chunk),
            dtype="uint8",
            fill_value=0,
            dimension_names=["y", "x"],
        )
        if self.num_classes is not None:
            probs = root.create_group(PROBABILITIES)
            probs.create_array(
                "0",
                shape=(self.num_classes, self.height, self.width),
                chunks=(self.num_classes, chunk, chunk),
                dtype="float16",
                fill_value=0,
                dimension_names=["c", "y", "x"],
            )
        self._done_dir.mkdir(parents=True)
        tmp = self._meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(self.meta))
        _fsync_file(tmp)
        os.replace(tmp, self._meta_path)  # last: a store without meta.json is never resumed
        _fsync_folder(self._state)

    def _resume(self) -> None:
        where = f"{self.path}: cannot resume from {self.partial}"
        try:
            found = json.loads(self._meta_path.read_text())
        except (OSError, ValueError) as error:
            raise GigasegError(f"{where}: unreadable {self._meta_path.name} ({error}); rerun with --restart") from None
        shape = ("format", "version", "height", "width", "band_height", "num_classes")
        if any(found.get(k) != self.meta[k] for k in shape):
            raise GigasegError(
                f"{where}: it holds a {found.get('height')}x{found.get('width')} mask in "
                f"{found.get('band_height')}-row bands with probabilities of {found.get('num_classes')} classes, "
                f"not {self.height}x{self.width} in {self.band_height}-row bands with {self.num_classes}; "
                f"rerun with --restart (resume=False)"
            )
        if found.get("producer") != self.meta["producer"]:
            raise GigasegError(
                f"{where}: its finished bands were made from another input image, by another model, other "
                f"options or other settings; rerun with --restart (resume=False) to start afresh, or with what "
                f"made them"
            )
        self._done_dir.mkdir(exist_ok=True)
        bad = [name for name in os.listdir(self._done_dir) if not (name.isdigit() and int(name) in self._tops())]
        if bad:
            raise GigasegError(f"{where}: it lists bands that do not exist ({', '.join(sorted(bad)[:4])})")

    def _open_arrays(self) -> None:
        import zarr

        try:
            root = zarr.open_group(str(self.partial), mode="r+", zarr_format=3)
            self._labels = root["0"]
            self._probs = root[PROBABILITIES]["0"] if self.num_classes is not None else None
        except (KeyError, FileNotFoundError, ValueError) as error:
            raise GigasegError(f"{self.path}: damaged store {self.partial} ({error}); rerun with --restart") from None
        if self._labels.shape != (self.height, self.width):
            raise GigasegError(f"{self.path}: {self.partial} holds a {self._labels.shape} array, expected its meta's")

    # -- geometry -----------------------------------------------------------------------

    @property
    def height(self) -> int:
        """Rows of the mask."""
        return self.meta["height"]

    @property
    def width(self) -> int:
        """Columns of the mask."""
        return self.meta["width"]

    @property
    def band_height(self) -> int:
        """Rows per band: the chunk side (the last band may be shorter)."""
        return self.meta["band_height"]

    @property
    def num_classes(self) -> int | None:
        """Classes of the probabilities kept, or None."""
        return self.meta["num_classes"]

    @property
    def producer(self) -> str | None:
        """The fingerprint the store's bands were made under."""
        return self.meta["producer"]

    def _tops(self) -> range:
        return range(0, self.height, self.band_height)

    @property
    def band_tops(self) -> list[int]:
        """Top row of every band, in order."""
        return list(self._tops())

    @property
    def done_bands(self) -> list[int]:
        """Tops of the bands already stored (sorted)."""
        if self._closed or not self._done_dir.is_dir():
            return []
        return sorted(int(name) for name in os.listdir(self._done_dir) if name.isdigit())

    @property
    def missing_bands(self) -> list[int]:
        """Tops of the bands not stored yet, in order."""
        done = set(self.done_bands)
        return [top for top in self._tops() if top not in done]

    def is_done(self, top: int) -> bool:
        """Whether the band starting at row ``top`` is stored.

        Args:
            top: the band's top row.

        Returns:
            True when its marker exists.
        """
        return (self._done_dir / str(top)).exists()

    def band_window(self, top: int) -> Window:
        """The window of the band starting at ``top`` (full width).

        Args:
            top: the band's top row, a multiple of :attr:`band_height`.

        Returns:
            ``Window(top, 0, rows, width)``.

        Raises:
            ValueError: ``top`` is not a band's top row.
        """
        if top not in self._tops():
            raise ValueError(f"band top must be a multiple of {self.band_height} in 0..{self.height - 1}, got {top}")
        return Window(top, 0, min(self.band_height, self.height - top), self.width)

    # -- writing ------------------------------------------------------------------------

    def _writable(self) -> None:
        if self._closed:
            raise ValueError(f"OmeZarrMaskWriter for {self.path} is closed")

    def write_probabilities(self, window: Window, probs: np.ndarray) -> None:
        """Store the class probabilities of a window (stored as float16).

        Args:
            window: a window whose top and left are multiples of the chunk side (a block of the
                streaming driver), so it covers whole chunks but at the image's border.
            probs: ``(num_classes, window.height, window.width)`` probabilities.

        Raises:
            ValueError: the store keeps no probabilities, the writer is closed, or the window is
                not chunk-aligned or the array has the wrong shape.
        """
        self._writable()
        if self._probs is None:
            raise ValueError(f"{self.path}: this store keeps no probabilities (num_classes=None)")
        chunk = self.band_height
        if window.top % chunk or window.left % chunk:
            raise ValueError(f"window {window} does not start on a {chunk}-px chunk corner")
        if probs.shape != (self.num_classes, window.height, window.width):
            raise ValueError(f"probabilities of {window} must have shape {(self.num_classes, *window.shape)}")
        self._probs[:, window.top : window.bottom, window.left : window.right] = probs.astype(np.float16)

    def write_band(self, top: int, labels: np.ndarray) -> None:
        """Store a band's labels durably (its chunk files flushed), then mark it done.

        A band written again is overwritten with what is given.

        Args:
            top: the band's top row, a multiple of :attr:`band_height`.
            labels: ``(rows, width)`` uint8 labels of the band (see :meth:`band_window`).

        Raises:
            ValueError: the writer is closed, ``top`` is not a band's top row, or the labels have
                the wrong shape or dtype.
        """
        self._writable()
        window = self.band_window(top)
        labels = np.asarray(labels)
        if labels.shape != window.shape or labels.dtype != np.uint8:
            raise ValueError(
                f"band at row {top} must be uint8 of shape {window.shape}, got {labels.dtype} {labels.shape}"
            )
        self._labels[window.top : window.bottom, :] = labels
        row = top // self.band_height
        folders = [self.partial / "0" / "c" / str(row)]
        if self._probs is not None:
            folders.append(self.partial / PROBABILITIES / "0" / "c" / "0" / str(row))
        for folder in folders:  # chunks equal to the fill value are not written: nothing to flush there
            if folder.is_dir():
                for name in os.listdir(folder):
                    _fsync_file(folder / name)
                _fsync_folder(folder)
        marker = self._done_dir / str(top)
        with open(marker, "wb") as handle:
            os.fsync(handle.fileno())
        _fsync_folder(self._done_dir)

    def labels(self, level: int = 0):
        """A level of the labels, as a zarr array (read it by slicing).

        Args:
            level: 0 for full resolution; reduced levels exist after :meth:`close` only.

        Returns:
            The ``zarr.Array``.
        """
        import zarr

        root = self.path if self._closed else self.partial
        return zarr.open_array(str(root / str(level)), mode="r", zarr_format=3)

    # -- finishing ------------------------------------------------------------------------

    def close(self) -> Path:
        """Check that every band arrived, write the reduced levels and metadata, rename the store into place.

        An existing store at :attr:`path` is replaced. Closing again does nothing.

        Returns:
            The store's path.

        Raises:
            GigasegError: bands are missing (the partial store is kept for a resume).
        """
        if self._closed:
            return self.path
        missing = self.missing_bands
        if missing:
            rows = ", ".join(f"{t}-{min(t + self.band_height, self.height) - 1}" for t in missing[:8])
            more = f" and {len(missing) - 8} more bands" if len(missing) > 8 else ""
            raise GigasegError(
                f"{self.path}: mask incomplete, {len(missing)} of {len(self._tops())} bands missing: rows {rows}{more} "
                f"were never written (finished bands are kept in {self.partial})"
            )
        import zarr

        root = zarr.open_group(str(self.partial), mode="r+", zarr_format=3)
        shapes = pyramid_shapes(self.height, self.width, self.band_height, 64)
        previous = self._labels
        for level, shape in enumerate(shapes[1:], start=1):
            array = root.create_array(
                str(level),
                shape=shape,
                chunks=(self.band_height, self.band_height),
                dtype="uint8",
                fill_value=0,
                dimension_names=["y", "x"],
                overwrite=True,  # a run killed while building the pyramid left it half made
            )
            _downsample_level(previous, array, self.band_height)
            previous = array
        root.attrs.update({"ome": self._label_metadata(len(shapes))})
        if self._probs is not None:
            root[PROBABILITIES].attrs.update({"ome": self._probability_metadata()})
        shutil.rmtree(self._state)
        _fsync_tree(self.partial)
        _replace_folder(self.partial, self.path)
        self._closed = True
        return self.path

    def _label_metadata(self, levels: int) -> dict:
        datasets = [
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [2.0**k, 2.0**k]}]}
            for k in range(levels)
        ]
        image_label: dict = {}
        palette, names = self.meta["palette"], self.meta["class_names"]
        if palette is not None:
            image_label["colors"] = [{"label-value": i, "rgba": [*colour, 255]} for i, colour in enumerate(palette)]
        if names is not None:
            image_label["properties"] = [{"label-value": i, "class": name} for i, name in enumerate(names)]
        return {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": self.meta["name"],
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": datasets,
                    "type": "mode",
                    "metadata": {
                        "description": "2x2 mode of the level above; ties to the top-left pixel",
                        "method": "gigaseg.io.omezarr.mode_downsample2",
                    },
                }
            ],
            "image-label": image_label,
        }

    def _probability_metadata(self) -> dict:
        return {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": f"{self.meta['name']} probabilities",
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space"},
                        {"name": "x", "type": "space"},
                    ],
                    "datasets": [
                        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}
                    ],
                }
            ],
        }

    def has_done_bands(self) -> bool:
        """Whether any band is stored (a failed run that stored none leaves nothing behind).

        Returns:
            True when at least one band's marker exists.
        """
        return bool(self.done_bands)

    def discard(self) -> None:
        """Delete the partial store (its finished bands are lost)."""
        self._closed = True
        shutil.rmtree(self.partial, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"OmeZarrMaskWriter({str(self.path)!r}, {self.height}x{self.width}, "
            f"{len(self.done_bands)}/{len(self._tops())} bands)"
        )


def _downsample_level(source, target, chunk: int) -> None:
    """Fill ``target`` (a level) with the 2x2 mode of ``source`` (the level above), a band of chunks at a time."""
    height, width = target.shape
    for top in range(0, height, chunk):
        rows = min(chunk, height - top)
        for left in range(0, width, _PYRAMID_COLUMNS):
            cols = min(_PYRAMID_COLUMNS, width - left)
            above = source[2 * top : 2 * (top + rows), 2 * left : 2 * (left + cols)]
            target[top : top + rows, left : left + cols] = mode_downsample2(np.asarray(above))


def _replace_folder(partial: Path, final: Path) -> None:
    """Rename ``partial`` to ``final``, replacing whatever is there; the old one is deleted after the rename."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.is_dir() and not final.is_symlink():
        os.replace(final, old)
    elif final.exists() or final.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
    os.replace(partial, final)
    _fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)
