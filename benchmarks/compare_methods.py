"""All methods side by side on the synthetic land-cover benchmark (same encoder, same budget).

Writes the synthetic dataset (unless it exists), then runs `gigaseg.bench.compare_methods`:
each method trains in a fresh child process and is evaluated on the validation scenes
through the streaming predictor. Results: benchmarks/results/compare_methods.{json,md,png}.

The CPU budget here is tiny (2 cores, minutes per method), so the settings are scaled
down from the papers: ResNet-18 encoders, a 64-channel FPN decoder where the method has
one, 256-px local patches and 512-px global views on 1536-px scenes, a few epochs per
stage at learning rate 1e-3. Read the figures as a smoke test of the thesis, not as a
reproduction of the papers' numbers.

    python benchmarks/compare_methods.py [--methods global,patch,glnet,magnet,icnet] [--epochs 4]

``--output-stride 1`` trains every method with its full-resolution settings instead (rows
labelled "(stride 1)": ``FULL_RESOLUTION``'s options on top of ``OPTIONS``); with
``--append`` the stride-4 rows stay beside them. ``--stride-only`` changes only the head
(each method's default loss and crops), which separates the two causes.

``--smoke`` runs the same path in seconds (4 scenes of 128 px, test_resnet, one epoch, MagNet
and one of its variants unless ``--methods``), writing only to ``--data``, ``--work`` and
``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from gigaseg import GigasegError
from gigaseg.bench import (
    MethodSpec,
    compare_methods,
    comparison_markdown,
    parse_options,
    score_variants,
    write_landcover_dataset,
    write_results,
)

RESULTS = Path(__file__).parent / "results"

#: CPU-scale options per method (paper defaults otherwise)
OPTIONS = {
    "global": {"input_size": 512, "fpn_channels": 64},
    "patch": {"patch_size": 256, "overlap": 64, "fpn_channels": 64, "crops_per_image": 8},
    # GLNet with the baselines' 64-channel FPN and their patch and global-view sizes, so the
    # difference is the global branch and the feature-map sharing. (At the paper's 256-channel
    # FPN a stage-2 epoch cost ~20 min here: its FPN convolutions cost 6x the 64-channel ones.)
    # Its stages 2 and 3 run every patch of every image (36 here) where the patch baseline
    # samples 8 crops
    "glnet": {"size_g": 512, "size_p": 256, "min_overlap": 0, "fpn_channels": 64},
    # the DeepGlobe preset's shape (coarsest scale ~ the input, 2x steps) scaled to 1536-px scenes
    "magnet": {
        "scales": [[384, 384], [768, 768], [1536, 1536]],
        "input_size": [384, 384],
        "points": 0.75,
        "median_kernel": 11,
        "crops_per_image": 8,
    },
    "icnet": {"crop_size": 768, "crops_per_image": 4, "tile_size": [1536, 1536], "tile_overlap": 128},
}

#: ``--output-stride 1|2``: what each method adds for fine structures (logits at that stride,
#: class-weighted CE, crops centred on classes drawn uniformly where the method samples crops)
FULL_RESOLUTION = {
    "global": {"loss": "weighted_ce"},
    "patch": {"loss": "weighted_ce", "crop_sampling": "balanced", "sampling_temperature": 0.0},
    "glnet": {"loss": "weighted_ce"},
    "magnet": {"loss": "weighted_ce", "crop_sampling": "balanced", "sampling_temperature": 0.0},
    "icnet": {"loss": "weighted_ce", "crop_sampling": "balanced", "sampling_temperature": 0.0},
}

#: rows scored from a method's trained weights with other inference options
VARIANTS = {
    # MagNet's own baseline (issue 5: MagNet must beat its backbone run at the coarsest scale alone)
    # and MagNet-Fast (the 3 most uncertain patches per scale, 90% of their pixels)
    "magnet": {"backbone, coarsest scale": {"refine": "never"}, "fast": {"fast_patches": 3, "points": 0.9}},
}

#: ``--smoke``: the same methods scaled to 128-px scenes
SMOKE_OPTIONS = {
    "global": {"input_size": 64, "fpn_channels": 16},
    "patch": {"patch_size": 64, "overlap": 16, "fpn_channels": 16, "crops_per_image": 2},
    "glnet": {"size_g": 64, "size_p": 64, "min_overlap": 0, "fpn_channels": 16},
    "magnet": {
        "scales": [[32, 32], [64, 64], [128, 128]],
        "input_size": [32, 32],
        "points": 0.75,
        "median_kernel": 3,
        "crops_per_image": 2,
    },
    "icnet": {"width": 0.25, "crop_size": 64, "crops_per_image": 2, "tile_size": [128, 128], "tile_overlap": 16},
}
#: ``--smoke``: one variant per method (each is one more child process)
SMOKE_VARIANTS = {method: dict(list(variants.items())[-1:]) for method, variants in VARIANTS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated (default: global,patch,glnet,magnet,icnet; --smoke: magnet)")
    parser.add_argument("--data", help="the synthetic dataset (default: /tmp/gigaseg-compare-data)")
    parser.add_argument("--work", help="runs and results of this invocation (default: /tmp/gigaseg-compare)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--epochs", type=int, default=4, help="per training stage")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models, temporary output (a smoke run)")
    parser.add_argument(
        "--output-stride",
        type=int,
        choices=(1, 2, 4),
        default=4,
        help="4: the papers' heads; 1 or 2: every method with FULL_RESOLUTION's settings, rows labelled so",
    )
    parser.add_argument(
        "--stride-only",
        action="store_true",
        help="with --output-stride 1|2: keep each method's default loss and crops (rows labelled "
        "'(stride N, default loss)'), to separate the head from the rare-class training",
    )
    parser.add_argument(
        "--tag",
        help="added to the rows' labels, e.g. '24 epochs' for rows at another budget than the committed ones",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another option for every method of this run (VALUE read as YAML, as gigaseg train's --set), "
        "e.g. coarse_logits=true; name it in --tag",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other methods of the committed results (same data, machine and settings)",
    )
    parser.add_argument(
        "--variants-only",
        action="store_true",
        help="train nothing: score the VARIANTS of --methods from their runs in --work and add "
        "them to the committed results",
    )
    args = parser.parse_args(argv)
    try:
        extra = parse_options(args.set)  # as gigaseg train's --set reads them
    except GigasegError as error:
        parser.error(str(error))
    if args.smoke:
        scratch = (
            None
            if args.data and args.work and args.results
            else Path(tempfile.mkdtemp(prefix="gigaseg-compare-smoke-"))
        )
        data = Path(args.data) if args.data else scratch / "data"
        work = Path(args.work) if args.work else scratch / "work"
        results_dir = args.results or scratch / "results"
        methods, options, variants = args.methods or "magnet", SMOKE_OPTIONS, SMOKE_VARIANTS
        scenes, size, encoder, epochs, batch_size = 4, 128, "test_resnet", 1, 2
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    else:
        data = Path(args.data or "/tmp/gigaseg-compare-data")
        work = Path(args.work or "/tmp/gigaseg-compare")
        results_dir = args.results or RESULTS
        methods, options, variants = args.methods or "global,patch,glnet,magnet,icnet", OPTIONS, VARIANTS
        scenes, size, encoder, epochs, batch_size = args.scenes, args.size, args.encoder, args.epochs, args.batch_size
    if not (data / "dataset.yaml").exists():
        write_landcover_dataset(data, count=scenes, height=size, width=size, seed=0, val_fraction=0.25)
    fine = args.output_stride != 4
    if args.stride_only and not fine:
        parser.error("--stride-only needs --output-stride 1 or 2")
    specs = [
        MethodSpec(
            method=m,
            label=(
                f"{m} (stride {args.output_stride}"
                + (", default loss" if args.stride_only else "")
                + (f", {args.tag}" if args.tag else "")
                + ")"
            )
            if fine
            else (f"{m} ({args.tag})" if args.tag else None),
            options={
                **options.get(m, {}),
                **({} if args.stride_only else FULL_RESOLUTION[m]),
                "output_stride": args.output_stride,
                **extra,
            }
            if fine
            else {**options.get(m, {}), **extra},
            epochs=epochs,
            lr=args.lr,
            batch_size=batch_size,
            variants=variants.get(m, {}),
        )
        for m in methods.split(",")
    ]
    committed = results_dir / "compare_methods.json"
    if args.variants_only:
        results = json.loads(committed.read_text())
        for spec in specs:
            score_variants(spec, results, work, data, split=results["split"], max_memory=results["max_memory"])
        write_results(results, results_dir, stem="compare_methods")
        print(comparison_markdown(results))
        return
    results = compare_methods(specs, data, work, encoder=encoder)
    for row in results["methods"]:  # rows from several invocations keep their own provenance
        row["measured"] = {key: results["machine"][key] for key in ("commit", "date", "command")}
    if args.append and committed.exists():
        earlier = json.loads(committed.read_text())
        rerun = {m["name"] for m in results["methods"]}
        results["methods"] = [m for m in earlier["methods"] if m["name"] not in rerun] + results["methods"]
        results["commands"] = earlier.get("commands", []) + ["python " + results["machine"]["command"]]
        results["notes"] = earlier.get("notes", [])  # hand-written after earlier runs; updated by hand
        write_results(results, work)
    results_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", results_dir / f"compare_methods.{suffix}")
    print(comparison_markdown(results))
    print(f"results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
