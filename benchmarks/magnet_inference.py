"""MagNet and MagNet-Fast whole-image inference: peak memory, speed, and Fast's mIoU cost.

Phases (``--phases``, default all; each writes ``<work>/<phase>.json``, ``report`` merges
them into ``benchmarks/results/magnet_inference.json`` and ``.md``):

``scenes``
    Synthetic land-cover scenes (``gigaseg synth landcover``): 2448x2448 (DeepGlobe's
    size) and 4499x6749 (height x width, about 30 Mpx), and a small labelled set of
    512x512 scenes for the accuracy phase.
``speed``
    ``gigaseg.predict_image`` of the DeepGlobe presets (``deepglobe`` =
    MagNet, ``deepglobe_fast`` = MagNet-Fast) with a ResNet-50 FPN backbone and 7 classes,
    random weights (``refine=True``: speed and memory do not depend on the weights; the
    refinement flag would otherwise make an untrained model predict with its backbone
    only), each job in a fresh child through ``gigaseg.bench.measure_call``: peak RSS of
    the whole child process next to a child that only imports torch and one that only
    builds the model, wall time, frames and patches processed; the CUDA peak allocated
    when a GPU is present. The 2448 scene is one frame (whole-image mode) and is run in
    full. On the 30-Mpx scene (block mode: one 2448-px frame per 2048-px driver block, 12
    blocks) only the first ``--big-blocks`` blocks run MagNet (the others return a
    constant); the same job with twice as many blocks shows that the peak does not depend
    on the number of blocks, and full-scene times are extrapolated per block.
``accuracy``
    A briefly trained small MagNet (ResNet-18 FPN, scales 128/256/512, input 128, both
    stages through ``gigaseg train``) evaluated on the validation scenes as the backbone
    alone at the coarsest scale, MagNet and MagNet-Fast (same weights): mIoU over all 7
    classes, per-class IoU, seconds per image.

    python benchmarks/magnet_inference.py [--work DIR] [--phases scenes,speed,accuracy,report]
                                          [--big-blocks 2] [--epochs 4]

``--smoke`` runs every phase in seconds (``SMOKE``: a 128-px whole-image scene, a 512x1536
block-mode scene in 512-px driver blocks, 4 labelled 128-px scenes, a test_resnet MagNet with
scales 32/64/128, one epoch; one job per mode), writing only to ``--work`` and ``--results``
(default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEAK_LIMIT = 2 * 10**9
SMALL_OPTIONS = {
    "scales": [[128, 128], [256, 256], [512, 512]],
    "input_size": [128, 128],
    "median_kernel": 5,
    "crops_per_image": 8,
}
SMALL_FAST = {"fast_patches": 3, "points": 0.9}

#: what a full run and ``--smoke`` run: scenes (folder, size, count, seed), which scene is run in whole-image
#: mode and which in block mode, the speed phase's network and jobs, the accuracy phase's model
FULL = {
    "scenes": [("s2448", "2448x2448", 1, 11), ("s6749", "4499x6749", 1, 12), ("small", "512x512", 16, 3)],
    "whole": ("s2448", "2448x2448"),
    "blocks": ("s6749", "4499x6749"),
    "encoder": "resnet50",
    "model_options": {},
    "block_size": 2048,
    "warm_up_side": 1224,
    "repeats": 2,
    "jobs": "all",
    "small_encoder": "resnet18",
    "small_options": SMALL_OPTIONS,
    "small_batch_size": 4,
}
SMOKE = {
    "scenes": [("whole", "128x128", 1, 11), ("blocks", "512x1536", 1, 12), ("small", "128x128", 4, 3)],
    "whole": ("whole", "128x128"),
    "blocks": ("blocks", "512x1536"),
    "encoder": "test_resnet",
    "model_options": {"scales": [[32, 32], [64, 64], [128, 128]], "input_size": [32, 32], "median_kernel": 3},
    "block_size": 512,
    "warm_up_side": 64,
    "repeats": 1,
    "jobs": "one per mode",
    "small_encoder": "test_resnet",
    "small_options": {
        "scales": [[32, 32], [64, 64], [128, 128]],
        "input_size": [32, 32],
        "median_kernel": 3,
        "crops_per_image": 2,
    },
    "small_batch_size": 2,
}


# --------------------------------------------------------------------------- children (run in fresh processes)


class Subset:
    """Runs the wrapped predictor on the first ``limit`` blocks; the rest get uniform probabilities.

    Args:
        predictor: the method's predictor (``gigaseg.build_predictor``'s).
        limit: how many blocks run it (None: all).
    """

    def __init__(self, predictor, limit: int | None):
        self.predictor = predictor
        self.limit = limit
        self.computed = 0
        self.seen = 0

    @property
    def num_classes(self) -> int:
        """The wrapped predictor's class count."""
        return self.predictor.num_classes

    def prepare(self, source):
        """The wrapped predictor's context."""
        return self.predictor.prepare(source)

    def predict_block(self, source, context, window):
        """The wrapped predictor's probabilities for the first ``limit`` blocks, uniform ones after."""
        import numpy as np

        self.seen += 1
        if self.limit is not None and self.seen > self.limit:
            return np.full((self.num_classes, window.height, window.width), 1.0 / self.num_classes, np.float32)
        self.computed += 1
        return self.predictor.predict_block(source, context, window)


def child_model_only(preset: str, encoder: str = "resnet50", options: dict | None = None) -> dict:
    """Baseline: import gigaseg and build the MagNet of ``preset`` (ResNet-50 FPN), nothing else."""
    import torch

    from gigaseg import create_model

    torch.manual_seed(0)
    model = create_model("magnet", encoder=encoder, num_classes=7, preset=preset, **(options or {})).eval()
    return {"parameters": model.num_parameters()}


def child_predict(
    image: str,
    preset: str,
    max_blocks: int | None,
    encoder: str = "resnet50",
    options: dict | None = None,
    block_size: int = 2048,
) -> dict:
    """Predict ``image`` with the MagNet of ``preset`` (ResNet-50 FPN, random weights, refinement on)."""
    import numpy as np
    import torch

    from gigaseg import Normalization, build_predictor, create_model, open_image, predict_image

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = create_model("magnet", encoder=encoder, num_classes=7, preset=preset, **(options or {}))
    model = model.eval().to(device)
    source = open_image(image)
    predictor = build_predictor(model, Normalization.for_image(3, np.uint8), device=device, refine=True)
    predictor.keep_trace = True
    subset = Subset(predictor, max_blocks)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="magnet-bench-") as tmp:
        start = time.perf_counter()
        result = predict_image(subset, source, Path(tmp) / "mask.tif", block_size=block_size, progress=False)
        seconds = time.perf_counter() - start
    traces = [frame["trace"] for frame in predictor.frames]
    return {
        "device": device,
        "image": [source.height, source.width],
        "mode": "whole" if model.whole_image(source.height, source.width) else "blocks",
        "seconds": seconds,
        "blocks": result.blocks_predicted,
        "blocks_computed": subset.computed if max_blocks is not None else result.blocks_predicted,
        "frames": len(traces),
        "backbone_patches": sum(len(t["patches"]) for trace in traces for t in trace),
        "refined_patches": sum(len(t["patches"]) for trace in traces for t in trace[1:]),
        "points": [t["points"] for t in traces[0]] if traces else [],
        "sub_batch": predictor.sub_batch,
        "cuda_peak_allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def child_alternate(
    image: str, repeats: int, encoder: str = "resnet50", options: dict | None = None, warm_up_side: int = 1224
) -> dict:
    """MagNet and MagNet-Fast (same weights) alternately on ``image`` after a warm-up: seconds of each run."""
    import numpy as np
    import torch

    from gigaseg import Normalization, Window, build_predictor, create_model, open_image, predict_image

    torch.manual_seed(0)
    options = options or {}
    magnet = create_model("magnet", encoder=encoder, num_classes=7, preset="deepglobe", **options).eval()
    from gigaseg.bench import MAGNET_PRESETS

    preset = MAGNET_PRESETS["deepglobe_fast"]
    fast_options = {k: preset[k] for k in ("points", "fast_patches", "median_kernel") if k not in options}
    fast = magnet.variant(**fast_options).eval()
    norm = Normalization.for_image(3, np.uint8)
    source = open_image(image)
    side = min(warm_up_side, source.height, source.width)
    warm = open_image(source.read(Window(0, 0, side, side)))
    out: dict = {"fast_options": fast_options, "magnet": [], "fast": []}
    for model in (fast, magnet):  # warm-up on a crop (one frame: 1224 px at scales 306/612/1224 in a full run)
        predict_image(build_predictor(model, norm, refine=True), warm, None, on_band=lambda *a: None, progress=False)
    for _ in range(repeats):
        for name, model in (("fast", fast), ("magnet", magnet)):
            start = time.perf_counter()
            predict_image(
                build_predictor(model, norm, refine=True), source, None, on_band=lambda *a: None, progress=False
            )
            out[name].append(time.perf_counter() - start)
    return out


# --------------------------------------------------------------------------- context


def machine() -> dict:
    """``gigaseg.bench.describe_machine()`` plus the torch threads and the load of the shared CPU."""
    import torch

    from gigaseg.bench import describe_machine

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {**describe_machine(), "torch_threads": torch.get_num_threads(), "load_average": load}


def _save(work: Path, name: str, data: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def _load(work: Path, name: str) -> dict | None:
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- phases


def scene_paths(work: Path, setup: dict = FULL) -> dict[str, Path]:
    """The whole-image and the block-mode scene by size label."""
    return {
        label: work / folder / "images" / "landcover_000.tif" for folder, label in (setup["whole"], setup["blocks"])
    }


def phase_scenes(work: Path, setup: dict = FULL) -> dict:
    python = sys.executable
    out = {}
    for folder, size, count, seed in setup["scenes"]:
        if (work / folder / "dataset.yaml").exists():
            continue
        command = [
            python,
            "-m",
            "gigaseg",
            "synth",
            "landcover",
            str(work / folder),
            "--count",
            str(count),
            "--size",
            size,
            "--seed",
            str(seed),
            "--val-fraction",
            "0.25",
        ]
        print("generating:", " ".join(command[2:]), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        out[folder] = {"size": size, "count": int(count), "seed": int(seed), "seconds": time.perf_counter() - start}
    return out


def phase_speed(work: Path, big_blocks: int, full_magnet: bool, setup: dict = FULL) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import magnet_inference as bench  # importable by the children (measure pickles functions by reference)
    from gigaseg.bench import measure_call

    scenes = scene_paths(work, setup)
    whole, blocks = setup["whole"][1], setup["blocks"][1]
    jobs = [
        (whole, "deepglobe_fast", None),
        (whole, "deepglobe", None),
        (blocks, "deepglobe_fast", big_blocks),
        (blocks, "deepglobe", big_blocks),
        (blocks, "deepglobe_fast", 2 * big_blocks),
    ]
    if full_magnet:
        jobs.append((blocks, "deepglobe", 2 * big_blocks))
    if setup["jobs"] == "one per mode":
        jobs = [jobs[0], jobs[3]]
    network = (setup["encoder"], setup["model_options"])
    previous = _load(work, "speed") or {"runs": []}
    done = {(r["scene"], r["preset"], r["max_blocks"]) for r in previous["runs"]}
    runs = previous["runs"]
    if "model_only" not in previous:
        report = measure_call(bench.child_model_only, ("deepglobe", *network))
        previous["model_only"] = {
            "peak_rss": report.peak_rss,
            "baseline_rss": report.baseline_rss,
            "parameters": report.value["parameters"],
        }
        _save(work, "speed", {**previous, "runs": runs})
    if "alternate" not in previous:
        print(f"speed: {whole} MagNet and MagNet-Fast alternately", flush=True)
        report = measure_call(
            bench.child_alternate, (str(scenes[whole]), setup["repeats"], *network, setup["warm_up_side"])
        )
        previous["alternate"] = {"scene": whole, "peak_rss": report.peak_rss, **report.value}
        print(json.dumps(previous["alternate"]), flush=True)
        _save(work, "speed", {**previous, "runs": runs})
    for scene, preset, max_blocks in jobs:
        if (scene, preset, max_blocks) in done:
            continue
        print(f"speed: {scene} {preset} blocks={max_blocks or 'all'}", flush=True)
        report = measure_call(
            bench.child_predict, (str(scenes[scene]), preset, max_blocks, *network, setup["block_size"])
        )
        run = {"scene": scene, "preset": preset, "max_blocks": max_blocks, **report.to_dict(), **report.value}
        print(json.dumps(run), flush=True)
        runs.append(run)
        _save(work, "speed", {**previous, "runs": runs})
    return {**previous, "runs": runs}


def _evaluate(model, dataset, variant_refine: bool) -> dict:
    import numpy as np

    from gigaseg import ConfusionMatrix, Normalization, build_predictor, predict_image

    matrix = ConfusionMatrix(model.num_classes, ignore_index=dataset.ignore_index)
    seconds = []
    for index in range(len(dataset)):
        sample = dataset[index]
        predictor = build_predictor(model, Normalization.for_image(3, np.uint8), refine=variant_refine)

        def update(window, labels, sample=sample):
            matrix.update(labels, sample.mask.read(window)[..., 0])

        start = time.perf_counter()
        predict_image(predictor, sample.image, None, block_size=2048, on_band=update, progress=False)
        seconds.append(time.perf_counter() - start)
    summary = matrix.summary(class_names=list(dataset.classes))
    return {
        "miou": summary["miou"],
        "pixel_accuracy": summary["pixel_accuracy"],
        "per_class_iou": {k: v["iou"] for k, v in summary["per_class"].items()},
        "seconds_per_image": seconds,
    }


def phase_accuracy(work: Path, epochs: int, setup: dict = FULL) -> dict:
    import torch

    from gigaseg import load_dataset, load_model

    data, run = work / "small", work / "small_run"
    command = [
        sys.executable,
        "-m",
        "gigaseg",
        "train",
        "--method",
        "magnet",
        "--data",
        str(data),
        "--out",
        str(run),
        "--encoder",
        setup["small_encoder"],
        "--epochs",
        str(epochs),
        "--batch-size",
        str(setup["small_batch_size"]),
        "--lr",
        "0.01",
    ]
    for key, value in setup["small_options"].items():
        command += ["--set", f"{key}={json.dumps(value).replace(' ', '')}"]
    previous = _load(work, "accuracy") or {}
    if "train" not in previous:
        print("training:", " ".join(command[2:]), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        previous["train"] = {
            "command": "gigaseg " + " ".join(command[3:]).replace(str(work) + "/", "WORK/"),
            "seconds": time.perf_counter() - start,
            "metrics_csv": (run / "metrics.csv").read_text(),
        }
        _save(work, "accuracy", previous)
    torch.manual_seed(0)
    model, _ = load_model(run / "last.ckpt")
    fast = model.variant(**SMALL_FAST).eval()
    dataset = load_dataset(data, split="val")
    results = previous.get("variants", {})
    for name, (net, refine) in {
        "backbone_coarsest_scale": (model, False),
        "magnet": (model, True),
        "magnet_fast": (fast, True),
    }.items():
        if name in results:
            continue
        print(f"accuracy: {name}", flush=True)
        results[name] = _evaluate(net, dataset, refine)
        previous["variants"] = results
        _save(work, "accuracy", previous)
    previous["val_images"] = len(dataset)
    previous["options"] = {"magnet": model.options, "magnet_fast": fast.options}
    previous["small_options"] = setup["small_options"]
    _save(work, "accuracy", previous)
    return previous


# --------------------------------------------------------------------------- report


def _mb(value) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.0f} MB"


def summarize(speed: dict | None, accuracy: dict | None, scenes: tuple[str, str] = ("2448x2448", "4499x6749")) -> dict:
    out: dict = {}
    if speed:
        runs = {(r["scene"], r["preset"], r["max_blocks"]): r for r in speed["runs"]}
        ratios = {}
        for scene in scenes:
            for key in {(s, b) for (s, _, b) in runs if s == scene}:
                magnet, fast = runs.get((scene, "deepglobe", key[1])), runs.get((scene, "deepglobe_fast", key[1]))
                if magnet and fast:
                    ratios[f"{scene} blocks={key[1] or 'all'}"] = magnet["seconds"] / fast["seconds"]
        out["fast_speedup"] = ratios
        alternate = speed.get("alternate")
        if alternate and alternate["magnet"] and alternate["fast"]:

            def median(xs):
                xs = sorted(xs)
                return xs[len(xs) // 2] if len(xs) % 2 else sum(xs[len(xs) // 2 - 1 : len(xs) // 2 + 1]) / 2

            out["fast_speedup_alternating_2448"] = median(alternate["magnet"]) / median(alternate["fast"])
        out["max_peak_rss"] = max(r["peak_rss"] for r in speed["runs"])
        out["peak_within_2GB"] = out["max_peak_rss"] <= PEAK_LIMIT
        extrapolated = {}
        for (scene, preset, blocks), r in runs.items():
            if blocks:
                per_block = r["seconds"] / max(1, r["blocks_computed"])
                extrapolated[f"{preset} ({scene})"] = per_block * r["blocks"]
        out["extrapolated_full_scene_seconds"] = extrapolated
    if accuracy and "variants" in accuracy:
        v = accuracy["variants"]
        if "magnet" in v and "magnet_fast" in v:
            out["fast_miou_cost"] = v["magnet"]["miou"] - v["magnet_fast"]["miou"]
            out["fast_speedup_small"] = sum(v["magnet"]["seconds_per_image"]) / sum(
                v["magnet_fast"]["seconds_per_image"]
            )
    return out


def markdown(result: dict) -> str:
    from gigaseg.bench import machine_header

    m, speed, acc, summary = result["machine"], result.get("speed"), result.get("accuracy"), result["summary"]
    whole, blocks = result.get("scene_labels", ("2448x2448", "4499x6749"))
    small_options = (acc or {}).get("small_options", SMALL_OPTIONS)
    load = f"{m['load_average'][0]:.1f}" if m["load_average"] else "unknown"
    lines = [
        "# MagNet / MagNet-Fast whole-image inference",
        "",
        machine_header(m),
        f"{m['usable_cores']} usable of {m['cores']} logical cores (shared with other jobs: load average 3-9 during "
        f"the runs, {load} at the end), torch with {m['torch_threads']} threads."
        + (
            ""
            if m["gpu"]
            else " No GPU was lent to this task, so no CUDA figures (the CUDA code path records max_memory_allocated)."
        ),
        "",
        "Commands (phases resume from the work folder): " + "; ".join(f"`{c}`" for c in result["commands"]) + ".",
        "",
    ]
    if speed:
        model_only = speed.get("model_only", {})
        lines += [
            "## Peak memory and speed (ResNet-50 FPN backbone, 7 classes, DeepGlobe presets, CPU)",
            "",
            "Each row is one fresh child process (`gigaseg.bench.measure_call`): peak RSS of the whole process. "
            f"Baselines: a child that only imports torch {_mb(model_only.get('baseline_rss'))}; one that imports "
            f"gigaseg and builds the model {_mb(model_only.get('peak_rss'))}. Weights are random (speed and memory "
            "do not depend on them); `refine=True`. Wall times of these rows are single cold runs, one after the "
            "other, on a CPU whose load changed between them; the alternating runs below are the speed figures.",
            "",
            "| scene | method | blocks run (of) | frames | backbone patches | refined patches | peak RSS | "
            "<= 2 GB | wall time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speed["runs"]:
            name = "MagNet-Fast" if r["preset"].endswith("fast") else "MagNet"
            lines.append(
                f"| {r['scene']} ({r['mode']}) | {name} | {r['blocks_computed']} ({r['blocks']}) | {r['frames']} | "
                f"{r['backbone_patches']} | {r['refined_patches']} | {_mb(r['peak_rss'])} | "
                f"{'yes' if r['peak_rss'] <= PEAK_LIMIT else 'NO'} | {r['seconds']:.0f} s |"
            )
        alternate = speed.get("alternate")
        if alternate:
            lines += [
                "",
                f"Alternating runs in one process (after a warm-up), {whole} scene, same weights: MagNet "
                + ", ".join(f"{t:.0f} s" for t in alternate["magnet"])
                + "; MagNet-Fast "
                + ", ".join(f"{t:.0f} s" for t in alternate["fast"])
                + f"; ratio of medians {summary.get('fast_speedup_alternating_2448', float('nan')):.2f}x "
                f"(peak RSS of that process, both models loaded: {_mb(alternate['peak_rss'])}).",
            ]
        lines += [
            "",
            "Speed-up of MagNet-Fast (MagNet time / MagNet-Fast time, same scene and blocks): "
            + ", ".join(f"{k}: {v:.2f}x" for k, v in summary.get("fast_speedup", {}).items())
            + ".  ",
            "Full-scene times extrapolated per computed block: "
            + ", ".join(f"{k}: {v / 60:.0f} min" for k, v in summary.get("extrapolated_full_scene_seconds", {}).items())
            + ".",
            "",
        ]
        blocks = sorted(
            (r["blocks_computed"], r["peak_rss"])
            for r in speed["runs"]
            if r["scene"] == blocks and r["preset"] == "deepglobe_fast"
        )
        if len(blocks) > 1:
            lines += [
                "Block mode does not grow with the number of blocks: MagNet-Fast on the 30-Mpx scene peaks at "
                + " and ".join(f"{_mb(p)} after {b} blocks" for b, p in blocks)
                + " (each block is one 2448-px frame around a 2048-px driver block; nothing is kept between "
                "blocks but the driver's row band of uint8 labels).",
                "",
            ]
    if acc and "variants" in acc:
        v = acc["variants"]
        lines += [
            "## mIoU cost of MagNet-Fast (briefly trained small model)",
            "",
            f"Model: ResNet-18 FPN MagNet, options {json.dumps(small_options)}, trained on the synthetic "
            f"land-cover set (16 scenes of 512x512, {acc.get('val_images')} for validation) with "
            f"`{acc['train']['command']}` ({acc['train']['seconds'] / 60:.0f} min). MagNet-Fast: the same weights "
            f"with {json.dumps(SMALL_FAST)}. mIoU on the validation scenes over the classes that occur in them "
            f"({', '.join(c for c, x in v['magnet']['per_class_iou'].items() if x is not None)}; the others are n/a).",
            "",
            "| prediction | mIoU | pixel accuracy | seconds / image |",
            "|---|---|---|---|",
        ]
        for name, label in (
            ("backbone_coarsest_scale", "backbone alone, coarsest scale"),
            ("magnet", "MagNet"),
            ("magnet_fast", "MagNet-Fast"),
        ):
            if name in v:
                secs = v[name]["seconds_per_image"]
                lines.append(
                    f"| {label} | {v[name]['miou']:.4f} | {v[name]['pixel_accuracy']:.4f} | "
                    f"{sum(secs) / len(secs):.1f} |"
                )
        classes = list(v["magnet"]["per_class_iou"])
        lines += ["", "| per-class IoU | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for name in ("backbone_coarsest_scale", "magnet", "magnet_fast"):
            if name in v:
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        "n/a" if v[name]["per_class_iou"][c] is None else f"{v[name]['per_class_iou'][c]:.3f}"
                        for c in classes
                    )
                    + " |"
                )
        if "fast_miou_cost" in summary:
            lines += [
                "",
                f"MagNet-Fast costs {summary['fast_miou_cost'] * 100:+.2f} mIoU points against MagNet "
                f"(positive = lower) and runs {summary['fast_speedup_small']:.2f}x faster on these scenes.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work",
        type=Path,
        help="folder for scenes, runs and partial results (kept; phases resume; default: "
        "<tmp>/gigaseg-magnet-bench, with --smoke a new temporary folder)",
    )
    parser.add_argument("--phases", default="scenes,speed,accuracy,report")
    parser.add_argument(
        "--big-blocks",
        type=int,
        help="blocks of the 30-Mpx scene that run MagNet (default 2, --smoke 1; the same job runs again with "
        "twice as many)",
    )
    parser.add_argument("--full-magnet", action="store_true", help="also run MagNet on twice --big-blocks blocks")
    parser.add_argument("--epochs", type=int, help="epochs per stage of the small model (default 4, --smoke 1)")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny scenes and network, temporary output (a smoke run)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-magnet-smoke-"))
        work, results_dir = args.work or scratch / "work", args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    else:
        work = args.work or Path(tempfile.gettempdir()) / "gigaseg-magnet-bench"
        results_dir = args.results or RESULTS
    big_blocks = args.big_blocks or (1 if args.smoke else 2)
    epochs = args.epochs or (1 if args.smoke else 4)
    work.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    invocation = "python benchmarks/magnet_inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = (_load(work, "commands") or {"commands": []})["commands"]
    _save(work, "commands", {"commands": commands + [invocation]})
    if "scenes" in phases:
        _save(work, "scenes", {**(_load(work, "scenes") or {}), **phase_scenes(work, setup)})
    if "speed" in phases:
        phase_speed(work, big_blocks, args.full_magnet, setup)
    if "accuracy" in phases:
        phase_accuracy(work, epochs, setup)
    if "report" in phases:
        speed, accuracy = _load(work, "speed"), _load(work, "accuracy")
        labels = (setup["whole"][1], setup["blocks"][1])
        result = {
            "benchmark": "magnet_inference",
            "commands": commands + [invocation],
            "machine": machine(),  # with the commit, this command line and the date
            "scenes": _load(work, "scenes"),
            "scene_labels": list(labels),
            "speed": speed,
            "accuracy": accuracy,
            "summary": summarize(speed, accuracy, labels),
            "notes": [
                "No GPU was lent to this task: no CUDA peak figures (cuda_peak_allocated is null).",
                "The CPU is shared with other jobs; speed ratios come from runs of the same invocation.",
                "30-Mpx scene: only the first --big-blocks (and twice as many) of the 12 driver blocks run MagNet; "
                "the others return a constant, so the driver, writer and predictor state of the whole scene are "
                "still in the process.",
            ],
        }
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "magnet_inference.json").write_text(json.dumps(result, indent=2) + "\n")
        (results_dir / "magnet_inference.md").write_text(markdown(result))
        print(markdown(result))
        print(f"results in {results_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
