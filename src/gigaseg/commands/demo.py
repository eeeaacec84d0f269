"""``gigaseg demo``: the whole path, offline, in a few minutes on a laptop CPU.

Makes a small synthetic land-cover training set, trains a model briefly, then
segments a larger synthetic scene (6144x6144 by default) with bounded memory and
scores it against the scene's generated ground truth.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``demo`` subcommand.

    Args:
        subparsers: the ``gigaseg`` parser's subparsers.

    Returns:
        The subcommand's parser (its ``run`` is set as the default of ``args.run``).
    """
    parser = subparsers.add_parser(
        "demo", help="synthetic data -> train briefly -> segment a large scene -> report", description=__doc__
    )
    parser.add_argument(
        "--out", default="gigaseg-demo", help="folder for data, run and predictions (default: %(default)s)"
    )
    parser.add_argument("--method", default="patch", help="method to train (default: %(default)s)")
    parser.add_argument("--encoder", default="resnet18", help="timm encoder (default: %(default)s)")
    parser.add_argument(
        "--scene-size", type=int, default=6144, help="side of the scene to segment (default: %(default)s)"
    )
    parser.add_argument("--train-scenes", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-memory", default="2GB", help="prediction memory budget (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Write the synthetic data, train, segment the scene, and print its scores, speed and peak memory.

    Args:
        args: the parsed ``gigaseg demo`` arguments.

    Returns:
        0.
    """
    import resource
    import time
    from pathlib import Path

    from ..api import predict, train
    from ..data.loader import load_dataset
    from ..data.synth.landcover import write_landcover_dataset
    from ..memory import format_size
    from ..metrics import ConfusionMatrix
    from ..training.recipe import TrainSettings

    out = Path(args.out)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    say(
        f"1/4 writing {args.train_scenes} synthetic training scenes of {args.train_size}x{args.train_size} "
        f"to {out / 'data'}"
    )
    write_landcover_dataset(
        out / "data",
        count=args.train_scenes,
        height=args.train_size,
        width=args.train_size,
        seed=args.seed,
        val_fraction=0.25,
    )
    say(f"2/4 writing a {args.scene_size}x{args.scene_size} scene to segment to {out / 'scene'}")
    write_landcover_dataset(
        out / "scene", count=1, height=args.scene_size, width=args.scene_size, seed=args.seed + 1, val_fraction=0.0
    )

    say(f"3/4 training {args.method} ({args.encoder}) for {args.epochs} epochs")
    options, lr, batch_size = demo_options(args.method)
    settings = TrainSettings(epochs=args.epochs, lr=lr, batch_size=batch_size, seed=args.seed, progress=True)
    result = train(
        args.method, out / "data", out / "run", encoder=args.encoder, options=options, settings=settings, force=True
    )  # the demo owns its folder: a rerun trains afresh
    val = result["history"][-1].get("val_miou") if result["history"] else None
    say(f"    trained; validation mIoU {float(val):.3f}" if val is not None else "    trained")

    scene_data = load_dataset(out / "scene", split="train")
    scene = scene_data[0]
    matrix = ConfusionMatrix(len(scene_data.classes), ignore_index=scene_data.ignore_index)
    say(f"4/4 segmenting {scene.image.path} ({scene.image.height}x{scene.image.width}) within {args.max_memory}")

    def score(window, labels):
        matrix.update(labels, scene.mask.read(window)[..., 0])

    prediction = predict(
        out / "run",
        scene.image,
        out / "predictions",
        max_memory=args.max_memory,
        overlay=True,
        on_band=score,
        resume=False,
        fast=True,  # BatchNorm folded, channels_last: masks equal the plain path's on >= 99.9% of pixels
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = matrix.summary(class_names=list(scene_data.classes))
    print()
    print(f"scene mIoU against the generated ground truth: {summary['miou']:.3f}")
    for name, row in summary["per_class"].items():
        iou = "n/a" if row["iou"] is None else f"{row['iou']:.3f}"
        print(f"  {name:<24} IoU {iou}")
    print(
        f"throughput: {prediction.megapixels_per_second:.2f} megapixels/s "
        f"({prediction.height * prediction.width / 1e6:.1f} Mpx in {prediction.seconds:.1f} s)"
    )
    print(f"peak memory of this process (RSS): {format_size(peak)}")
    print(f"mask:    {prediction.mask_path}")
    print(f"overlay: {prediction.overlay_path}")
    print(f"run:     {out / 'run'} (checkpoints, metrics.csv)")
    say("done")
    return 0


def demo_options(method: str) -> tuple[dict, float, int]:
    """Small, fast settings for the demo's CPU budget: options, learning rate and batch size.

    The patch baseline gets a light 64-channel FPN with the full-resolution head
    (``output_stride=1``, so 2-3 px roads can be drawn), class-weighted cross-entropy and
    crops centred on classes drawn uniformly (``crop_sampling="balanced"``, temperature 0),
    so that rare classes (urban, road, stream) are seen in a few minutes of training, in
    batches of 2 crops: the same pixels as larger batches in the same time, but four times
    the optimiser steps of batches of 8. Every method trains from scratch here, so the
    learning rate is far higher than the papers' fine-tuning rates.

    Args:
        method: the method trained.

    Returns:
        ``(options, lr, batch_size)``: method options for "patch" and "global" (``{}``, the
        method's defaults, for the others), the learning rate and the images (crops) per batch.
    """
    if method == "patch":
        fine = {"output_stride": 1, "loss": "weighted_ce", "crop_sampling": "balanced", "sampling_temperature": 0.0}
        return {"patch_size": 256, "overlap": 32, "crops_per_image": 8, "fpn_channels": 64, **fine}, 2e-3, 2
    if method == "global":
        return {"input_size": 512, "fpn_channels": 64}, 1e-3, 8
    return {}, 1e-3, 8
