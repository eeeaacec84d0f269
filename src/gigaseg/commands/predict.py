"""``gigaseg predict``: segment whole images of any size into tiled mask TIFFs."""

from __future__ import annotations

import argparse

from .common import add_inference_set


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
    add_inference_set(parser)
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
    from pathlib import Path

    from ..api import load_model, predict
    from ..memory import format_size
    from .common import parse_options

    model, info = load_model(args.checkpoint)  # once, and a bad checkpoint fails before any output
    model = model.with_inference_options(**parse_options(args.set))  # bad options fail before any output too
    for image in args.images:
        out = Path(args.out) / f"{Path(image).name.split('.')[0]}.tif"
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
    return 0
