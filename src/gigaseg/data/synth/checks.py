"""Self-checks of a synthetic segmentation scene, computed band by band.

A benchmark scene is only useful if it makes the two failure modes of naive
ultra-high-resolution segmentation measurable. Two figures say whether it does:

- **fine-structure IoU**: the IoU of each fine class (roads, streams) between the mask
  and the same mask after a ``factor``x nearest-neighbour downsample and upsample
  (sampling the centre pixel ``factor * i + factor // 2`` of each block, as Pillow's
  NEAREST does, then replicating it). Low means a globally downsampled view has lost
  the class. Bound: ``<= FINE_MAX_IOU``.
- **context fraction**: the fraction of the pixels of a context class (vegetation
  near water) whose every covering patch of the GLNet patch grid (508 px) holds no
  pixel of the cue class (water). For those pixels patch-only inference cannot see
  what decides the class. Bound: ``>= CONTEXT_MIN_FRACTION``. Also reported: the
  looser figure where *some* covering patch is cue-free. Undefined (``None``) for an
  image whose side is shorter than the patch.

Both are accumulated over row bands (``update(band, ...)``) so they work on a mask of
any size read tile-wise from disk. Nothing here knows a particular scene generator:
class ids come in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ...geometry import Window, glnet_starts

#: the fine-structure IoU after 4x nearest down/up-sampling must not exceed this
FINE_MAX_IOU = 0.5
#: the share of context-class pixels seen only by cue-free patches must reach this
CONTEXT_MIN_FRACTION = 0.30
#: GLNet's local patch size and the least overlap between neighbouring patches
GLNET_PATCH = 508
GLNET_MIN_OVERLAP = 50
#: rows per band when a mask is read back from disk (a multiple of the factor 4)
BAND_ROWS = 512


def patch_grid(height: int, width: int, patch: int = GLNET_PATCH) -> tuple[list[int], list[int]] | None:
    """The GLNet patch grid over a ``height x width`` image (``gigaseg.geometry.glnet_starts``).

    Args:
        height: image rows.
        width: image columns.
        patch: the patch side, in pixels.

    Returns:
        ``(row_starts, col_starts)``, patches overlapping by at least ``GLNET_MIN_OVERLAP``; or
        None when a side is shorter than a patch (the context check is undefined there).
    """
    if height < patch or width < patch:
        return None
    return glnet_starts(height, patch, GLNET_MIN_OVERLAP), glnet_starts(width, patch, GLNET_MIN_OVERLAP)


class FineStructureCheck:
    """IoU of each fine class between a mask and its ``factor``x nearest down/up-sampled copy.

    Feed full-width bands top to bottom; each band must start on a multiple of
    ``factor`` and span whole blocks (only the last band may be shorter).

    Args:
        height: mask rows.
        width: mask columns.
        classes: the fine classes, name -> class id.
        factor: the down/up-sampling factor.
    """

    def __init__(self, height: int, width: int, classes: Mapping[str, int], factor: int = 4):
        self.height, self.width, self.factor = int(height), int(width), int(factor)
        self.classes = dict(classes)
        self._lut = np.zeros(256, dtype=bool)
        self._lut[list(self.classes.values())] = True
        self._counts = {name: [0, 0] for name in [*self.classes, "all"]}  # intersection, union
        offset = factor // 2
        self._cols = np.minimum(np.arange(0, self.width, factor) + offset, self.width - 1)

    def update(self, band: np.ndarray, top: int) -> None:
        """Add one band of the mask to the counts.

        Args:
            band: ``(rows, width)`` class ids.
            top: the band's first row in the mask.

        Raises:
            ValueError: the band is not full-width or not aligned with the ``factor`` blocks.
        """
        rows = band.shape[0]
        if band.shape[1] != self.width:
            raise ValueError(f"bands must span the full width {self.width}, got {band.shape[1]}")
        if top % self.factor or (rows % self.factor and top + rows != self.height):
            raise ValueError(f"band rows {top}..{top + rows} do not align with {self.factor}x{self.factor} blocks")
        f = self.factor
        sample_rows = np.minimum(np.arange(0, rows, f) + f // 2, rows - 1)
        down = band[sample_rows][:, self._cols]
        up = np.repeat(np.repeat(down, f, axis=0)[:rows], f, axis=1)[:, : self.width]
        for name, cls in self.classes.items():
            self._add(name, band == cls, up == cls)
        self._add("all", self._lut[band], self._lut[up])

    def _add(self, name: str, truth: np.ndarray, coarse: np.ndarray) -> None:
        counts = self._counts[name]
        counts[0] += int(np.count_nonzero(truth & coarse))
        counts[1] += int(np.count_nonzero(truth | coarse))

    def counts(self) -> dict[str, tuple[int, int]]:
        """The pixel counts so far.

        Returns:
            ``{class name: (intersection, union)}`` in pixels, ``"all"`` for the fine classes together.
        """
        return {name: (inter, union) for name, (inter, union) in self._counts.items()}

    def result(self) -> dict[str, float | None]:
        """The IoUs so far.

        Returns:
            ``{class name: IoU, ..., "all": IoU of the fine classes together}``; None where a class
            is absent from both the mask and its coarse copy.
        """
        return _ious(self.counts())


def _ious(counts: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
    return {name: (inter / union if union else None) for name, (inter, union) in counts.items()}


class ContextCheck:
    """Share of context-class pixels lying only in patches (GLNet grid) without a cue pixel.

    ``update(band, top)`` takes full-resolution bands; ``update(band, ys=..., xs=...)``
    takes a band sampled at pixel coordinates ``ys x xs`` (sorted), which lets a
    coarse preview estimate the same figure.

    Args:
        height: image rows.
        width: image columns.
        context_classes: the context classes, name -> class id.
        cue_classes: ids of the cue classes (water).
        patch: the GLNet patch side, in pixels. When a side is shorter, ``defined`` is False
            and only pixel counts are kept.
    """

    def __init__(
        self,
        height: int,
        width: int,
        context_classes: Mapping[str, int],
        cue_classes: Sequence[int],
        patch: int = GLNET_PATCH,
    ):
        self.height, self.width, self.patch = int(height), int(width), int(patch)
        self.context_classes = dict(context_classes)
        self._cue = np.zeros(256, dtype=bool)
        self._cue[list(cue_classes)] = True
        grid = patch_grid(self.height, self.width, self.patch)
        self.defined = grid is not None
        self._pixels = {name: 0 for name in self.context_classes}  # counted even without a grid
        if not self.defined:
            return
        self.row_starts, self.col_starts = (np.asarray(g, dtype=np.int64) for g in grid)
        self._row_cuts, self._row_cover = self._cells(self.row_starts, self.height)
        self._col_cuts, self._col_cover = self._cells(self.col_starts, self.width)
        self.cue_in_patch = np.zeros((len(self.row_starts), len(self.col_starts)), dtype=bool)
        cells = (len(self._row_cuts) - 1, len(self._col_cuts) - 1)
        self._counts = {name: np.zeros(cells, dtype=np.int64) for name in self.context_classes}

    def _cells(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut positions where the set of covering patches changes, and which patches cover each cell."""
        cuts = np.unique(np.concatenate([[0, length], starts, starts + self.patch]))
        cuts = cuts[(cuts >= 0) & (cuts <= length)]
        lo, hi = cuts[:-1, None], cuts[1:, None]
        cover = (starts[None, :] <= lo) & (hi <= starts[None, :] + self.patch)
        return cuts, cover

    def update(self, band: np.ndarray, top: int | None = None, *, ys=None, xs=None) -> None:
        """Add one band (full-resolution, or sampled at ``ys x xs``) to the counts.

        Args:
            band: class ids, ``(len(ys), len(xs))``.
            top: the band's first row, for a full-resolution band (``ys`` then is ``top, top + 1, ...``).
            ys: the sorted image rows of the band's rows; None: from ``top``.
            xs: the sorted image columns of the band's columns; None: ``0, 1, ...`` (full width).

        Raises:
            ValueError: ``band``'s shape does not match the coordinates.
        """
        if not self.defined:
            for name, cls in self.context_classes.items():
                self._pixels[name] += int(np.count_nonzero(band == cls))
            return
        if ys is None:
            ys = np.arange(top, top + band.shape[0])
        if xs is None:
            xs = np.arange(band.shape[1])
        ys, xs = np.asarray(ys), np.asarray(xs)
        if band.shape != (ys.size, xs.size):
            raise ValueError(f"band of shape {band.shape} does not match {ys.size} x {xs.size} coordinates")
        cue = self._cue[band]
        # cue presence per patch: rows of each patch row, then column ranges via a cumulative sum
        col_lo = np.searchsorted(xs, self.col_starts)
        col_hi = np.searchsorted(xs, self.col_starts + self.patch)
        if cue.any():
            for i, start in enumerate(self.row_starts):
                r0, r1 = np.searchsorted(ys, [start, start + self.patch])
                if r1 <= r0:
                    continue
                running = np.concatenate([[0], np.cumsum(cue[r0:r1].any(axis=0))])
                self.cue_in_patch[i] |= running[col_hi] > running[col_lo]
        # context pixels per cell of the grid
        row_bounds = np.searchsorted(ys, self._row_cuts)
        col_bounds = np.searchsorted(xs, self._col_cuts)
        for name, cls in self.context_classes.items():
            member = band == cls
            if not member.any():
                continue
            counts = self._counts[name]
            for cell in range(len(self._row_cuts) - 1):
                r0, r1 = row_bounds[cell], row_bounds[cell + 1]
                if r1 <= r0:
                    continue
                running = np.concatenate([[0], np.cumsum(np.count_nonzero(member[r0:r1], axis=0))])
                counts[cell] += running[col_bounds[1:]] - running[col_bounds[:-1]]

    def result(self) -> dict:
        """Per context class: pixel count, and the fractions in cue-free patches.

        ``fraction``: every covering patch is cue-free (the pixel is ambiguous for
        patch-only inference even after stitching overlaps). ``fraction_any``: at least
        one covering patch is cue-free. ``None`` when the grid is undefined or the class
        is absent.

        Returns:
            ``{class name: {"pixels": int, "fraction": float | None, "fraction_any": float | None}}``.
        """
        if not self.defined:
            return {
                name: {"pixels": self._pixels[name], "fraction": None, "fraction_any": None}
                for name in self.context_classes
            }
        cue = self.cue_in_patch.astype(np.int64)
        free = 1 - cue
        rows, cols = self._row_cover.astype(np.int64), self._col_cover.astype(np.int64)
        all_free = (rows @ cue @ cols.T) == 0
        any_free = (rows @ free @ cols.T) > 0
        out = {}
        for name, counts in self._counts.items():
            total = int(counts.sum())
            out[name] = {
                "pixels": total,
                "fraction": float(counts[all_free].sum() / total) if total else None,
                "fraction_any": float(counts[any_free].sum() / total) if total else None,
            }
        return out


@dataclass
class CheckReport:
    """Both figures for one mask, with the bounds they were held to.

    Args:
        height: mask rows (0 for a pooled report, ``combine``).
        width: mask columns (likewise).
        fine_counts: fine class -> (intersection, union) pixel counts ("all": the fine classes together).
        context: ``ContextCheck.result()``.
        context_class: the context class whose fraction is held to the bound.
        patch: the GLNet patch side used.
        factor: the down/up-sampling factor used.
        fine_max_iou: the bound on every fine class's IoU.
        context_min_fraction: the bound on ``context_fraction``.
        notes: why a figure is undefined (an image smaller than a patch, an absent class).
    """

    height: int
    width: int
    #: fine class -> (intersection, union) pixel counts ("all": the fine classes together)
    fine_counts: dict[str, tuple[int, int]]
    context: dict[str, dict]
    #: name of the context class whose fraction is held to the bound
    context_class: str
    patch: int = GLNET_PATCH
    factor: int = 4
    fine_max_iou: float = FINE_MAX_IOU
    context_min_fraction: float = CONTEXT_MIN_FRACTION
    notes: list[str] = field(default_factory=list)

    @property
    def fine(self) -> dict[str, float | None]:
        """IoU per fine class after the down/up-sampling (None where the class is absent)."""
        return _ious(self.fine_counts)

    @property
    def fine_ok(self) -> bool | None:
        """Every defined fine IoU (the classes and "all") is within its bound; None if none is defined."""
        values = [v for v in self.fine.values() if v is not None]
        return None if not values else all(v <= self.fine_max_iou for v in values)

    @property
    def context_fraction(self) -> float | None:
        """``context_class``'s share of pixels whose every covering patch is cue-free; None if undefined."""
        return self.context.get(self.context_class, {}).get("fraction")

    @property
    def context_ok(self) -> bool | None:
        """``context_fraction`` reaches its bound; None if it is undefined."""
        value = self.context_fraction
        return None if value is None else value >= self.context_min_fraction

    @property
    def passed(self) -> bool:
        """No figure out of bounds (an undefined figure does not fail)."""
        return self.fine_ok is not False and self.context_ok is not False

    def as_dict(self) -> dict:
        """Every figure, count, bound and verdict as plain (JSON-safe) values, for the manifest.

        Returns:
            A dict keyed ``size``, ``fine_iou``, ``fine_pixels``, ``fine_ok``, ``context``, ``context_ok``, ...
        """
        return {
            "size": [self.height, self.width],
            "fine_iou": self.fine,
            "fine_pixels": {name: {"intersection": i, "union": u} for name, (i, u) in self.fine_counts.items()},
            "fine_ok": self.fine_ok,
            "fine_max_iou": self.fine_max_iou,
            "downsample_factor": self.factor,
            "context": self.context,
            "context_class": self.context_class,
            "context_fraction": self.context_fraction,
            "context_ok": self.context_ok,
            "context_min_fraction": self.context_min_fraction,
            "patch": self.patch,
            "notes": self.notes,
        }


def run_checks(
    bands: Iterable[tuple[int, np.ndarray]],
    height: int,
    width: int,
    *,
    fine_classes: Mapping[str, int],
    context_classes: Mapping[str, int],
    cue_classes: Sequence[int],
    context_class: str,
    patch: int = GLNET_PATCH,
    factor: int = 4,
) -> CheckReport:
    """Run both checks over ``(top, band)`` pairs covering a ``height x width`` mask.

    Args:
        bands: full-width ``(top, band)`` pairs, top to bottom (``iter_render_bands``, ``iter_source_bands``).
        height: mask rows.
        width: mask columns.
        fine_classes: the fine classes, name -> id.
        context_classes: the context classes, name -> id.
        cue_classes: ids of the cue classes.
        context_class: the context class held to the bound.
        patch: the GLNet patch side.
        factor: the down/up-sampling factor of the fine-structure check; bands must align with it.

    Returns:
        The report, with notes on undefined figures.
    """
    fine = FineStructureCheck(height, width, fine_classes, factor)
    context = ContextCheck(height, width, context_classes, cue_classes, patch)
    for top, band in bands:
        fine.update(band, top)
        context.update(band, top)
    notes = []
    if not context.defined:
        notes.append(
            f"context check undefined: the image ({height}x{width}) has a side shorter than the {patch}-px patch"
        )
    for name, value in fine.result().items():
        if value is None and name != "all":
            notes.append(f"fine class {name!r} does not occur")
    return CheckReport(height, width, fine.counts(), context.result(), context_class, patch, factor, notes=notes)


def iter_render_bands(
    render: Callable[[Window], np.ndarray], height: int, width: int, rows: int = BAND_ROWS
) -> Iterator[tuple[int, np.ndarray]]:
    """``(top, band)`` for full-width bands of ``render(window)``.

    Args:
        render: returns the ``(h, w)`` class ids of a window.
        height: mask rows.
        width: mask columns.
        rows: rows per band (the last band may be shorter).

    Yields:
        ``(top, band)``: the band's first row and its class ids, top to bottom.
    """
    for top in range(0, height, rows):
        yield top, render(Window(top, 0, min(rows, height - top), width))


def iter_source_bands(source, rows: int = BAND_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(top, band)`` for full-width bands of a single-channel ``ImageSource``.

    E.g. a tiled mask from ``gigaseg.open_image``, which decodes only each band's tiles.

    Args:
        source: the mask.
        rows: rows per band (the last band may be shorter).

    Yields:
        ``(top, band)``: the band's first row and its ``(rows, width)`` class ids, top to bottom.

    Raises:
        ValueError: ``source`` has more than one channel.
    """
    if source.channels != 1:
        raise ValueError(f"{source.path}: expected a single-channel label mask, got {source.channels} channels")
    for top in range(0, source.height, rows):
        yield top, source.read(Window(top, 0, min(rows, source.height - top), source.width))[..., 0]


def format_report(name: str, report: CheckReport, cue: str = "water") -> str:
    """One line per scene: both figures, their bounds and whether they hold.

    Args:
        name: the scene's name, at the start of the line.
        report: the scene's report.
        cue: the cue class's name in the text.

    Returns:
        The line (no newline).
    """
    fine = ", ".join(f"{k} {_fmt(v)}" for k, v in report.fine.items() if k != "all")
    ctx = report.context.get(report.context_class, {})
    if report.context_fraction is None:
        reason = "; ".join(n for n in report.notes if "undefined" in n) or f"no {report.context_class} pixels"
        context = f"context n/a ({reason})"
    else:
        context = (
            f"context {_fmt(ctx['fraction'])} of {report.context_class} only in {cue}-free "
            f"{report.patch}-px patches ({_fmt(ctx['fraction_any'])} in at least one; "
            f">= {report.context_min_fraction}) {_verdict(report.context_ok)}"
        )
    return (
        f"{name}: fine IoU after {report.factor}x down/up {_fmt(report.fine.get('all'))} ({fine}; "
        f"<= {report.fine_max_iou}) {_verdict(report.fine_ok)} | {context}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return {True: "ok", False: "FAIL", None: "n/a"}[ok]


def combine(reports: Sequence[CheckReport]) -> CheckReport | None:
    """The figures pooled over several scenes: the "overall" line.

    Fine-structure pixel counts are summed; context fractions are averaged weighted by each
    scene's context-class pixels. Bounds, patch and factor are those of the first report.

    Args:
        reports: the scenes' reports, all with the same classes.

    Returns:
        The pooled report (size 0 x 0, notes merged), or None for no reports.
    """
    if not reports:
        return None
    first = reports[0]
    fine = {
        name: tuple(int(sum(r.fine_counts[name][k] for r in reports)) for k in (0, 1)) for name in first.fine_counts
    }
    context = {}
    for name in first.context:
        entry = {"pixels": sum(r.context[name]["pixels"] or 0 for r in reports) or None}
        for key in ("fraction", "fraction_any"):
            weighted = [
                (r.context[name][key], r.context[name]["pixels"]) for r in reports if r.context[name][key] is not None
            ]
            entry[key] = (sum(v * n for v, n in weighted) / sum(n for _, n in weighted)) if weighted else None
        context[name] = entry
    notes = sorted({note for r in reports for note in r.notes})
    return CheckReport(
        0,
        0,
        fine,
        context,
        first.context_class,
        first.patch,
        first.factor,
        first.fine_max_iou,
        first.context_min_fraction,
        notes=notes,
    )
