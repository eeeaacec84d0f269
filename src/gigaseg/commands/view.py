"""``gigaseg view``: look at an image, its masks and its boxes in the browser (a local tile server)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``view`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "view",
        help="look at an image, its masks and its detected boxes in the browser",
        description="Serve the image and its masks as Deep Zoom tiles, read on demand from their pyramids, to a "
        "page in the browser: pan and zoom, mask opacity, a switch between masks, the classes' colours, names and "
        "areas, the pixel and class under the cursor; with --detections, boxes drawn over them (the class and "
        "score of those under the cursor). Binds to 127.0.0.1 and serves only the files named here; "
        "runs until Ctrl-C.",
    )
    parser.add_argument("image", help="the image (TIFF/BigTIFF/OME/GeoTIFF, PNG, JPEG)")
    parser.add_argument("masks", nargs="*", metavar="mask", help="label masks of the same size, e.g. two methods'")
    parser.add_argument(
        "--detections",
        action="append",
        default=[],
        metavar="FILE",
        help="boxes to draw: gigaseg predict's <name>.geojson or <name>.json (COCO results), any GeoJSON "
        "(georeferenced like the image, or in pixels), or a COCO dataset json (the entry with the image's file "
        "name); repeat to compare",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, help="boxes scoring below this are not drawn (default 0: all)"
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free one)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: all)"
    )
    parser.add_argument("--no-browser", action="store_true", help="print the address without opening a browser")
    parser.add_argument("--cache-size", default="64MB", help="memory for encoded tiles (default 64MB)")
    parser.add_argument(
        "--image-format", choices=("jpeg", "png"), default="jpeg", help="the image's tiles (default jpeg; png: exact)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Start the viewer server and serve until Ctrl-C.

    Args:
        args: the parsed ``gigaseg view`` arguments.

    Returns:
        0 after Ctrl-C.
    """
    from ..viewer import ViewerServer

    server = ViewerServer(
        args.image,
        args.masks,
        host=args.host,
        port=args.port,
        cache_size=args.cache_size,
        image_format=args.image_format,
        detections=args.detections,
        min_score=args.min_score,
    )
    return serve_until_interrupted([server], open_browser=not args.no_browser)


def view_predictions(args, images: list[str], masks: list, code: int, *, boxes: bool = False) -> int:
    """``gigaseg predict --view``: after the predictions, serve each image with its mask (or boxes) until Ctrl-C.

    Images whose mask (or boxes) were not written (the failed ones) are left out; nothing is
    served when ``--view`` was not given or no output exists.

    Args:
        args: the parsed ``gigaseg predict`` arguments (``args.view``).
        images: the input images, in order.
        masks: the mask each was to get (``planned_outputs``), in the same order; for a detector
            the output stem its ``<name>.geojson`` sits beside.
        code: the exit code of the predictions.
        boxes: the outputs are a detector's: show each image's ``<name>.geojson`` as boxes.

    Returns:
        ``code``.
    """
    import os

    from ..viewer import ViewerServer

    if boxes:
        from ..inference.detections import detection_outputs

        masks = [detection_outputs(Path(mask))[1] for mask in masks]
    pairs = [(image, mask) for image, mask in zip(images, masks, strict=True) if os.path.isfile(mask)]
    if not getattr(args, "view", False) or not pairs:
        return code
    servers = []
    try:
        for image, mask in pairs:
            servers.append(ViewerServer(image, [], detections=[mask]) if boxes else ViewerServer(image, [mask]))
    except BaseException:
        for server in servers:
            server.close()
        raise
    serve_until_interrupted(servers, open_browser=True)
    return code


def serve_until_interrupted(servers: list, *, open_browser: bool = True) -> int:
    """Print each server's address, open the first in a browser, and serve until Ctrl-C.

    Args:
        servers: ``gigaseg.viewer.ViewerServer`` objects, not yet serving (closed at the end).
        open_browser: open the first page in the default browser when this machine has a graphical one.

    Returns:
        0.
    """
    from ..viewer import open_in_browser

    try:
        for server in servers[1:]:
            server.start()
        for server in servers:
            where = server.image.source.path or "image"
            shown = [*server.mask_names, *(f"{len(b)} boxes of {b.name}" for b in server.boxes)]
            print(f"gigaseg view: {where} with {', '.join(shown) or 'no mask'}: {server.url}", flush=True)
        if not _is_local(servers[0].host):
            print(f"gigaseg view: note: serving to the network on {servers[0].host}", flush=True)
        print("gigaseg view: press Ctrl-C to stop", flush=True)
        if open_browser:
            open_in_browser(servers[0].url)
        servers[0].serve_forever()
    except KeyboardInterrupt:
        print("gigaseg view: stopped", flush=True)
    finally:
        for server in servers:
            server.close()
    return 0


def _is_local(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
