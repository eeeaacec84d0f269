"""GLNet against the global and patch baselines on the land-cover fine structure as a binary task.

In the 7-class comparison (compare_methods.py) no method finds roads or streams (1.3% and
0.1% of the pixels, 2-3 px wide) within its training budget, so GLNet's claim on fine
structure cannot be read there. Here the fine classes are the only positive class: the data
of benchmarks/patchgd.py's land-cover part (40 scenes of 1024x1024, road or stream against
everything else; 30 train / 10 val), with the 7-class comparison's encoder and decoder
widths, and each view scaled to 1024-px scenes: a 256-px global view (a 4x downsample, where
the lines are under 1 px wide) and 256-px patches.

    python benchmarks/compare_fine_structure.py [--work /tmp/gigaseg-fine] [--epochs 4]

``--smoke`` runs the same path in seconds (4 scenes of 128 px, test_resnet, one epoch, GLNet
alone unless ``--methods``), writing only to ``--work`` and ``--results`` (default: temporary
folders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from gigaseg.bench import MethodSpec, compare_methods, comparison_markdown, write_landcover_dataset, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

OPTIONS = {
    "global": {"input_size": 256, "fpn_channels": 64},
    "patch": {"patch_size": 256, "overlap": 64, "fpn_channels": 64, "crops_per_image": 8},
    "glnet": {"size_g": 256, "size_p": 256, "min_overlap": 0, "fpn_channels": 64},
}
#: ``--smoke``: the same views scaled to 128-px scenes
SMOKE_OPTIONS = {
    "global": {"input_size": 64, "fpn_channels": 16},
    "patch": {"patch_size": 64, "overlap": 16, "fpn_channels": 16, "crops_per_image": 2},
    "glnet": {"size_g": 64, "size_p": 64, "min_overlap": 0, "fpn_channels": 16},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated (default: global,patch,glnet; --smoke: glnet)")
    parser.add_argument("--work", help="runs and the binary dataset (default: /tmp/gigaseg-fine)")
    parser.add_argument(
        "--source",
        help="a 7-class land-cover dataset of 1024-px scenes (default /tmp/pgd_bench/landcover_1024; patchgd.py "
        "writes one; written here when missing)",
    )
    parser.add_argument("--epochs", type=int, default=4, help="per training stage")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models, temporary output (a smoke run)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from patchgd import binary_landcover

    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-fine-smoke-"))
        work = Path(args.work) if args.work else scratch / "work"
        source = Path(args.source) if args.source else work / "source"
        results_dir = args.results or scratch / "results"
        methods, options, encoder, epochs = args.methods or "glnet", SMOKE_OPTIONS, "test_resnet", 1
        scenes = {"count": 4, "height": 128, "width": 128}
    else:
        work = Path(args.work or "/tmp/gigaseg-fine")
        source = Path(args.source or "/tmp/pgd_bench/landcover_1024")
        results_dir = args.results or RESULTS
        methods, options, encoder, epochs = args.methods or "global,patch,glnet", OPTIONS, args.encoder, args.epochs
        scenes = {"count": 40, "height": 1024, "width": 1024}
    if args.smoke and results_dir.resolve() == RESULTS.resolve():
        parser.error("--smoke never writes to benchmarks/results")
    if not (source / "dataset.yaml").exists():
        write_landcover_dataset(source, **scenes, seed=3, val_fraction=0.25)
    data = binary_landcover(source, work / "data")
    specs = [
        MethodSpec(method=m, options=options[m], epochs=epochs, lr=args.lr, batch_size=args.batch_size)
        for m in methods.split(",")
    ]
    results = compare_methods(specs, data, work, encoder=encoder)
    results_dir.mkdir(parents=True, exist_ok=True)
    earlier = results_dir / "compare_fine_structure.json"
    if earlier.exists():  # notes are written by hand after a run
        results["notes"] = json.loads(earlier.read_text()).get("notes", [])
    write_results(results, work)
    for suffix in ("json", "md", "png"):
        shutil.copy(work / f"results.{suffix}", results_dir / f"compare_fine_structure.{suffix}")
    print(comparison_markdown(results))
    print(f"results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
