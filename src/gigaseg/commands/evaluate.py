"""``gigaseg evaluate``: score a checkpoint on a dataset split with streaming metrics."""

from __future__ import annotations

import argparse

from .common import add_inference_set


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a dataset split",
        description="Per-class IoU, mIoU, F1, accuracy and peak memory on a split; for a detector, COCO's AP, "
        "AP50, AP75, AP small/medium/large and AR (pycocotools).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-memory", help="memory budget, e.g. 2GB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_inference_set(parser)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Score the checkpoint on the split (:func:`gigaseg.api.evaluate`) and print the table and peak RSS.

    Args:
        args: the parsed ``gigaseg evaluate`` arguments.

    Returns:
        0; with ``--json`` the summary (plus ``peak_rss_bytes``) is also written there.
    """
    import json
    import resource

    from ..api import evaluate
    from ..io.atomic import atomic_output
    from ..memory import format_size
    from .common import parse_options

    summary = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        max_memory=args.max_memory,
        device=args.device,
        options=parse_options(args.set),
    )
    summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(format_summary(summary))
    print(f"peak memory (RSS): {format_size(summary['peak_rss_bytes'])}")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=float))
    return 0


def format_summary(summary: dict) -> str:
    """A rich table of per-class scores plus the headline numbers, as plain text.

    Args:
        summary: what :func:`gigaseg.api.evaluate` returned.

    Returns:
        The rendered table (120 columns wide); missing values show as "n/a".
    """
    from rich.console import Console
    from rich.table import Table

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    if summary.get("task") == "detection":
        return _format_detection(summary, number)
    excluded = f" (excluding {', '.join(summary['excluded'])})" if summary.get("excluded") else ""
    classification = summary.get("task") == "classification"
    if classification:
        title = (
            f"accuracy {number(summary['accuracy'])}, balanced accuracy "
            f"{number(summary['balanced_accuracy'])}, mean F1 {number(summary['mean_f1'])}"
        )
    else:
        title = (
            f"mIoU {number(summary['miou'])}{excluded}, mean F1 {number(summary['mean_f1'])}, "
            f"pixel accuracy {number(summary['pixel_accuracy'])}"
        )
    binary = summary.get("binary")
    if binary:

        def ratio(value) -> str:
            return value if isinstance(value, str) else number(value)

        title += (
            f"\npositive class: F1 {number(binary['f1'])}, IoU {number(binary['iou'])}, balanced accuracy "
            f"{number(binary['balanced_accuracy'])}, LR+ {ratio(binary['lr_positive'])}, "
            f"LR- {ratio(binary['lr_negative'])}"
        )
    detail = summary.get("detail")
    if detail:
        title += (
            f"\ndetail: mean boundary F1 {number(detail['mean_boundary_f1'])} (tolerance {detail['tolerance']} px), "
            f"mean thin-structure recall {number(detail['mean_thin_recall'])}"
        )
    table = Table(title=title)
    columns = ["class", "IoU", "F1", "precision", "recall"]
    if detail:
        columns += ["boundary F1", "thin recall"]
    for column in (*columns, "images" if classification else "pixels"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in summary["per_class"].items():
        cells = [number(row[k]) for k in ("iou", "f1", "precision", "recall")]
        if detail:
            cells += [number(detail["per_class"][name][k]) for k in ("boundary_f1", "thin_recall")]
        table.add_row(name, *cells, str(row["support"]))
    console = Console(width=120, record=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def _format_detection(summary: dict, number) -> str:
    """A detector's COCO scores: the headline APs (each labelled) and a per-class table."""
    from rich.console import Console
    from rich.table import Table

    headline = (
        f"AP {number(summary['AP'])} (COCO AP@[.50:.95]), AP75 {number(summary['AP75'])} (AP at IoU .75, the "
        f"paper's metric), AP50 {number(summary['AP50'])}\nAP small {number(summary['AP_small'])}, "
        f"AP medium {number(summary['AP_medium'])}, AP large {number(summary['AP_large'])} (COCO areas < 32², "
        f"< 96², larger); AR@{summary['max_detections']} {number(summary['AR100'])}; {summary['images']} images, "
        f"{summary['objects']} objects, {summary['detections']} detections"
    )
    table = Table(title="AP per class (COCO AP@[.50:.95])")
    for column in ("class", "AP", "objects"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in summary["per_class"].items():
        table.add_row(name, number(row["AP"]), str(row["objects"]))
    console = Console(width=120, record=True)
    with console.capture() as capture:
        console.print(table)
    return headline + "\n" + capture.get()
