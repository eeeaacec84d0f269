"""A detector's prediction of one image, written as COCO results json, GeoJSON and an overview PNG.

:func:`predict_detections` runs a :class:`~gigaseg.inference.contract.DetectionPredictor` on an
image (the predictor bounds the memory: the sliced one reads tiles band by band, the whole-image
one a downsampled view) and writes what ``gigaseg predict`` promises for a detector:
``<stem>.json`` (COCO results), ``<stem>.geojson`` (box polygons, in map coordinates when the
image is georeferenced) and, when asked, ``<stem>_overlay.png`` (boxes on the overview), each
atomically (``gigaseg.io.detections``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..geometry import Detections
from ..io.base import ImageSource
from ..io.detections import write_coco_results, write_detection_overlay_png, write_detections_geojson
from .contract import DetectionPredictor
from .partial_detections import PartialDetections

__all__ = ["DetectionResult", "detection_outputs", "predict_detections"]


@dataclass
class DetectionResult:
    """What :func:`predict_detections` did.

    Attributes:
        detections: the image's detections (full-resolution pixels).
        height: image height in pixels.
        width: image width in pixels.
        seconds: wall time of the prediction and the writing.
        json_path: the COCO results json, or None when nothing was written.
        geojson_path: the GeoJSON, or None.
        overlay_path: the overview PNG with the boxes, when asked for.
    """

    detections: Detections
    height: int
    width: int
    seconds: float
    json_path: Path | None = None
    geojson_path: Path | None = None
    overlay_path: Path | None = None

    @property
    def megapixels_per_second(self) -> float:
        """Image megapixels per wall-clock second."""
        return self.height * self.width / 1e6 / max(self.seconds, 1e-9)


def detection_outputs(stem_path: Path) -> tuple[Path, Path, Path]:
    """The files a detector's prediction writes for an output stem.

    Args:
        stem_path: the output path without its meaning (``OUT/<name>.tif`` or ``OUT/<name>``); its
            suffix is replaced.

    Returns:
        ``(<name>.json, <name>.geojson, <name>_overlay.png)`` next to it.
    """
    stem_path = Path(stem_path)
    base = stem_path.with_suffix("") if stem_path.suffix.lower() in (".tif", ".tiff", ".json") else stem_path
    return (
        base.with_name(base.name + ".json"),
        base.with_name(base.name + ".geojson"),
        base.with_name(base.name + "_overlay.png"),
    )


def predict_detections(
    predictor: DetectionPredictor,
    source: ImageSource,
    out: str | Path | None,
    *,
    classes: Sequence[str],
    category_ids: Sequence[int] | None = None,
    palette=None,
    image_id: int = 1,
    overlay: bool = False,
    partial: PartialDetections | None = None,
) -> DetectionResult:
    """Detect the objects of ``source`` and write them next to ``out``.

    Args:
        predictor: the detector's predictor.
        source: the image (opened lazily).
        out: the output stem (see :func:`detection_outputs`); None writes nothing.
        classes: the class names.
        category_ids: the COCO category id of each class; None: ``1..len(classes)``.
        palette: one RGB colour per class (GeoJSON colours, overlay outlines).
        image_id: the image's id in the COCO results.
        overlay: also write the overview PNG with the boxes.
        partial: a store of finished bands (opened) the predictor resumes from and saves to;
            it is removed once the outputs are written.

    Returns:
        The :class:`DetectionResult`.
    """
    start = time.perf_counter()
    ids = list(range(1, len(classes) + 1)) if category_ids is None else [int(c) for c in category_ids]
    detections = predictor.predict(source) if partial is None else predictor.predict(source, partial=partial)
    result = DetectionResult(detections, source.height, source.width, 0.0)
    if out is not None:
        from ..io.detections import coco_results

        json_path, geojson_path, overlay_path = detection_outputs(Path(out))
        result.json_path = write_coco_results(json_path, coco_results(detections, image_id, ids))
        result.geojson_path = write_detections_geojson(
            geojson_path, detections, classes, source=source, category_ids=ids, palette=palette
        )
        if overlay:
            result.overlay_path = write_detection_overlay_png(overlay_path, source, detections, palette)
    if partial is not None:
        partial.discard()
    result.seconds = time.perf_counter() - start
    return result
