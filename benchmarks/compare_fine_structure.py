"""GLNet against the global and patch baselines on the land-cover fine structure as a binary task.

In the 7-class comparison (compare_methods.py) no method finds roads or streams (1.3% and
0.1% of the pixels, 2-3 px wide) within its training budget, so GLNet's claim on fine
structure cannot be read there. Here the fine classes are the only positive class: the data
of benchmarks/patchgd.py's land-cover part (40 scenes of 1024x1024, road or stream against
everything else; 30 train / 10 val), with the 7-class comparison's encoder and decoder
widths, and each view scaled to 1024-px scenes: a 256-px global view (a 4x downsample, where
the lines are under 1 px wide) and 256-px patches.

    python benchmarks/compare_fine_structure.py [--work /tmp/gigaseg-fine] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from gigaseg.bench.compare import MethodSpec, compare, markdown, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

OPTIONS = {
    "global": {"input_size": 256, "fpn_channels": 64},
    "patch": {"patch_size": 256, "overlap": 64, "fpn_channels": 64, "crops_per_image": 8},
    "glnet": {"size_g": 256, "size_p": 256, "min_overlap": 0, "fpn_channels": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="global,patch,glnet")
    parser.add_argument("--work", default="/tmp/gigaseg-fine")
    parser.add_argument(
        "--source",
        default="/tmp/pgd_bench/landcover_1024",
        help="a 7-class land-cover dataset of 1024-px scenes (patchgd.py writes one)",
    )
    parser.add_argument("--epochs", type=int, default=4, help="per training stage")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--encoder", default="resnet18")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from patchgd import binary_landcover

    source, work = Path(args.source), Path(args.work)
    if not (source / "dataset.yaml").exists():
        from gigaseg.data.synth.landcover import write_landcover_dataset

        write_landcover_dataset(source, count=40, height=1024, width=1024, seed=3, val_fraction=0.25)
    data = binary_landcover(source, work / "data")
    specs = [
        MethodSpec(method=m, options=OPTIONS[m], epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
        for m in args.methods.split(",")
    ]
    results = compare(specs, data, work, encoder=args.encoder)
    RESULTS.mkdir(exist_ok=True)
    earlier = RESULTS / "compare_fine_structure.json"
    if earlier.exists():  # notes are written by hand after a run
        results["notes"] = json.loads(earlier.read_text()).get("notes", [])
    write_results(results, work)
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", RESULTS / f"compare_fine_structure.{suffix}")
    print(markdown(results))


if __name__ == "__main__":
    main()
