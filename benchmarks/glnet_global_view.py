"""What GLNet's global-view policy costs on images much larger than its training scenes (issue 4).

With the ``"image"`` policy (the default of GLNet's ``global_context`` option) GLNet's global branch
sees the whole image resized to ``size_g``: on a scene 4x larger per side than the training
scenes the global view is a 4x coarser downsample than in training. The patch baseline sees
nothing but full-resolution patches, so its accuracy does not depend on the image size: the
difference between the two methods' change in mIoU from training-size scenes to large scenes
is what the policy costs. The same GLNet checkpoint is also scored with the ``"tile"`` policy
(``global_context="tile"``; ``context_tile`` = the training scenes' side), whose global
view keeps the training scale.

Takes the GLNet and patch runs of ``benchmarks/compare_methods.py`` (same data, encoder and
training budget), writes large scenes of the same synthetic generator (feature sizes are
fixed in pixels, so the class statistics are the same at any scene size), and scores both
checkpoints on the comparison's validation scenes and on the large ones, each evaluation in
a fresh child process (peak RSS, megapixels per second).

    python benchmarks/glnet_global_view.py --runs /tmp/cmp3-a/runs [--size 6144] [--count 2] [--reuse]

``--smoke`` runs the same path in seconds without compare_methods.py's runs: it writes 128-px
training scenes and 256-px large ones, trains tiny GLNet and patch runs (test_resnet, one
epoch, in this process) and scores them as above, writing only to ``--work`` and ``--results``
(default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
#: rows: (label, run of compare_methods.py, inference options; TRAINING_SIDE: the training scenes' side)
TRAINING_SIDE = "training scene side"
ROWS = (
    ("glnet", "glnet", {}),
    ("glnet, tile policy", "glnet", {"global_context": "tile", "context_tile": TRAINING_SIDE}),
    ("patch", "patch", {}),
)
#: ``--smoke``: the runs' methods and options, scaled to 128-px training scenes
SMOKE_RUNS = {
    "glnet": {"size_g": 64, "size_p": 64, "min_overlap": 0, "fpn_channels": 16},
    "patch": {"patch_size": 64, "overlap": 16, "fpn_channels": 16, "crops_per_image": 2},
}


def evaluate(run: Path, data: Path, options: dict) -> dict:
    from gigaseg.bench import evaluate_job, measure_call

    scored = measure_call(evaluate_job, (str(run), str(data), "val", None, options or None))
    summary = scored.value["summary"]
    return {
        "miou": summary["miou"],
        "per_class_iou": {k: v["iou"] for k, v in summary["per_class"].items()},
        "peak_rss": scored.peak_rss,
        "megapixels_per_second": scored.value["megapixels_per_second"],
    }


def markdown(results: dict) -> str:
    from gigaseg.bench import machine_header

    small, large = results["small"], results["large"]
    lines = [
        "# GLNet's global view on images larger than the training scenes",
        "",
        machine_header(results["machine"]),
        f"Checkpoints: the `glnet` and `patch` runs of compare_methods.md (trained on {small['size']}-px "
        f"scenes). Global view: the whole image resized to {results['size_g']} px (a "
        f"{small['size'] / results['size_g']:.0f}x downsample of the training scenes, "
        f"{large['size'] / results['size_g']:.0f}x of the large ones).",
        "",
        f"| method | mIoU, {small['count']} val scenes of {small['size']}² | mIoU, {large['count']} scenes of "
        f"{large['size']}² | change | peak RSS ({large['size']}²) | Mpx/s ({large['size']}²) |",
        "|---|---|---|---|---|---|",
    ]
    for method in results["scores"]:
        a, b = results["scores"][method]["small"], results["scores"][method]["large"]
        lines.append(
            f"| {method} | {a['miou']:.3f} | {b['miou']:.3f} | {b['miou'] - a['miou']:+.3f} | "
            f"{b['peak_rss'] / 1e9:.2f} GB | {b['megapixels_per_second']:.2f} |"
        )
    lines += [
        "",
        f"Cost of the whole-image global view at {large['size']}² (GLNet's change minus the patch "
        f"baseline's): {results['policy_cost_miou']:+.3f} mIoU.",
    ]
    if "tile_policy_cost_miou" in results:
        lines.append(f"The same with the tile policy: {results['tile_policy_cost_miou']:+.3f} mIoU.")
    lines.append("")
    lines += [f"- {note}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    classes = list(results["scores"]["glnet"]["large"]["per_class_iou"])
    lines += [
        "Per-class IoU:",
        "",
        "| method, scenes | " + " | ".join(classes) + " |",
        "|---" * (1 + len(classes)) + "|",
    ]
    for method in results["scores"]:
        for key in ("small", "large"):
            row = results["scores"][method][key]["per_class_iou"]
            lines.append(
                f"| {method}, {results[key]['size']}² | "
                + " | ".join("n/a" if row[c] is None else f"{row[c]:.3f}" for c in classes)
                + " |"
            )
    return "\n".join(lines) + "\n"


def smoke_runs(work: Path) -> tuple[Path, Path]:
    """``--smoke``: a small land-cover dataset and tiny GLNet and patch runs on it (what
    compare_methods.py's data and runs are for a full invocation).

    Args:
        work: the folder they are written to.

    Returns:
        The dataset folder and the runs folder.
    """
    from gigaseg import TrainSettings, train
    from gigaseg.bench import write_landcover_dataset

    data, runs = work / "data", work / "runs"
    if not (data / "dataset.yaml").exists():
        write_landcover_dataset(data, count=4, height=128, width=128, seed=0, val_fraction=0.25)
    settings = TrainSettings(epochs=1, batch_size=2, lr=1e-3, progress=False)
    for method, options in SMOKE_RUNS.items():
        if not (runs / method / "last.ckpt").exists():
            train(method, data, runs / method, encoder="test_resnet", options=options, settings=settings, force=True)
    return data, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", help="the runs folder of a compare_methods.py work folder (required but with --smoke)"
    )
    parser.add_argument("--data", help="the comparison's dataset (default: /tmp/gigaseg-compare-data)")
    parser.add_argument("--large", help="where the large scenes are written (default: /tmp/gigaseg-glnet-large)")
    parser.add_argument("--size", type=int, help="side of the large scenes (default 6144; --smoke: 256)")
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the committed scores of rows whose options are unchanged (score only new rows)",
    )
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--work", type=Path, help="--smoke: the folder for its data and runs (default: temporary)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models, temporary output (a smoke run)")
    args = parser.parse_args(argv)

    import yaml

    from gigaseg import load_model
    from gigaseg.bench import describe_machine, write_landcover_dataset

    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-global-view-smoke-"))
        work = args.work or scratch / "work"
        results_dir = args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        data, runs = smoke_runs(work)
        large, size = Path(args.large) if args.large else work / "large", args.size or 256
    else:
        if not args.runs:
            parser.error("--runs is required (but with --smoke)")
        runs, data = Path(args.runs), Path(args.data or "/tmp/gigaseg-compare-data")
        large, size = Path(args.large or "/tmp/gigaseg-glnet-large"), args.size or 6144
        results_dir = args.results or RESULTS
    if not (large / "dataset.yaml").exists():
        write_landcover_dataset(large, count=args.count, height=size, width=size, seed=101, val_fraction=0.5)
        # nothing here is trained on: every scene is scored
        config = yaml.safe_load((large / "dataset.yaml").read_text())
        config["splits"] = {"train": [], "val": config["splits"]["train"] + config["splits"]["val"]}
        (large / "dataset.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    small_config = yaml.safe_load((data / "dataset.yaml").read_text())
    large_config = yaml.safe_load((large / "dataset.yaml").read_text())
    model, _ = load_model(runs / "glnet")
    results = {
        "machine": describe_machine(),
        "size_g": model.options["size_g"],
        "options": model.options,
        "small": {
            "size": json.loads((data / "synth.json").read_text())["size"][0],
            "count": len(small_config["splits"]["val"]),
        },
        "large": {"size": size, "count": len(large_config["splits"]["val"])},
        "scores": {},
    }
    earlier_path = results_dir / "glnet_global_view.json"
    earlier = json.loads(earlier_path.read_text()) if earlier_path.exists() else {}
    results["row_options"] = {}
    for label, run, options in ROWS:
        options = {k: results["small"]["size"] if v == TRAINING_SIDE else v for k, v in options.items()}
        results["row_options"][label] = options
        if (
            args.reuse
            and label in earlier.get("scores", {})
            and earlier.get("row_options", {}).get(label, {}) == options
        ):
            results["scores"][label] = earlier["scores"][label]
        else:
            results["scores"][label] = {
                "small": evaluate(runs / run, data, options),
                "large": evaluate(runs / run, large, options),
            }
        print(label, {k: round(v["miou"], 4) for k, v in results["scores"][label].items()}, flush=True)
    change = {m: s["large"]["miou"] - s["small"]["miou"] for m, s in results["scores"].items()}
    results["policy_cost_miou"] = change["glnet"] - change["patch"]
    results["tile_policy_cost_miou"] = change["glnet, tile policy"] - change["patch"]
    results["notes"] = earlier.get("notes", [])  # notes are written by hand after a run
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "glnet_global_view.json").write_text(json.dumps(results, indent=2))
    (results_dir / "glnet_global_view.md").write_text(markdown(results))
    print(markdown(results))
    print(f"results in {results_dir}", flush=True)


if __name__ == "__main__":
    main()
