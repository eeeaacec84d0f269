"""Thin structures in the spirit of DRIVE: full-resolution heads against the downsampled view.

Data: ``gigaseg synth vessels`` scenes (branching vessels 1-5 px wide, faint where thin, on a
textured, unevenly lit background; binary masks), 2048x2048 by default. Rows, every one
trained from random weights with the same encoder, epochs and learning rate:

- ``global``: the downsampled baseline (the whole scene resized to ``--global-size``, GLNet's
  global branch with its 1/4 head), the analogue of the downsampled U-Net of the seed paper;
- ``patch_s4``: the patch baseline at full resolution with the paper heads' output stride 4
  (logits at 1/4 of each patch, upsampled);
- ``patch_s1``: the same patches with ``output_stride=1`` (gigaseg's full-resolution head),
  balanced crops and CE + Lovasz, the settings the README recommends for fine structures.

The scores are the vessel class's F1 and IoU, boundary F1 (2 px) and thin-structure recall
on the val split, with each run's training and prediction peak RSS and speed, written to
``benchmarks/results/thin_structures.{json,md,png}``.

    python benchmarks/thin_structures.py [--work /tmp/gigaseg-vessels] [--epochs 20]

``--smoke`` runs the same path in seconds (3 scenes of 128 px, test_resnet, one epoch),
writing only to temporary folders.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from gigaseg.bench import MethodSpec, compare_methods, comparison_markdown, write_results, write_vessels_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "thin_structures"

#: the full-resolution settings the README recommends for roads, vessels and borders
FINE = {"output_stride": 1, "loss": "ce_lovasz", "crop_sampling": "balanced"}


def specs(patch: int, global_size: int, channels: int, crops: int, epochs: int, lr: float, batch: int):
    """The three rows: the patch baseline at stride 1, the downsampled baseline, the patch baseline at stride 4.

    Args:
        patch: the patch side in pixels.
        global_size: the side the global baseline resizes each scene to.
        channels: the FPN's channels.
        crops: random crops per training image and epoch.
        epochs: training epochs of every row.
        lr: the learning rate of every row.
        batch: the batch size of every row.

    Returns:
        The ``MethodSpec`` rows in table order.
    """
    patch_options = {"patch_size": patch, "overlap": patch // 8, "fpn_channels": channels, "crops_per_image": crops}
    common = {"epochs": epochs, "lr": lr, "batch_size": batch}
    return [  # the full-resolution row first: a run cut short still has the row that matters most
        MethodSpec(method="patch", label="patch_s1", options={**patch_options, **FINE}, **common),
        MethodSpec(method="global", options={"input_size": global_size, "fpn_channels": channels}, **common),
        MethodSpec(method="patch", label="patch_s4", options={**patch_options, "output_stride": 4}, **common),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="dataset and runs (default: /tmp/gigaseg-vessels)")
    parser.add_argument("--scenes", type=int, default=8, help="scenes written (a quarter go to val)")
    parser.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crops", type=int, default=16, help="crops per training scene and epoch")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--methods", help="comma-separated row names (default: all three)")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models, temporary output (a smoke run)")
    args = parser.parse_args(argv)

    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-vessels-smoke-"))
        work = Path(args.work) if args.work else scratch / "work"
        results_dir = args.results or scratch / "results"
        scenes, size, encoder = 3, 128, "test_resnet"
        rows = specs(patch=64, global_size=64, channels=16, crops=2, epochs=1, lr=args.lr, batch=2)
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    else:
        work = Path(args.work or "/tmp/gigaseg-vessels")
        results_dir = args.results or RESULTS
        scenes, size, encoder = args.scenes, args.size, args.encoder
        rows = specs(256, size // 4, 64, args.crops, args.epochs, args.lr, args.batch_size)
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {row.name for row in rows})
        if unknown:
            parser.error(f"unknown rows {', '.join(unknown)}; use {', '.join(row.name for row in rows)}")
        rows = [row for row in rows if row.name in wanted]

    data = work / "data"
    if not (data / "dataset.yaml").exists():
        write_vessels_dataset(data, count=scenes, height=size, width=size, seed=0, val_fraction=0.25)
    results = compare_methods(rows, data, work, encoder=encoder)
    results_dir.mkdir(parents=True, exist_ok=True)
    earlier = results_dir / f"{NAME}.json"
    if earlier.exists():  # notes are written by hand after a run
        results["notes"] = json.loads(earlier.read_text()).get("notes", [])
    write_results(results, work)
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", results_dir / f"{NAME}.{suffix}")
    print(comparison_markdown(results))
    print(f"results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
