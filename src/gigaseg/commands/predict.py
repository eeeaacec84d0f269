"""``gigaseg predict``: segment whole images of any size into tiled mask TIFFs (or OME-Zarr stores).

A detector's boxes go to ``OUT/<name>.json`` (COCO results) and ``OUT/<name>.geojson`` instead
(``--overlay``: ``OUT/<name>_overlay.png`` with the boxes drawn).

In this process, or on a Dask cluster (``--cluster local:N``, ``--scheduler ADDRESS``:
``gigaseg.inference.distributed``). Every input is attempted: a bad image fails alone with its
one-line error, and a summary names the failed ones (exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
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
        "georeferencing kept) and/or OUT/<name>.ome.zarr (OME-NGFF labels). A killed run restarted with the same "
        "command resumes. Every image is attempted: one that fails is named, and the exit code is 2. "
        "A detector writes OUT/<name>.json (COCO results) and OUT/<name>.geojson (boxes, georeferenced when the "
        "image is) instead.",
    )
    parser.add_argument(
        "images",
        nargs="+",
        help="image files (TIFF/BigTIFF/OME/GeoTIFF, PNG, JPEG), folders of images, or glob patterns (quoted)",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--max-memory", help="memory budget, e.g. 2GB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision",
        default="32",
        help="32, bf16-mixed (autocast; fast on CPUs with AVX512-BF16/AMX and on recent GPUs) or 16-mixed",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fast path: BatchNorm folded into the convolutions, channels_last, the next block decoded in a "
        "background thread, sub-batches full across block borders (masks equal the plain path's on >= 99.9%% of "
        "pixels in the tests, not bit for bit)",
    )
    parser.add_argument(
        "--backend",
        default="torch",
        help="run the method's patch networks in torch (default) or ONNX Runtime on the CPU, float32 (implies "
        "--fast; needs pip install 'gigaseg[onnx]')",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the patch networks (implies --fast; opt-in)"
    )
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    parser.add_argument("--probabilities", action="store_true", help="also write <name>_probabilities.zarr")
    parser.add_argument("--restart", action="store_true", help="ignore finished bands of an interrupted run")
    parser.add_argument(
        "--format",
        default="tiff",
        help="mask format: tiff (default: tiled cloud-optimized GeoTIFF), ome-zarr (OME-NGFF multiscale labels "
        "with class names and colours, <name>.ome.zarr; --probabilities go inside it), or tiff,ome-zarr",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        metavar="local:N",
        help="predict on a Dask LocalCluster of N worker processes (torch threads: cores / N each); each worker "
        "stays within --max-memory",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="predict on an existing Dask cluster (e.g. tcp://host:8786 from dask-jobqueue's SLURMCluster); "
        "its workers must see the checkpoint, the images and --out at the same paths",
    )
    parser.add_argument(
        "--vector",
        choices=("gpkg", "geojson"),
        help="also write the mask's polygons per class as <name>.gpkg (GeoPackage) or <name>.geojson, in the "
        "input's CRS when it is georeferenced (see gigaseg vectorize; --simplify, --min-area, --skip-classes)",
    )
    parser.add_argument(
        "--view",
        action="store_true",
        help="at the end, show each image with its mask (a detector: its boxes) in the browser (see gigaseg "
        "view) until Ctrl-C",
    )
    add_inference_set(parser)
    add_polygon_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Segment every image into ``--out`` (:func:`gigaseg.api.predict`) and print its speed and peak RSS.

    The checkpoint, the ``--set`` options, the formats and the output names are checked once,
    before any output. Then every image is attempted; one that fails prints its one-line error
    and the others go on.

    Args:
        args: the parsed ``gigaseg predict`` arguments.

    Returns:
        0, or 2 when an image failed (after a summary naming them).

    Raises:
        GigasegError: a bad checkpoint, option, format or output folder (nothing was predicted), or
            the only image failed.
    """
    import resource

    from ..api import image_inputs, load_model, planned_outputs, predict
    from ..errors import ConfigError
    from ..inference.stream import parse_formats
    from ..memory import format_size
    from .common import parse_options, polygon_options
    from .view import view_predictions

    formats = parse_formats(args.format)
    if args.vector and "tiff" not in formats:
        raise ConfigError("--vector makes the polygons from the TIFF mask: use --format tiff,ome-zarr")
    images = image_inputs(args.images)
    outputs = planned_outputs(images, Path(args.out))
    model, info = load_model(args.checkpoint)  # once, and a bad checkpoint fails before any output
    options = parse_options(args.set)
    model = model.with_inference_options(**options)  # bad options fail before any output too
    detector = getattr(model, "task", None) == "detection"
    if args.view and "tiff" not in formats and not detector:
        raise ConfigError("--view shows the TIFF mask: use --format tiff,ome-zarr")
    if detector and (args.cluster or args.scheduler):
        raise ConfigError(f"{model.method_name} is a detection method: --cluster and --scheduler are for segmentation")
    settings = dict(
        max_memory=args.max_memory,
        device=args.device,
        precision=args.precision,
        overlay=args.overlay,
        probabilities=args.probabilities,
        resume=not args.restart,
        vector=args.vector,
        vector_options=polygon_options(args) if args.vector else None,
        format=",".join(formats),
        fast=args.fast,
        backend=args.backend,
        compile=args.compile,
    )
    if args.cluster or args.scheduler:
        del model
        return view_predictions(args, images, outputs, _run_on_cluster(args, images, options, settings))
    failures: dict[str, BaseException] = {}
    for image, out in zip(images, outputs, strict=True):
        try:
            result = predict(model, image, out, info=info, **settings)
        except Exception as error:
            if len(images) == 1 or not _user_error(error):
                raise
            _report(error)
            failures[image] = error
            continue
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _print_result(image, result, f"peak RSS {format_size(peak)}")
    return view_predictions(args, images, outputs, _summary(failures, len(images)), boxes=detector)


def _run_on_cluster(args, images: list[str], options: dict, settings: dict) -> int:
    """Predict ``images`` on the cluster of ``--cluster`` / ``--scheduler``; print each result and the summary."""
    from ..api import predict
    from ..errors import ConfigError
    from ..inference.distributed import connect, dashboard_link, local_cluster
    from ..memory import format_size

    with contextlib.ExitStack() as stack:
        if args.cluster:
            kind, _, count = args.cluster.partition(":")
            if kind != "local" or not count.isdigit() or int(count) < 1:
                raise ConfigError(f"--cluster {args.cluster}: expected local:N with N >= 1 worker processes")
            from distributed import Client

            cluster = stack.enter_context(local_cluster(int(count), preload=("gigaseg.api", "gigaseg.methods")))
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(connect(args.scheduler))
        link = dashboard_link(client)
        if link:
            print(f"dashboard: {link}", flush=True)
        outcome = predict(args.checkpoint, images, args.out, client=client, options=options, **settings)
        peaks = _worker_peaks(client)
    workers = f"workers' peak RSS up to {format_size(max(peaks))}" if peaks else "workers' peak RSS unknown"
    each = ", ".join(format_size(peak) for peak in peaks) or "unknown"
    for image, result in outcome.results.items():
        _print_result(image, result, workers)
    unexpected = [error for error in outcome.failures.values() if not _user_error(error)]
    if len(images) == 1 and outcome.failures:  # as in this process: the one error, in one line
        raise next(iter(outcome.failures.values()))
    for error in outcome.failures.values():
        _report(error)
    busy = ""
    if outcome.busy_seconds is not None and outcome.seconds > 0:
        share = outcome.busy_seconds / (outcome.seconds * outcome.workers)
        busy = f"; {outcome.workers} workers busy {share:.0%} of the time"
        if outcome.overhead_per_unit is not None:
            busy += f" ({outcome.overhead_per_unit:.2f} s of worker time per row outside the tasks)"
    print(
        f"{len(outcome.results)} of {len(images)} images in {outcome.seconds:.1f} s: {outcome.units} rows of blocks "
        f"predicted, {outcome.units_resumed} resumed{busy}; workers' peak RSS: {each}",
        flush=True,
    )
    if unexpected:
        raise unexpected[0]
    return _summary(outcome.failures, len(images))


def _worker_peaks(client) -> list[int]:
    """Each worker's peak RSS in bytes (what ``ru_maxrss`` says in the worker process)."""
    try:
        return [int(peak) for peak in client.run(_peak_rss).values()]
    except Exception:  # noqa: BLE001 - a cluster that cannot say: report none
        return []


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _print_result(image: str, result, memory: str) -> None:
    if hasattr(result, "json_path"):  # a detector's boxes
        print(
            f"{image}: {result.height}x{result.width} -> {len(result.detections)} detections in {result.json_path} "
            f"({result.megapixels_per_second:.2f} Mpx/s, {memory})"
        )
        print(f"  geojson: {result.geojson_path}")
        if result.overlay_path:
            print(f"  overlay: {result.overlay_path}")
        return
    mask = result.mask_path or result.ome_zarr_path
    print(f"{image}: {result.height}x{result.width} -> {mask} ({result.megapixels_per_second:.2f} Mpx/s, {memory})")
    if result.mask_path and result.ome_zarr_path:
        print(f"  ome-zarr: {result.ome_zarr_path}")
    if result.overlay_path:
        print(f"  overlay: {result.overlay_path}")
    if result.probabilities_path:
        print(f"  probabilities: {result.probabilities_path}")
    if result.vector_path:
        print(f"  polygons: {result.vector_path}")


def _user_error(error: BaseException) -> bool:
    """Whether ``error`` is one the CLI reports in one line (gigaseg's errors, the environment's OS errors)."""
    from ..errors import ENVIRONMENT_ERRNOS, GigasegError

    return isinstance(error, GigasegError) or (isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS)


def _report(error: BaseException) -> None:
    """Print a failed image's one-line error, as the CLI prints any error."""
    from ..errors import describe_os_error

    message = describe_os_error(error, "predict") if isinstance(error, OSError) else str(error)
    print(f"gigaseg predict: error: {message}", file=sys.stderr, flush=True)


def _summary(failures: dict[str, BaseException], total: int) -> int:
    """Print which images failed (when any did) and return the exit code: 0, or 2."""
    if not failures:
        return 0
    names = ", ".join(failures)
    print(f"gigaseg predict: {len(failures)} of {total} images failed: {names}", file=sys.stderr, flush=True)
    return 2
