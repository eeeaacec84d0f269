"""``gigaseg predict``: segment whole images of any size into tiled mask TIFFs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_inference_set, add_polygon_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``predict`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "predict",
        help="segment images with a trained model",
        description="Segment images of any size window by window; writes OUT/<name>.tif (tiled, colour map, "
        "georeferencing kept). A killed run restarted with the same command resumes.",
    )
    parser.add_argument("images", nargs="+", help="image files (TIFF/BigTIFF/OME/GeoTIFF, PNG, JPEG)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-memory", help="memory budget, e.g. 2GB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", default="32", help="32, bf16-mixed or 16-mixed")
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    parser.add_argument("--probabilities", action="store_true", help="also write <name>_probabilities.zarr")
    parser.add_argument("--restart", action="store_true", help="ignore finished bands of an interrupted run")
    parser.add_argument(
        "--vector",
        choices=("gpkg", "geojson"),
        help="also write the mask's polygons per class as <name>.gpkg (GeoPackage) or <name>.geojson, in the "
        "input's CRS when it is georeferenced (see gigaseg vectorize; --simplify, --min-area, --skip-classes)",
    )
    add_inference_set(parser)
    add_polygon_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Segment every image into ``--out`` (:func:`gigaseg.api.predict`) and print its speed and peak RSS.

    The checkpoint and the ``--set`` options are checked once, before any output.

    Args:
        args: the parsed ``gigaseg predict`` arguments.

    Returns:
        0.
    """
    import resource

    from ..api import load_model, predict
    from ..memory import format_size
    from .common import parse_options, polygon_options

    outputs = planned_outputs(args.images, Path(args.out))
    model, info = load_model(args.checkpoint)  # once, and a bad checkpoint fails before any output
    model = model.with_inference_options(**parse_options(args.set))  # bad options fail before any output too
    for image, out in zip(args.images, outputs, strict=True):
        result = predict(
            model,
            image,
            out,
            info=info,
            max_memory=args.max_memory,
            device=args.device,
            precision=args.precision,
            overlay=args.overlay,
            probabilities=args.probabilities,
            resume=not args.restart,
            vector=args.vector,
            vector_options=polygon_options(args) if args.vector else None,
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"{image}: {result.height}x{result.width} -> {result.mask_path} "
            f"({result.megapixels_per_second:.2f} Mpx/s, peak RSS {format_size(peak)})"
        )
        if result.overlay_path:
            print(f"  overlay: {result.overlay_path}")
        if result.probabilities_path:
            print(f"  probabilities: {result.probabilities_path}")
        if result.vector_path:
            print(f"  polygons: {result.vector_path}")
    return 0


def planned_outputs(images: list[str], out_dir: Path) -> list[Path]:
    """The mask each input image gets in ``out_dir``, checked before anything is predicted.

    Args:
        images: the input image paths, in order.
        out_dir: the output folder.

    Returns:
        ``out_dir / "<stem>.tif"`` per image (``gigaseg.io.base.output_stem``: the whole file name
        minus its image extension).

    Raises:
        ConfigError: ``out_dir`` is a file; two inputs would write one mask; or a mask would be
            written over one of the inputs.
    """
    from ..api import same_file
    from ..errors import ConfigError
    from ..io.base import output_stem

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: --out must be a folder, and this is a file")
    outputs: list[Path] = []
    first: dict[str, str] = {}
    for image in images:
        out = out_dir / f"{output_stem(image)}.tif"
        key = os.path.realpath(out)  # stops at a loop of links (Path.resolve raises before Python 3.13)
        if key in first:
            raise ConfigError(
                f"{image} and {first[key]}: would both be written to {out}; predict them into different folders"
            )
        first[key] = image
        outputs.append(out)
    for out in outputs:
        for image in images:
            if same_file(out, image):
                raise ConfigError(f"{out}: is the input image {image} itself; choose another --out")
    return outputs
