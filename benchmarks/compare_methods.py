"""All methods side by side on the synthetic land-cover benchmark (same encoder, same budget).

Writes the synthetic dataset (unless it exists), then runs `gigaseg.bench.compare`:
each method trains in a fresh child process and is evaluated on the validation scenes
through the streaming predictor. Results: benchmarks/results/compare_methods.{json,md,png}.

The CPU budget here is tiny (2 cores, minutes per method), so the settings are scaled
down from the papers: ResNet-18 encoders, a 64-channel FPN decoder where the method has
one, 256-px local patches and 512-px global views on 1536-px scenes, a few epochs per
stage at learning rate 1e-3. Read the figures as a smoke test of the thesis, not as a
reproduction of the papers' numbers.

    python benchmarks/compare_methods.py [--methods global,patch,glnet,magnet,icnet] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from gigaseg.bench.compare import MethodSpec, compare, markdown, score_variants, write_results
from gigaseg.data.synth.landcover import write_landcover_dataset

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

#: rows scored from a method's trained weights with other inference options
VARIANTS = {
    # MagNet's own baseline (issue 5: MagNet must beat its backbone run at the coarsest scale alone)
    # and MagNet-Fast (the 3 most uncertain patches per scale, 90% of their pixels)
    "magnet": {"backbone, coarsest scale": {"refine": "never"}, "fast": {"fast_patches": 3, "points": 0.9}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="global,patch,glnet,magnet,icnet")
    parser.add_argument("--data", default="/tmp/gigaseg-compare-data")
    parser.add_argument("--work", default="/tmp/gigaseg-compare")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--epochs", type=int, default=4, help="per training stage")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet18")
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
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "dataset.yaml").exists():
        write_landcover_dataset(data, count=args.scenes, height=args.size, width=args.size, seed=0, val_fraction=0.25)
    specs = [
        MethodSpec(
            method=m,
            options=OPTIONS.get(m, {}),
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            variants=VARIANTS.get(m, {}),
        )
        for m in args.methods.split(",")
    ]
    work = Path(args.work)
    if args.variants_only:
        results = json.loads((RESULTS / "compare_methods.json").read_text())
        for spec in specs:
            score_variants(spec, results, work, data, split=results["split"], max_memory=results["max_memory"])
        write_results(results, RESULTS, stem="compare_methods")
        print(markdown(results))
        return
    results = compare(specs, data, work, encoder=args.encoder)
    if args.append and (RESULTS / "compare_methods.json").exists():
        earlier = json.loads((RESULTS / "compare_methods.json").read_text())
        rerun = {m["name"] for m in results["methods"]}
        results["methods"] = [m for m in earlier["methods"] if m["name"] not in rerun] + results["methods"]
        results["note"] = "methods were measured in separate invocations on the same machine and data"
        write_results(results, work)
    RESULTS.mkdir(exist_ok=True)
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", RESULTS / f"compare_methods.{suffix}")
    print(markdown(results))


if __name__ == "__main__":
    main()
