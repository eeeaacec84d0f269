"""Small objects on large canvases: the patch-global detector against downsampled and sliced FCOS.

Data: ``gigaseg synth objects`` scenes (vehicles, ring and cross markers and digits of 6-60 px
among unannotated distractors on textured parcels; COCO detection layout), 4096x4096 by
default, a quarter of them in "val". Rows, every one trained from random weights with the same
encoder, epochs and learning rate, under one memory budget (``--max-memory``, 4 GB: the peak
RSS of each training child is measured):

- ``patchgd_detector (grid)``: the framework (``patchgd_detector``) on whole canvases, 512-px
  patches, the patch pyramids stitched into Z in canvas coordinates plus the global patch's;
- ``patchgd_detector (paper)``: the same with the paper's fusion (the mn+1 maps stacked in
  channels and reduced by a 1x1 convolution, one patch-sized map for the whole canvas);
- ``fcos (downsampled)``: FCOS on the whole canvas resized to ``--input-size``;
- ``fcos (sliced)``: FCOS trained on random full-resolution crops and predicted on
  overlapping tiles merged by NMS (SAHI's sliced prediction).

Scores: COCO's AP, AP50, AP75 (the paper's metric), AP small/medium/large and AR on the val
split (pycocotools via ``gigaseg evaluate``), with each run's training and prediction peak RSS.
Then the grid detector predicts one ``--large-size`` x ``--large-size`` scene (20000 px: tiles
of one canvas, merged) through ``gigaseg predict --max-memory 2GB`` in a child process whose
peak RSS is measured. Results: ``benchmarks/results/detection.{json,md,png}``.

    python benchmarks/detection.py [--work /tmp/gigaseg-detection] [--epochs 6] [--encoder test_resnet]

``--smoke`` runs the same path in a few minutes (4 dense scenes of 128 px, 64-px patches,
test_resnet, one epoch, a 512-px "large" scene), writing only to temporary folders.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gigaseg.bench import (
    MethodSpec,
    ObjectsConfig,
    compare_methods,
    comparison_markdown,
    format_size,
    measure_command,
    parse_size,
    write_objects_dataset,
    write_results,
)

RESULTS = Path(__file__).parent / "results"
NAME = "detection"
GB = 1 << 30


def specs(
    canvas: int, patch: int, input_size: int, crop: int, crops: int, width: int, epochs: int, lr: float
) -> list[MethodSpec]:
    """The four rows at one budget: same encoder, pyramid width, head depth, epochs and learning rate.

    Every detector keeps up to 1000 detections per view (a whole canvas holds hundreds of
    objects; FCOS's default of 100 per view would cap the whole-canvas rows' recall).

    Args:
        canvas: the scenes' side (the framework's canvas).
        patch: the framework's patch side.
        input_size: the downsampled FCOS's input side.
        crop: the sliced FCOS's crop and tile side.
        crops: the sliced FCOS's crops per training scene and epoch.
        width: the pyramid's channels (every row).
        epochs: epochs per row.
        lr: the learning rate (every row).

    Returns:
        The rows, in table order.
    """
    head = {"head_convs": 2, "max_level": 5, "max_detections": 1000}
    framework = {
        "patch_size": patch,
        "canvas_size": canvas,
        "latent_dim": width,
        "inner_iterations": 2,
        "sampling_fraction": 0.125,
        **head,
    }
    fcos = {"fpn_channels": width, **head}
    common = {"epochs": epochs, "lr": lr}
    return [
        MethodSpec(
            "patchgd_detector", "patchgd_detector (grid)", {**framework, "fusion": "grid"}, batch_size=1, **common
        ),
        MethodSpec(
            "patchgd_detector", "patchgd_detector (paper)", {**framework, "fusion": "paper"}, batch_size=1, **common
        ),
        MethodSpec(
            "fcos", "fcos (downsampled)", {**fcos, "mode": "whole", "input_size": input_size}, batch_size=2, **common
        ),
        MethodSpec(
            "fcos",
            "fcos (sliced)",
            {**fcos, "mode": "sliced", "crop_size": crop, "crops_per_image": crops},
            batch_size=4,
            **common,
        ),
    ]


def predict_large(run: Path, work: Path, side: int, budget: str, timeout: float | None) -> dict:
    """Predict one ``side`` x ``side`` synthetic scene with a trained detector, measuring the child's peak RSS.

    Args:
        run: the detector's run folder (its ``best.ckpt`` is used).
        work: where the scene and the outputs go.
        side: the scene's side in pixels.
        budget: ``--max-memory`` of the prediction.
        timeout: seconds the prediction may run.

    Returns:
        The scene's side, the budget, the prediction's peak RSS, seconds, exit code and detections.
    """
    data = work / f"large_{side}"
    if not (data / "dataset.yaml").exists():
        started = time.perf_counter()
        write_objects_dataset(data, count=1, height=side, width=side, seed=7, val_fraction=0.0)
        print(f"wrote a {side}x{side} scene in {time.perf_counter() - started:.0f} s", flush=True)
    image = next((data / "images").rglob("*.tif"))
    out = work / f"predict_{side}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "gigaseg", "predict", str(image), "--checkpoint", str(run / "best.ckpt")]
    argv += ["--out", str(out), "--max-memory", budget]
    report = measure_command(argv, timeout=timeout, capture_output=True)
    found = list(out.rglob("*.json"))
    detections = len(json.loads(found[0].read_text())) if found else None
    return {
        "side": side,
        "max_memory": budget,
        "peak_rss": report.peak_rss,
        "seconds": report.wall_s,
        "returncode": report.returncode,
        "detections": detections,
        "stderr_tail": (report.stderr or "")[-2000:],
    }


def detection_markdown(results: dict) -> str:
    """The comparison table (with the notes), the budget every row trained under and the large prediction.

    Args:
        results: what :func:`main` collects (``compare_methods``' results plus ``budget``,
            ``large_prediction`` and ``notes``).

    Returns:
        The markdown of ``benchmarks/results/detection.md``.
    """
    text = comparison_markdown(results)
    budget = results.get("budget")
    if budget:
        epochs = sorted({row["spec"]["epochs"] for row in results["methods"]})
        text += (
            f"\nBudget of every row: {budget['scenes']} scenes of {budget['size']}x{budget['size']} px (a quarter "
            f"in val), encoder `{budget['encoder']}` from random weights, "
            f"{'/'.join(str(e) for e in epochs)} epochs, `--max-memory {budget['max_memory']}` for training and "
            "evaluation (train peak RSS is the training child's whole process).\n"
        )
    big = results.get("large_prediction")
    if big:
        text += (
            f"\nPrediction of a {big['side']}x{big['side']} scene by patchgd_detector (grid), canvas-sized tiles "
            f"merged, `--max-memory {big['max_memory']}`: peak RSS {format_size(big['peak_rss'])}, "
            f"{big['seconds']:.0f} s, {big['detections']} detections (exit code {big['returncode']}).\n"
        )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="dataset and runs (default: /tmp/gigaseg-detection)")
    parser.add_argument("--scenes", type=int, default=12, help="scenes written (a quarter go to val)")
    parser.add_argument("--size", type=int, default=4096, help="scene side in pixels (the canvas)")
    parser.add_argument("--patch", type=int, default=512, help="the framework's patch side")
    parser.add_argument("--input-size", type=int, default=1024, help="the downsampled FCOS's input side")
    parser.add_argument("--crop", type=int, default=512, help="the sliced FCOS's crop and tile side")
    parser.add_argument("--crops", type=int, default=32, help="the sliced FCOS's crops per scene and epoch")
    parser.add_argument("--width", type=int, default=32, help="pyramid channels of every detector")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--encoder", default="test_resnet")
    parser.add_argument("--max-memory", default="4GB", help="training and evaluation budget")
    parser.add_argument("--large-size", type=int, default=20000, help="side of the large prediction (0: skip)")
    parser.add_argument("--large-budget", default="2GB")
    parser.add_argument("--methods", help="comma-separated row names (default: all four)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds any one child may run")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models, temporary output (a smoke run)")
    args = parser.parse_args(argv)

    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-detection-smoke-"))
        work = Path(args.work) if args.work else scratch / "work"
        results_dir = args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        scenes, size, encoder, large = 4, 128, "test_resnet", 512
        density = 800.0  # about 13 objects per 128-px scene, so AP is defined
        rows = specs(canvas=128, patch=64, input_size=64, crop=64, crops=8, width=16, epochs=1, lr=args.lr)
    else:
        work = Path(args.work or "/tmp/gigaseg-detection")
        results_dir = args.results or RESULTS
        scenes, size, encoder, large = args.scenes, args.size, args.encoder, args.large_size
        density = None  # ObjectsConfig's: 40 objects per megapixel
        rows = specs(size, args.patch, args.input_size, args.crop, args.crops, args.width, args.epochs, args.lr)
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {row.name for row in rows})
        if unknown:
            parser.error(f"unknown rows {', '.join(unknown)}; use {', '.join(row.name for row in rows)}")
        rows = [row for row in rows if row.name in wanted]

    data = work / "data"
    if not (data / "dataset.yaml").exists():
        config = ObjectsConfig(density=density) if density else None
        write_objects_dataset(data, count=scenes, height=size, width=size, seed=0, val_fraction=0.25, config=config)
    started = time.perf_counter()
    results = compare_methods(rows, data, work, encoder=encoder, max_memory=parse_size(args.max_memory))
    grid = next((r for r in rows if r.name == "patchgd_detector (grid)"), None)
    if large and grid is not None:
        results["large_prediction"] = predict_large(
            work / "runs" / grid.name, work, large, args.large_budget, args.timeout
        )
    results["wall_seconds"] = time.perf_counter() - started
    results["budget"] = {"max_memory": args.max_memory, "scenes": scenes, "size": size, "encoder": encoder}
    results_dir.mkdir(parents=True, exist_ok=True)
    earlier = results_dir / f"{NAME}.json"
    if earlier.exists():  # notes are written by hand after a run
        results["notes"] = json.loads(earlier.read_text()).get("notes", [])
    write_results(results, work)
    (work / "results.md").write_text(detection_markdown(results))
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", results_dir / f"{NAME}.{suffix}")
    print(comparison_markdown(results))
    print(f"results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
