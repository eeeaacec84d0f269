"""``gigaseg vectorize``: polygons of an existing mask, streamed band by band into a GeoPackage or GeoJSON."""

from __future__ import annotations

import argparse

from .common import add_polygon_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``vectorize`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "vectorize",
        help="turn a mask into polygons (GeoPackage, GeoJSON)",
        description="One polygon per connected region of each class, with its holes, read band by band from the "
        "mask (memory does not grow with its size); attributes class_id, class_name, pixels, area, color. "
        "Coordinates in the mask's CRS when it is georeferenced, in pixels (x = column, y = row) otherwise.",
    )
    parser.add_argument("mask", help="a label-mask TIFF, e.g. what gigaseg predict wrote")
    parser.add_argument("--out", help="output file or folder (default: next to the mask, <name>.gpkg or .geojson)")
    parser.add_argument(
        "--format", choices=("gpkg", "geojson"), help="default: from --out's extension, else gpkg (GeoPackage)"
    )
    parser.add_argument("--band-rows", type=int, default=None, help="rows read at once (default 512)")
    add_polygon_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Vectorize the mask (:func:`gigaseg.io.vector.vectorize_mask`) and print what was written.

    Args:
        args: the parsed ``gigaseg vectorize`` arguments.

    Returns:
        0.
    """
    import resource

    from ..io.vector import vectorize_mask
    from ..memory import format_size
    from ..progress import progress_bar
    from .common import polygon_options

    with progress_bar(f"vectorize {args.mask} (%)", 100) as advance:

        def progress(done: int, total: int) -> None:
            advance(100 / total)

        result = vectorize_mask(
            args.mask,
            args.out,
            format=args.format,
            band_rows=args.band_rows,
            progress=progress,
            **polygon_options(args),
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    where = result.crs or "pixel coordinates"
    print(
        f"{args.mask} -> {result.path}: {_polygons(result.polygons)} ({where}; {result.seconds:.1f} s, "
        f"peak RSS {format_size(peak)})"
    )
    for name, counts in result.per_class.items():
        print(f"  {name}: {_polygons(counts['polygons'])}, {counts['pixels']} pixels")
    if result.dropped:
        print(f"  {_polygons(result.dropped)} under --min-area (or simplified away) left out")
    return 0


def _polygons(count: int) -> str:
    return f"{count} polygon{'' if count == 1 else 's'}"
