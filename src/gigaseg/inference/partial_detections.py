"""The finished bands of an interrupted detection, kept next to its outputs so a rerun resumes.

A sliced detector (``gigaseg.inference.sliced.SlicedDetectionPredictor``) reads its tiles one
row band at a time. With a :class:`PartialDetections` store it saves each finished band's
raw detections (before the cross-tile merge) as ``band_<index>.npz`` in the hidden folder
``.<name>.json.bands`` beside the results json, and a rerun skips those bands (their pixels
are not even read). The store's ``meta.json`` holds the prediction's fingerprint (input image,
weights, options, normalisation, precision, tiles per pass: see
``gigaseg.inference.fingerprint``): a store made by anything else is refused, never mixed in.
Every file is written under a temporary name and renamed, so a kill leaves whole bands only;
the folder is removed once the outputs are written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import GigasegError
from ..geometry import Detections

__all__ = ["PartialDetections"]

FORMAT = "gigaseg-detection-bands"
VERSION = 1


class PartialDetections:
    """A folder of finished bands' detections for the output ``json_path``.

    Args:
        json_path: the COCO results json the prediction writes.
        producer: the prediction's fingerprint.
        height: the image's height in pixels.
        width: the image's width in pixels.
        resume: keep the bands of an earlier run made by the same ``producer``; False starts afresh.

    Attributes:
        folder: ``.<json name>.bands`` beside ``json_path``.
        finished: band index -> that band's detections, for the bands found at :meth:`open`.
    """

    def __init__(self, json_path: str | os.PathLike, *, producer: str, height: int, width: int, resume: bool = True):
        json_path = Path(json_path)
        self.folder = json_path.with_name(f".{json_path.name}.bands")
        self.meta = {"format": FORMAT, "version": VERSION, "producer": producer, "height": height, "width": width}
        self.resume = bool(resume)
        self.finished: dict[int, Detections] = {}

    @property
    def _meta_path(self) -> Path:
        return self.folder / "meta.json"

    def open(self) -> PartialDetections:
        """Load the finished bands of an earlier run (when resuming) or start an empty store.

        Returns:
            This store.

        Raises:
            GigasegError: the folder holds bands made by another producer, or an unreadable
                ``meta.json`` or band file; the message says to rerun with ``--restart``.
        """
        where = f"{self.folder}: cannot resume the detections from it"
        if self.resume and self._meta_path.is_file():
            try:
                found = json.loads(self._meta_path.read_text())
            except (OSError, ValueError) as error:
                raise GigasegError(f"{where}: unreadable meta.json ({error}); rerun with --restart") from None
            if any(found.get(key) != self.meta[key] for key in ("format", "version", "height", "width")):
                raise GigasegError(
                    f"{where}: it holds bands of a {found.get('height')}x{found.get('width')} image, not "
                    f"{self.meta['height']}x{self.meta['width']}; rerun with --restart (resume=False)"
                )
            if found.get("producer") != self.meta["producer"]:
                raise GigasegError(
                    f"{where}: its bands were made from another input image, by another model, other options "
                    f"or other settings; rerun with --restart (resume=False) to start afresh, or with what made them"
                )
            for path in sorted(self.folder.glob("band_*.npz")):
                self.finished[_band_index(path, where)] = _read_band(path, where)
            return self
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        _write_atomically(self._meta_path, json.dumps(self.meta, indent=1).encode())
        return self

    def save(self, band: int, found: Detections) -> None:
        """Keep one finished band's raw detections (written under a temporary name, then renamed).

        Args:
            band: the band's index (its row of tiles, from the top).
            found: its tiles' detections in full-resolution pixels.
        """
        path = self.folder / f"band_{int(band):06d}.npz"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, boxes=found.boxes, scores=found.scores, labels=found.labels)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def discard(self) -> None:
        """Remove the folder (the outputs are written; nothing is left to resume)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _band_index(path: Path, where: str) -> int:
    try:
        return int(path.stem.removeprefix("band_"))
    except ValueError:
        raise GigasegError(f"{where}: {path.name} is not a band file; rerun with --restart") from None


def _read_band(path: Path, where: str) -> Detections:
    try:
        with np.load(path, allow_pickle=False) as data:
            return Detections(
                data["boxes"].astype(np.float32), data["scores"].astype(np.float32), data["labels"].astype(np.int64)
            )
    except (OSError, ValueError, KeyError) as error:
        raise GigasegError(f"{where}: {path.name} is unreadable ({error}); rerun with --restart") from None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
