"""What GLNet's global-view policy costs on images much larger than its training scenes (issue 4).

With the ``"image"`` policy (the default, ``gigaseg.methods.glnet.model``) GLNet's global branch
sees the whole image resized to ``size_g``: on a scene 4x larger per side than the training
scenes the global view is a 4x coarser downsample than in training. The patch baseline sees
nothing but full-resolution patches, so its accuracy does not depend on the image size: the
difference between the two methods' change in mIoU from training-size scenes to large scenes
is what the policy costs. The same GLNet checkpoint is also scored with the ``"tile"`` policy
(``gigaseg.methods.glnet.tiles``; ``context_tile`` = the training scenes' side), whose global
view keeps the training scale.

Takes the GLNet and patch runs of ``benchmarks/compare_methods.py`` (same data, encoder and
training budget), writes large scenes of the same synthetic generator (feature sizes are
fixed in pixels, so the class statistics are the same at any scene size), and scores both
checkpoints on the comparison's validation scenes and on the large ones, each evaluation in
a fresh child process (peak RSS, megapixels per second).

    python benchmarks/glnet_global_view.py --runs /tmp/cmp3-a/runs [--size 6144] [--count 2] [--reuse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
#: rows: (label, run of compare_methods.py, inference options; TRAINING_SIDE: the training scenes' side)
TRAINING_SIDE = "training scene side"
ROWS = (
    ("glnet", "glnet", {}),
    ("glnet, tile policy", "glnet", {"global_context": "tile", "context_tile": TRAINING_SIDE}),
    ("patch", "patch", {}),
)


def evaluate(run: Path, data: Path, options: dict) -> dict:
    from gigaseg.bench.compare import evaluate_job
    from gigaseg.bench.memory import measure_call

    scored = measure_call(evaluate_job, (str(run), str(data), "val", None, options or None))
    summary = scored.value["summary"]
    return {
        "miou": summary["miou"],
        "per_class_iou": {k: v["iou"] for k, v in summary["per_class"].items()},
        "peak_rss": scored.peak_rss,
        "megapixels_per_second": scored.value["megapixels_per_second"],
    }


def markdown(results: dict) -> str:
    from gigaseg.bench import machine

    small, large = results["small"], results["large"]
    lines = [
        "# GLNet's global view on images larger than the training scenes",
        "",
        machine.markdown_header(results["machine"]),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the runs folder of a compare_methods.py work folder")
    parser.add_argument("--data", default="/tmp/gigaseg-compare-data", help="the comparison's dataset")
    parser.add_argument("--large", default="/tmp/gigaseg-glnet-large", help="where the large scenes are written")
    parser.add_argument("--size", type=int, default=6144)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the committed scores of rows whose options are unchanged (score only new rows)",
    )
    args = parser.parse_args()

    import yaml

    from gigaseg.api import load_model
    from gigaseg.bench import machine
    from gigaseg.data.synth.landcover import write_landcover_dataset

    runs, data, large = Path(args.runs), Path(args.data), Path(args.large)
    if not (large / "dataset.yaml").exists():
        write_landcover_dataset(large, count=args.count, height=args.size, width=args.size, seed=101, val_fraction=0.5)
        # nothing here is trained on: every scene is scored
        config = yaml.safe_load((large / "dataset.yaml").read_text())
        config["splits"] = {"train": [], "val": config["splits"]["train"] + config["splits"]["val"]}
        (large / "dataset.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    small_config = yaml.safe_load((data / "dataset.yaml").read_text())
    large_config = yaml.safe_load((large / "dataset.yaml").read_text())
    model, _ = load_model(runs / "glnet")
    results = {
        "machine": machine.describe(),
        "size_g": model.options["size_g"],
        "options": model.options,
        "small": {
            "size": json.loads((data / "synth.json").read_text())["size"][0],
            "count": len(small_config["splits"]["val"]),
        },
        "large": {"size": args.size, "count": len(large_config["splits"]["val"])},
        "scores": {},
    }
    earlier_path = RESULTS / "glnet_global_view.json"
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "glnet_global_view.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "glnet_global_view.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
