"""``gigaseg synth KIND OUT_DIR ...``: write a synthetic benchmark dataset.

Kinds (one function pair each, so a new generator is one more entry in ``KINDS``):

- ``landcover``: aerial-style scenes (RGB tiled BigTIFF + uint8 masks + dataset.yaml)
  with fine classes a downsampled view loses and context classes a patch cannot tell
  apart; ``--report`` prints the self-checks that prove both.
- ``vessels``: thin-structure scenes in the spirit of DRIVE (RGB tiled BigTIFF + binary
  masks + dataset.yaml): branching vessels 1-5 px wide on a textured background;
  ``--report`` prints the vessel share, the thin-vessel share and the best F1 a mask
  constant over 4x4 cells can reach on the thin vessels.
- ``ultramnist``: classification images (tiled TIFF + classification dataset.yaml) with
  digits from a few pixels to most of the canvas among distracting shapes; the class is
  the sum of the digits modulo 10.
- ``objects``: detection scenes (tiled TIFF + COCO instances json + dataset.yaml) with many
  small objects of four classes (vehicles, ring and cross markers, digits) among distractors
  on textured canvases, some across tile borders.
- ``coco-mosaic``: a local detection dataset's images pasted 36 at a time on 4096 x 4096
  canvases (the paper's COCO-mosaic), as a COCO-layout dataset.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×*,]\s*(\d+)\s*)?$")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"2448x2448"`` -> ``(2448, 2448)`` (height x width); ``"1024"`` -> ``(1024, 1024)``.

    Args:
        text: ``HxW`` (``x``, ``X``, ``×``, ``*`` or ``,`` between) or a single number.

    Returns:
        ``(height, width)``.

    Raises:
        ConfigError: the text is neither form, or a side is 0.
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise ConfigError(f"--size must be HxW or a single number of pixels (e.g. 2448x2448 or 1024), got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) is not None else height
    if height < 1 or width < 1:
        raise ConfigError(f"--size must be positive, got {text!r}")
    return height, width


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``synth`` subcommand, with one sub-subcommand per kind in ``KINDS``.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (each kind sets its own ``run``).
    """
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic benchmark dataset with known ground truth",
        description="Write a synthetic benchmark dataset (images, masks, dataset.yaml) of any size, streamed to disk.",
    )
    kinds = parser.add_subparsers(dest="kind", title="kinds", required=True)
    for add_kind in KINDS:
        add_kind(kinds)
    return parser


# ----------------------------------------------------------------------------------
# landcover


def _add_landcover(kinds) -> None:
    parser = kinds.add_parser(
        "landcover",
        help="land-cover scenes: fine roads/streams and vegetation told apart only by distance to water",
        description=(
            "Land-cover scenes as tiled BigTIFF (images/*.tif RGB, masks/*.tif class ids with a colour map) "
            "plus dataset.yaml. Fine classes (2-3 px roads and streams) vanish at 4x downsampling; "
            "'vegetation near water' and 'vegetation far from water' look identical and differ only by "
            "water within --context-radius, farther than a 508-px patch reaches. The same seed gives the "
            "same pixels; any size streams with bounded memory."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--count", type=int, default=4, help="number of scenes (default: 4)")
    parser.add_argument("--size", default="2448x2448", help="scene size HxW or N for NxN (default: 2448x2448)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="share of scenes in the val split, the last ones (default: 0.25)",
    )
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side, a multiple of 16 (default: 512)")
    parser.add_argument(
        "--context-radius",
        type=float,
        default=700.0,
        help="vegetation within this many pixels of water is 'near water' (default: 700; "
        "the context check needs it well beyond the 508-px patch)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="read each written mask back and print the fine-structure and context checks",
    )
    parser.set_defaults(run=_run_landcover)


def _run_landcover(args) -> int:
    from ..data.synth import checks
    from ..data.synth.landcover import LandcoverConfig, dataset_steps, write_landcover_dataset
    from ..progress import progress_bar

    height, width = parse_image_size(args.size)
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    if args.tile <= 0 or args.tile % 16:
        raise ConfigError(f"--tile must be a positive multiple of 16, got {args.tile}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {args.seed}")
    config = LandcoverConfig(context_radius=args.context_radius)
    reports = []

    def on_scene(name: str, report) -> None:
        if report is not None:
            reports.append(report)
            print(checks.format_report(name, report), flush=True)

    total = dataset_steps(args.count, height, width, args.tile, args.report)
    with progress_bar(f"synth landcover {height}x{width}", total) as advance:
        manifest = write_landcover_dataset(
            args.out_dir,
            count=args.count,
            height=height,
            width=width,
            seed=args.seed,
            val_fraction=args.val_fraction,
            tile=args.tile,
            config=config,
            report=args.report,
            advance=advance,
            on_scene=on_scene,
        )
    if args.report:
        print(checks.format_report("overall", checks.combine(reports)), flush=True)
    splits = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    print(
        f"wrote {args.count} scene(s) of {height}x{width} ({splits}) to {args.out_dir}: "
        f"images/, masks/, dataset.yaml, synth.json",
        file=sys.stderr,
    )
    if not all(report.passed for report in reports):
        print("gigaseg synth landcover: a self-check is out of bounds (see FAIL above)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------
# ultramnist


def _add_ultramnist(kinds) -> None:
    parser = kinds.add_parser(
        "ultramnist",
        help="classification: digits of very different sizes on a large canvas; class = sum mod 10",
        description=(
            "UltraMNIST-style classification images (images/*.tif, 1-channel uint8) plus a classification "
            "dataset.yaml (labels, splits) and synth.json (every digit's value and box). Each image holds "
            "--digits digits, from a few pixels to a large part of the canvas, among distracting shapes; "
            "the class is the sum of the digits modulo 10. The same seed gives the same pixels."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--count", type=int, default=100, help="number of images (default: 100)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of images in the val split, the last ones (default: 0.2)"
    )
    parser.add_argument("--digits", default="3-5", help="digits per image, N or MIN-MAX, at least 2 (default: 3-5)")
    parser.add_argument("--values", default="0-9", help="digit values drawn, e.g. 0-9 or 3,8 (default: 0-9)")
    parser.add_argument(
        "--min-digit", type=int, default=0, help="smallest digit height in pixels (default: 0 = max(8, size/64))"
    )
    parser.add_argument(
        "--shapes", type=int, default=-1, help="distracting shapes per image (default: -1 = 6 + size/128)"
    )
    parser.set_defaults(run=_run_ultramnist)


def _int_range(text: str, what: str) -> list[int]:
    """``"3-5"`` -> [3, 4, 5]; ``"3,8"`` -> [3, 8]; ``"4"`` -> [4]."""
    values: list[int] = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            values.extend(range(int(lo), int(hi if hi else lo) + 1))
    except ValueError:
        raise ConfigError(f"{what} must be N, MIN-MAX or a comma-separated list, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty: {text!r}")
    return values


def _run_ultramnist(args) -> int:
    from ..data.synth.ultramnist import UltraMnistConfig, write_ultramnist_dataset
    from ..progress import progress_bar

    digits = _int_range(args.digits, "--digits")
    config = UltraMnistConfig(
        digits=(min(digits), max(digits)),
        values=tuple(sorted(set(_int_range(args.values, "--values")))),
        min_digit=args.min_digit,
        shapes=args.shapes,
    )
    with progress_bar(f"synth ultramnist {args.size}x{args.size}", args.count) as advance:
        manifest = write_ultramnist_dataset(
            args.out_dir,
            count=args.count,
            size=args.size,
            seed=args.seed,
            val_fraction=args.val_fraction,
            config=config,
            advance=advance,
        )
    splits = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    print(
        f"wrote {args.count} image(s) of {args.size}x{args.size} ({splits}) to {args.out_dir}: "
        f"images/, dataset.yaml, synth.json",
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------------
# vessels


def _add_vessels(kinds) -> None:
    parser = kinds.add_parser(
        "vessels",
        help="binary thin structures: branching vessels 1-5 px wide that a downsampled view loses",
        description=(
            "DRIVE-style vessel scenes as tiled BigTIFF (images/*.tif RGB, masks/*.tif 0 background / 1 vessel "
            "with a colour map) plus dataset.yaml. Vessel trees branch from about 5 px down to 1 px wide on a "
            "textured, unevenly lit background; thin vessels are faint, and a mask constant over 4x4 cells "
            "(a prediction at 1/4 resolution) cannot trace them (--report gives its best F1). "
            "A pixel is a vessel when its centre lies within half the width of a centreline. "
            "The same seed gives the same pixels; any size streams with bounded memory."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--count", type=int, default=4, help="number of scenes (default: 4)")
    parser.add_argument("--size", default="2048x2048", help="scene size HxW or N for NxN (default: 2048x2048)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="share of scenes in the val split, the last ones (default: 0.25)",
    )
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side, a multiple of 16 (default: 512)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="read each written mask back and print the vessel share, the share of thin (<= 2 px) vessel pixels "
        "and the best F1 a mask constant over 4x4 cells reaches on the thin vessels",
    )
    parser.set_defaults(run=_run_vessels)


def _run_vessels(args) -> int:
    from ..data.synth.vessels import combine_reports, dataset_steps, format_report, write_vessels_dataset
    from ..progress import progress_bar

    height, width = parse_image_size(args.size)
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    reports = []

    def on_scene(name: str, report) -> None:
        if report is not None:
            reports.append(report)
            print(format_report(name, report), flush=True)

    total = dataset_steps(args.count, height, width, args.tile, args.report)
    with progress_bar(f"synth vessels {height}x{width}", total) as advance:
        manifest = write_vessels_dataset(
            args.out_dir,
            count=args.count,
            height=height,
            width=width,
            seed=args.seed,
            val_fraction=args.val_fraction,
            tile=args.tile,
            report=args.report,
            advance=advance,
            on_scene=on_scene,
        )
    if args.report:
        print(format_report("overall", combine_reports(reports)), flush=True)
    splits = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    print(
        f"wrote {args.count} scene(s) of {height}x{width} ({splits}) to {args.out_dir}: "
        f"images/, masks/, dataset.yaml, synth.json",
        file=sys.stderr,
    )
    if not all(report.passed for report in reports):
        print("gigaseg synth vessels: a self-check is out of bounds (see FAIL above)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------
# objects


def _add_objects(kinds) -> None:
    parser = kinds.add_parser(
        "objects",
        help="detection: many small objects (vehicles, markers, digits) among distractors on large canvases",
        description=(
            "Small-object detection scenes as tiled BigTIFF (images/<split>/*.tif RGB) plus COCO instances json "
            "(annotations/instances_<split>.json), dataset.yaml (task: detection) and synth.json. Objects of "
            "four classes (vehicle, ring_marker, cross_marker, digit) from --min-size to --max-size pixels, "
            "never overlapping, among unannotated distractors (boxes without windows, discs, triangles, letters) "
            "on textured parcels; a share is placed across multiples of 512 px (tile borders). The same seed gives "
            "the same pixels and boxes; any size streams with bounded memory."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--count", type=int, default=8, help="number of scenes (default: 8)")
    parser.add_argument("--size", default="4096", help="scene size HxW or N for NxN (default: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="share of scenes in the val split, the last ones (default: 0.25)",
    )
    parser.add_argument("--density", type=float, default=40.0, help="annotated objects per megapixel (default: 40)")
    parser.add_argument(
        "--distractors", type=float, default=0.5, help="unannotated distractors per object (default: 0.5)"
    )
    parser.add_argument("--min-size", type=int, default=6, help="smallest object size in pixels (default: 6)")
    parser.add_argument("--max-size", type=int, default=60, help="largest object size in pixels (default: 60)")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side, a multiple of 16 (default: 512)")
    parser.set_defaults(run=_run_objects)


def _run_objects(args) -> int:
    from ..data.synth.objects import ObjectsConfig, write_objects_dataset
    from ..progress import progress_bar

    height, width = parse_image_size(args.size)
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    config = ObjectsConfig(density=args.density, distractors=args.distractors, sizes=(args.min_size, args.max_size))
    with progress_bar(f"synth objects {height}x{width}", args.count) as advance:
        manifest = write_objects_dataset(
            args.out_dir,
            count=args.count,
            height=height,
            width=width,
            seed=args.seed,
            val_fraction=args.val_fraction,
            tile=args.tile,
            config=config,
            advance=advance,
        )
    splits = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    objects = sum(sum(s["objects"][c] for c in manifest["classes"]) for s in manifest["scenes"])
    print(
        f"wrote {args.count} scene(s) of {height}x{width} ({splits}) with {objects} objects to {args.out_dir}: "
        f"images/, annotations/, dataset.yaml, synth.json",
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------------
# coco-mosaic


def _add_coco_mosaic(kinds) -> None:
    parser = kinds.add_parser(
        "coco-mosaic",
        help="detection: a local COCO (or any detection) dataset's images pasted 36 per 4096x4096 canvas",
        description=(
            "The paper's COCO-mosaic: the images of SRC (a detection dataset: dataset.yaml with task: detection "
            "pointing at COCO's images and instances json, or a YOLO data.yaml) pasted --per-canvas at a time in "
            "a grid on blank --canvas squares (shrunk only where larger than their cell), boxes moved with them; "
            "written as a COCO-layout dataset (tiled TIFF canvases, instances json, dataset.yaml, synth.json)."
        ),
    )
    parser.add_argument("source", metavar="SRC", help="the detection dataset to paste from")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (new, empty, or an earlier synth output)")
    parser.add_argument("--per-canvas", type=int, default=36, help="images per canvas (default: 36)")
    parser.add_argument("--canvas", type=int, default=4096, help="canvas side in pixels (default: 4096)")
    parser.add_argument("--splits", default="train,val", help="splits of SRC to build (default: train,val)")
    parser.add_argument("--limit", type=int, help="at most this many canvases per split (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: image order and offsets (default: 0)")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side, a multiple of 16 (default: 512)")
    parser.set_defaults(run=_run_coco_mosaic)


def _run_coco_mosaic(args) -> int:
    from ..data.synth.mosaic import write_coco_mosaic
    from ..progress import progress_bar

    splits = [s.strip() for s in str(args.splits).split(",") if s.strip()]
    if not splits:
        raise ConfigError(f"--splits names no split: {args.splits!r}")
    with progress_bar("synth coco-mosaic", None) as advance:
        manifest = write_coco_mosaic(
            args.source,
            args.out_dir,
            splits=splits,
            per_canvas=args.per_canvas,
            canvas=args.canvas,
            seed=args.seed,
            tile=args.tile,
            limit=args.limit,
            advance=advance,
        )
    made = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    print(
        f"wrote {made} canvas(es) of {args.canvas}x{args.canvas} to {args.out_dir}: "
        f"images/, annotations/, dataset.yaml, synth.json",
        file=sys.stderr,
    )
    return 0


#: ``add(kinds)`` per generator kind; each sets ``run`` on its parser
KINDS = (_add_landcover, _add_vessels, _add_ultramnist, _add_objects, _add_coco_mosaic)
