"""Polygons of a label mask, streamed band by band into a GeoPackage or GeoJSON file.

Vectorising a 20000 x 20000 mask whole is a known pain (the array, its labels and every polygon
at once); here the mask is read one band of rows at a time from its tiled TIFF (rasterio), and only what is
still growing is kept:

1. each band's pixels of every kept class are split into 4-connected components
   (``scipy.ndimage.label``, one pass per class present), and each component becomes one
   polygon with its holes through GDAL's polygonizer (``rasterio.features.shapes`` on the
   component ids: a 4-connected component gives exactly one polygon);
2. a component whose pixels continue across the border into the next band is linked to the
   components it meets there (same class, side by side across the border), read straight off
   the two rows at the border; linked pieces form one region, however many bands it spans;
3. a region none of whose pieces reaches the current band's lower border is complete: its
   pieces, which tile it and meet along band borders, are merged by dropping their shared edges
   (``shapely.coverage_union_all``, which closes rings into polygons with holes), optionally
   cleaned (holes and polygons under ``min_area`` pixels, Douglas-Peucker simplification),
   moved from pixel to map coordinates, and appended to the output (``pyogrio``) in batches.

Memory holds one band (its classes and component ids), the polygons of the regions that touch
the band's lower border, and one batch of finished features: it grows with the outline of the
largest region still open, not with the image's area. GDAL's block cache is held to
:data:`GDAL_CACHE_MB` while the mask is read (by default it would keep every decoded tile).

The output is built under a temporary name and renamed into place when complete
(:func:`gigaseg.io.atomic.atomic_output`); the mask is only read.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ImageReadError
from .atomic import atomic_output
from .base import check_image_file

#: format name -> (GDAL driver, file extension)
VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "geojson": ("GeoJSON", ".geojson")}
#: extensions that name a format when none is given
_SUFFIXES = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson"}
#: rows of mask read and polygonised at once when the caller gives no band height
DEFAULT_BAND_ROWS = 512
#: finished polygons written per append
BATCH = 5000
#: GDAL's block cache while a mask is read, in MB (a band of 512-px tiles of a 20000-px wide mask is 10 MB)
GDAL_CACHE_MB = 64
#: attributes of every polygon, in the output's column order
FIELDS = ("class_id", "class_name", "pixels", "area", "color")


@dataclass
class VectorizeResult:
    """What :func:`vectorize_mask` wrote.

    Attributes:
        path: the output file.
        format: ``"gpkg"`` or ``"geojson"``.
        polygons: features written.
        per_class: class name -> ``{"polygons": n, "pixels": p}`` (pixels covered by its written
            polygons, before simplification), for every class with a polygon.
        crs: the output's CRS as a string (``"EPSG:32633"``, or WKT), None in pixel coordinates.
        bands: bands of rows the mask was read in.
        seconds: wall time.
        dropped: polygons left out because they were smaller than ``min_area`` (or simplified away).
    """

    path: Path
    format: str
    polygons: int
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    crs: str | None = None
    bands: int = 0
    seconds: float = 0.0
    dropped: int = 0


def vector_output(mask: str | os.PathLike, out: str | os.PathLike | None = None, fmt: str | None = None):
    """Where the polygons of ``mask`` go, and in which format.

    Args:
        mask: the mask TIFF.
        out: a file (its extension names the format when ``fmt`` is None), an existing folder
            (that gets ``<mask stem>.<ext>``), or None (next to the mask).
        fmt: ``"gpkg"``, ``"geojson"`` or None (from ``out``'s extension, else ``"gpkg"``).

    Returns:
        ``(path, format)``.

    Raises:
        ConfigError: an unknown format, an extension that contradicts ``fmt``, or an output that
            is the mask itself.
    """
    mask = Path(mask)
    if fmt is not None:
        fmt = str(fmt).lower()
        if fmt not in VECTOR_FORMATS:
            raise ConfigError(f"unknown vector format {fmt!r}; use one of {', '.join(VECTOR_FORMATS)}")
    stem = mask.name[: -len(mask.suffix)] if mask.suffix else mask.name
    if out is None or Path(out).is_dir():
        fmt = fmt or "gpkg"
        folder = mask.parent if out is None else Path(out)
        path = folder / f"{stem}{VECTOR_FORMATS[fmt][1]}"
    else:
        path = Path(out)
        named = _SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            fmt = named or "gpkg"
        elif named is not None and named != fmt:
            raise ConfigError(f"{path}: the extension says {named} but the format asked for is {fmt}")
    if os.path.realpath(path) == os.path.realpath(mask):
        raise ConfigError(f"{path}: is the mask itself; write the polygons somewhere else (--out)")
    return path, fmt


def check_polygon_options(simplify: float = 0.0, min_area: float = 0.0, skip_classes: Iterable = ()) -> None:
    """Check the polygon settings of :func:`vectorize_mask` before any work.

    Args:
        simplify: the simplification tolerance in pixels.
        min_area: the smallest polygon or hole kept, in pixels.
        skip_classes: class names or ids to leave out (checked against the mask later).

    Raises:
        ConfigError: a negative or non-finite tolerance or area.
    """
    for flag, value in (("--simplify", simplify), ("--min-area", min_area)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a non-negative number of pixels, got {value!r}")


def vectorize_mask(
    mask: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    format: str | None = None,
    simplify: float = 0.0,
    min_area: float = 0.0,
    skip_classes: Iterable[str | int] = (),
    class_names: list[str] | None = None,
    band_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VectorizeResult:
    """Write the polygons of every class of a label mask (see the module docstring).

    Each polygon is one 4-connected region of one class, with its holes, however many bands it
    spans. Coordinates are the mask's map coordinates (its GeoTIFF transform) and the output
    carries its CRS when it is georeferenced; otherwise they are pixel coordinates (x = column,
    y = row, origin at the top-left corner of the image, y growing downwards) and there is no CRS.

    Attributes: ``class_id``, ``class_name`` (from the names :class:`~gigaseg.io.writers.MaskWriter`
    stores, else ``class_<id>``), ``pixels`` (pixels the polygon covers, before simplification),
    ``area`` (of the written geometry, in the CRS's units squared, or pixels), ``color``
    (``#rrggbb`` from the mask's colour map, empty without one).

    Args:
        mask: a single-band integer label mask (e.g. what ``gigaseg predict`` writes).
        out: the output file or folder (see :func:`vector_output`).
        format: ``"gpkg"`` (GeoPackage, the default) or ``"geojson"``.
        simplify: Douglas-Peucker tolerance in pixels (topology of each polygon kept; neighbours
            are simplified independently, so their shared borders may part slightly); 0 keeps
            the exact pixel outlines.
        min_area: leave out polygons smaller than this many pixels, and fill holes smaller
            than it (what was inside went out with it), like a sieve; 0 keeps everything.
        skip_classes: class names or ids to leave out (e.g. ``["background"]``); every class is
            kept by default.
        class_names: names by class id, overriding the ones stored in the mask.
        band_rows: rows read and polygonised at once (default :data:`DEFAULT_BAND_ROWS`);
            memory grows with it, polygons are the same for every value.
        progress: ``progress(done, total)`` after each band.

    Returns:
        A :class:`VectorizeResult`.

    Raises:
        ImageReadError: the mask is missing, unreadable, truncated, or not a single-band
            integer raster.
        ConfigError: a bad format, output, tolerance, area, band height or skipped class.
    """
    start = time.perf_counter()
    mask = Path(mask)
    path, fmt = vector_output(mask, out, format)
    check_polygon_options(simplify, min_area)
    band_rows = DEFAULT_BAND_ROWS if band_rows is None else int(band_rows)
    if band_rows < 1:
        raise ConfigError(f"band_rows must be at least 1, got {band_rows}")
    check_image_file(str(mask))

    import rasterio

    stored_names, palette = _stored_metadata(mask)
    names = list(class_names) if class_names is not None else stored_names
    # every band is read once: GDAL's block cache (5% of the machine's memory by default) would only keep the
    # decoded mask, growing with the rows read
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                src = rasterio.open(mask)
        except rasterio.errors.RasterioError as error:
            raise ImageReadError(mask, f"not a readable raster ({_one_line(error)})") from None
        with src:
            if src.count != 1 or np.dtype(src.dtypes[0]).kind not in "ui":
                raise ImageReadError(
                    mask,
                    f"is not a label mask: {src.count} band(s) of {src.dtypes[0]}; polygons are made from "
                    f"single-band integer masks",
                )
            skip = _skipped_ids(skip_classes, names, mask)
            georeferenced = src.crs is not None or not src.transform.is_identity
            crs = None if src.crs is None else src.crs.to_string()
            transform = src.transform if georeferenced else None
            writer = _BatchWriter(path, fmt, crs)
            polygonizer = _Polygonizer(
                width=src.width,
                band_rows=band_rows,
                skip=skip,
                finish=lambda geom, class_id: writer.add(
                    geom, class_id, _name(names, class_id), _colour(palette, class_id), simplify, min_area, transform
                ),
            )
            total = -(-src.height // band_rows)
            with atomic_output(path) as tmp:
                tmp.unlink(missing_ok=True)  # a killed run's temporary file: start afresh, never append to it
                writer.open(tmp, layer=path.stem)
                for index, top in enumerate(range(0, src.height, band_rows)):
                    rows = min(band_rows, src.height - top)
                    classes = _read_band(src, mask, top, rows)
                    polygonizer.add_band(classes, top, last=top + rows >= src.height)
                    del classes
                    if progress is not None:
                        progress(index + 1, total)
                writer.close()
    return VectorizeResult(
        path=path,
        format=fmt,
        polygons=writer.written,
        per_class={_name(names, c): counts for c, counts in sorted(writer.per_class.items())},
        crs=crs,
        bands=total,
        seconds=time.perf_counter() - start,
        dropped=writer.dropped,
    )


# --------------------------------------------------------------------------- reading


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _stored_metadata(mask: Path) -> tuple[list[str] | None, np.ndarray | None]:
    """Class names and colour map a mask TIFF carries (None, None for another file type)."""
    import tifffile

    from .writers import mask_classes, mask_palette

    try:
        with tifffile.TiffFile(mask) as tif:
            return mask_classes(tif), mask_palette(tif)
    except Exception:  # noqa: BLE001 - not a TIFF (or a damaged one): rasterio tells what is wrong
        return None, None


def _read_band(src, mask: Path, top: int, rows: int) -> np.ndarray:
    """Rows ``top .. top + rows`` of the mask, full width."""
    import rasterio
    from rasterio.windows import Window

    try:
        return src.read(1, window=Window(0, top, src.width, rows))
    except rasterio.errors.RasterioError as error:
        raise ImageReadError(mask, f"cannot read rows {top}-{top + rows - 1} ({_one_line(error)})") from None


def _name(names: list[str] | None, class_id: int) -> str:
    if names is not None and 0 <= class_id < len(names) and names[class_id]:
        return names[class_id]
    return f"class_{class_id}"


def _colour(palette: np.ndarray | None, class_id: int) -> str:
    if palette is None or not 0 <= class_id < len(palette):
        return ""
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in palette[class_id]))


def _skipped_ids(skip: Iterable[str | int], names: list[str] | None, mask: Path) -> set[int]:
    """Class ids of ``skip`` (names, ids, or ids as text)."""
    ids = set()
    for item in skip:
        if isinstance(item, (int, np.integer)):
            ids.add(int(item))
        elif names is not None and str(item) in names:
            ids.add(names.index(str(item)))
        elif str(item).strip().isdigit():
            ids.add(int(str(item).strip()))
        else:
            known = ", ".join(names) if names else "none stored; use class ids"
            raise ConfigError(f"{mask}: no class {item!r} to skip (its classes: {known})")
    return ids


# --------------------------------------------------------------------------- band by band


class _Polygonizer:
    """Turns bands of class ids into finished polygons (see the module docstring, steps 1-3).

    Regions are kept in a union-find over integer ids: every component of a band gets a new id,
    linked to the ids of the regions it meets across the upper border. ``pieces[root]`` holds the
    pixel-coordinate polygons of a region still open.

    Args:
        width: columns of the mask.
        band_rows: rows per band (bands start at multiples of it).
        skip: class ids to leave out.
        finish: ``finish(polygon, class_id)`` for each complete region (pixel coordinates).
    """

    def __init__(self, width: int, band_rows: int, skip: set[int], finish: Callable[[object, int], None]):
        self.width = width
        self.band_rows = band_rows
        self.skip = skip
        self.finish = finish
        self.parent: dict[int, int] = {}
        self.pieces: dict[int, list] = {}
        self.region_class: dict[int, int] = {}
        self.next_id = 1
        self.border_ids: np.ndarray | None = None  # region id of each pixel of the last band's last row (0: none)
        self.border_classes: np.ndarray | None = None

    def _find(self, node: int) -> int:
        root = node
        while self.parent.get(root, root) != root:  # a node without an entry is its own root
            root = self.parent[root]
        while self.parent.get(node, node) != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def _union(self, a: int, b: int) -> int:
        a, b = self._find(a), self._find(b)
        if a == b:
            return a
        if len(self.pieces.get(a, ())) < len(self.pieces.get(b, ())):
            a, b = b, a
        self.parent[b] = a
        self.pieces.setdefault(a, []).extend(self.pieces.pop(b, []))
        return a

    def add_band(self, classes: np.ndarray, top: int, last: bool) -> None:
        """Polygonise one band, link it to the open regions above it, finish what is complete.

        Args:
            classes: ``(rows, width)`` class ids of the band.
            top: the band's first row in the mask.
            last: whether it is the mask's last band (everything open is complete after it).
        """
        import shapely
        from rasterio.features import shapes
        from rasterio.transform import Affine

        labels, label_class = _components(classes, self.skip)
        count = len(label_class) - 1
        ids = np.arange(self.next_id - 1, self.next_id + count, dtype=np.int64)  # label -> region id
        ids[0] = 0  # label 0: a skipped class, no region
        self.next_id += count
        self.region_class.update(zip(ids[1:].tolist(), label_class[1:].tolist()))

        roots = ids.copy()  # label -> region; only components in the band's first row can join a region above
        if self.border_ids is not None and count:
            # a component continues a region above when it shares a column at the border with it, in the same class
            first = labels[0]
            joined = (self.border_ids > 0) & (first > 0) & (self.border_classes == classes[0])
            if joined.any():
                pairs = np.unique(np.stack([self.border_ids[joined], ids[first[joined]]]), axis=1)
                for above, below in pairs.T:
                    self._union(int(above), int(below))
                touched = np.unique(first[joined])
                roots[touched] = [self._find(int(node)) for node in ids[touched]]

        if count:
            pieces = shapes(labels, mask=labels > 0, connectivity=4, transform=Affine.translation(0, top))
            for geometry, value in pieces:
                self.pieces.setdefault(int(roots[int(value)]), []).append(shapely.geometry.shape(geometry))

        if last:
            open_roots: set[int] = set()
            self.border_ids = self.border_classes = None
        else:
            self.border_ids = roots[labels[-1]]  # a region reaching the band's last row may go on below
            self.border_classes = classes[-1].copy()
            open_roots = set(np.unique(self.border_ids).tolist()) - {0}
        for root in [r for r in self.pieces if r not in open_roots]:
            parts = self.pieces.pop(root)
            self.finish(parts[0] if len(parts) == 1 else self._merge(parts), self.region_class[root])
        # only the open regions' roots are ever looked up again (border_ids holds roots)
        self.parent = {}
        self.region_class = {root: self.region_class[root] for root in open_roots}

    def _merge(self, parts: list):
        """One polygon from the band pieces of a region.

        The pieces tile the region without overlapping, meeting along band borders. With a vertex
        at every pixel corner of their edges on those borders, the shared edges match exactly, and
        ``shapely.coverage_union_all`` merges them by dropping the shared edges: linear in the
        vertices, and a fraction of the memory a general union (an overlay) takes on regions with
        a million vertices. The extra vertices, and those where pieces met, go again
        (:func:`_without_collinear_vertices`). Should the result not be one polygon, the general
        ``union_all`` decides.
        """
        import shapely

        merged = shapely.coverage_union_all([_with_border_vertices(part, self.band_rows) for part in parts])
        if merged.geom_type != "Polygon":
            merged = shapely.union_all(parts)
        return _without_collinear_vertices(merged) if merged.geom_type == "Polygon" else merged


def _with_border_vertices(polygon, band_rows: int):
    """``polygon`` with a vertex at every integer x of its horizontal edges on multiples of ``band_rows``.

    Args:
        polygon: a band piece in pixel coordinates (integer vertices).
        band_rows: rows per band: its edges on the band borders get the vertices.

    Returns:
        The same polygon (same area and shape) with those edges cut into 1-px segments.
    """
    import shapely

    rings = []
    for ring in (polygon.exterior, *polygon.interiors):
        xy = shapely.get_coordinates(ring)
        start, end = xy[:-1], xy[1:]
        dx = end[:, 0] - start[:, 0]
        border = (start[:, 1] == end[:, 1]) & (start[:, 1] % band_rows == 0) & (np.abs(dx) > 1)
        if border.any():
            steps = np.where(border, np.abs(dx).astype(np.int64), 1)  # points each segment starts
            points = np.repeat(start, steps, axis=0)
            offset = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
            points[:, 0] += offset * np.repeat(np.sign(dx), steps)
            xy = np.vstack([points, xy[-1:]])
        rings.append(xy)
    return shapely.Polygon(rings[0], rings[1:])


def _without_collinear_vertices(polygon):
    """``polygon`` without the vertices that lie on a straight line between their neighbours.

    The same point set with fewer vertices (``shapely.simplify(polygon, 0)`` does the same through
    a topology-preserving simplifier that takes hundreds of MB on a million vertices).

    Args:
        polygon: a polygon.

    Returns:
        The polygon with every ring's collinear (and repeated) vertices removed.
    """
    import shapely

    rings = []
    for ring in (polygon.exterior, *polygon.interiors):
        xy = shapely.get_coordinates(ring)[:-1]
        before, after = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
        turn = (xy[:, 0] - before[:, 0]) * (after[:, 1] - xy[:, 1]) - (xy[:, 1] - before[:, 1]) * (
            after[:, 0] - xy[:, 0]
        )
        xy = xy[turn != 0]
        rings.append(np.vstack([xy, xy[:1]]))
    return shapely.Polygon(rings[0], rings[1:])


def _components(classes: np.ndarray, skip: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of each kept class of a band.

    Args:
        classes: ``(rows, width)`` class ids.
        skip: class ids left out (their pixels get label 0).

    Returns:
        ``(labels, label_class)``: int32 component ids (1..n, 0 for skipped pixels) and the
        class of each id (``label_class[0]`` is unused).
    """
    from scipy import ndimage

    if classes.dtype.kind == "u" and classes.dtype.itemsize <= 2:
        present = np.flatnonzero(np.bincount(classes.ravel()))
    else:
        present = np.unique(classes)
    labels = np.zeros(classes.shape, dtype=np.int32)
    scratch = np.empty(classes.shape, dtype=np.int32)
    label_class = [0]
    cross = ndimage.generate_binary_structure(2, 1)
    for class_id in present:
        if int(class_id) in skip:
            continue
        found = ndimage.label(classes == class_id, structure=cross, output=scratch)
        if found:
            inside = scratch > 0
            scratch[inside] += len(label_class) - 1
            labels[inside] = scratch[inside]
            label_class.extend([int(class_id)] * found)
    return labels, np.asarray(label_class, dtype=np.int64)


# --------------------------------------------------------------------------- writing


class _BatchWriter:
    """Cleans finished polygons, moves them to map coordinates and appends them to the output in batches."""

    def __init__(self, path: Path, fmt: str, crs: str | None):
        self.path = path
        self.driver = VECTOR_FORMATS[fmt][0]
        self.crs = crs
        self.target: Path | None = None
        self.layer = path.stem
        self.batch: list[tuple] = []
        self.started = False
        self.written = 0
        self.dropped = 0
        self.per_class: dict[int, dict[str, int]] = {}

    def open(self, target: Path, layer: str) -> None:
        """Start writing to ``target`` (the output's temporary name) into layer ``layer``."""
        self.target, self.layer = target, layer

    def add(self, polygon, class_id: int, name: str, colour: str, simplify: float, min_area: float, transform) -> None:
        """Clean one finished region and queue it; writes a batch when it is full."""
        import shapely

        parts = list(polygon.geoms) if polygon.geom_type == "MultiPolygon" else [polygon]
        for part in parts:
            if min_area > 0:
                if part.area < min_area:
                    self.dropped += 1
                    continue
                holes = [ring for ring in part.interiors if shapely.Polygon(ring).area >= min_area]
                if len(holes) != len(part.interiors):
                    part = shapely.Polygon(part.exterior, holes)
            pixels = int(round(part.area))
            if simplify > 0:
                part = shapely.simplify(part, simplify, preserve_topology=True)
                if part.is_empty or part.area == 0:
                    self.dropped += 1
                    continue
            if transform is not None:
                a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
                part = shapely.affinity.affine_transform(part, [a, b, d, e, c, f])
            self.batch.append((shapely.to_wkb(part), class_id, name, pixels, float(part.area), colour))
            counts = self.per_class.setdefault(class_id, {"polygons": 0, "pixels": 0})
            counts["polygons"] += 1
            counts["pixels"] += pixels
        if len(self.batch) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Append the queued features (the first call creates the file, even with none)."""
        from pyogrio.raw import write

        if self.batch or not self.started:
            rows = list(zip(*self.batch)) if self.batch else [[]] * len(FIELDS + ("geometry",))
            geometry = np.array(rows[0], dtype=object)
            data = [
                np.asarray(rows[1], dtype=np.int32),
                np.asarray(rows[2], dtype=object),
                np.asarray(rows[3], dtype=np.int64),
                np.asarray(rows[4], dtype=np.float64),
                np.asarray(rows[5], dtype=object),
            ]
            with warnings.catch_warnings():
                # the temporary name's extension is not .gpkg; GDAL warns about it and writes the same file
                warnings.filterwarnings("ignore", message=".*extension.*", category=RuntimeWarning)
                # no CRS means pixel coordinates, on purpose
                warnings.filterwarnings("ignore", message=".*'crs' was not provided.*", category=UserWarning)
                write(
                    str(self.target),
                    geometry,
                    data,
                    list(FIELDS),
                    layer=self.layer,
                    driver=self.driver,
                    geometry_type="Polygon",
                    crs=self.crs,
                    append=self.started,
                )
            self.written += len(self.batch)
            self.started = True
            self.batch = []

    def close(self) -> None:
        """Write what is left (creating an empty layer when nothing was found)."""
        self.flush()
