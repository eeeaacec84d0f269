"""gigaseg against MONAI's ``sliding_window_inference``: the same checkpoint and scenes, side by side.

One patch network (ResNet-18 encoder, 64-channel FPN, 256-px windows, 32 px overlap, gaussian
blending; trained briefly on synthetic land-cover scenes so its weights and BatchNorm statistics are
a trained network's) predicts synthetic land-cover scenes of 3072², 6144² and 12288² in fresh child
processes (``gigaseg.bench.measure_call``: peak RSS of the child), each run end to end (load the
checkpoint, read the image, predict, write a tiled mask TIFF), timed after the same imports in every
child (torch, gigaseg and its methods with timm, torchvision and segmentation_models_pytorch; MONAI's
child also imports MONAI, which itself imports torchvision):

- ``monai``: the image read whole, normalised as the checkpoint says, ``sliding_window_inference``
  with the same window, overlap (``32 / 256``), gaussian blending (sigma 0.125 of the window) and
  ``sw_batch_size`` as gigaseg's sub-batch (4), the predictor giving each window's softmax
  upsampled bilinearly to the window (what gigaseg's patch baseline stitches); the argmax written.
- ``gigaseg``: ``gigaseg.predict`` on the plain path (the default).
- ``gigaseg_fast``: ``gigaseg.predict(fast=True)``: BatchNorm folded, channels_last, the next block
  decoded in a background thread, sub-batches full across block borders; float32.
- ``gigaseg_fast_bf16``: the same with ``precision="bf16-mixed"`` (bfloat16 autocast; the CPU's
  AVX512-BF16 is used when it has one).
- ``gigaseg_onnxruntime``: ``backend="onnxruntime"`` (float32), at the smallest size only.
- ``monai_fast``: MONAI running gigaseg's fast network (folded, channels_last): where the speed
  comes from, at the smallest size only.

Sizes are interleaved: every round runs every size and variant once (the order of the variants
rotates between rounds; ``--rounds`` at the smallest size, ``--large-rounds`` at the others, where a
run takes minutes); a variant's speed is its fastest round. The load average is recorded
before every run (other work on a shared machine slows all variants alike within a round, not
across rounds). Label agreement: each mask against MONAI's, pixel by pixel. MONAI holds the whole
image, its class scores and their weight sums in memory: a size whose estimate does not fit the
memory available now is skipped with that reason, and a child killed for memory is reported so.

    python benchmarks/peer_sliding_window.py [--sizes 3072,6144,12288] [--rounds 2] [--work DIR]

Writes ``benchmarks/results/peer_sliding_window.{json,md,png}``. ``--smoke`` runs the same path in
seconds (a test_resnet network with 64-px windows on 384² and 512² scenes, one round) into
``--results`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (3072, 6144, 12288)
#: the network both run: the patch baseline as the demo trains it
NETWORK = {"patch_size": 256, "overlap": 32, "fpn_channels": 64, "blend": "gaussian", "crops_per_image": 24}
ENCODER = "resnet18"
SUB_BATCH = 4  # gigaseg's patches per forward pass without a memory budget, MONAI's sw_batch_size
VARIANTS = ("monai", "gigaseg", "gigaseg_fast", "gigaseg_fast_bf16", "gigaseg_onnxruntime", "monai_fast")
#: variants run at the smallest size only, in its first round (they show where the speed comes from)
SMALLEST_ONLY = ("gigaseg_onnxruntime", "monai_fast")
#: variants left out at the largest size (none: every run there takes 1-2 minutes on 2 cores)
LARGEST_SKIPS: tuple[str, ...] = ()
SMOKE = {
    "sizes": (384, 512),
    "network": {"patch_size": 64, "overlap": 16, "fpn_channels": 16, "blend": "gaussian", "crops_per_image": 4},
    "encoder": "test_resnet",
    "train_size": 256,
}


# --------------------------------------------------------------------------- measured in children


def run_gigaseg(checkpoint: str, image: str, mask: str, threads: int, settings: dict) -> dict:
    """``gigaseg.predict`` of ``image`` into ``mask`` with ``settings``; its wall time."""
    import torch

    import gigaseg

    gigaseg.available_methods()  # imports the methods (timm, torchvision) before the clock starts, as MONAI's child

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = gigaseg.predict(checkpoint, image, mask, progress=False, resume=False, **settings)
    return {"seconds": time.perf_counter() - start, "predict_seconds": result.seconds}


def run_monai(checkpoint: str, image: str, mask: str, threads: int, fast: bool = False) -> dict:
    """MONAI's ``sliding_window_inference`` over the whole image, the argmax written as a tiled TIFF."""
    import tifffile
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    import gigaseg

    gigaseg.available_methods()  # imports the methods (timm, torchvision) before the clock starts, as gigaseg's child

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, info = gigaseg.load_model(checkpoint)
    patch, overlap = model.options["patch_size"], model.options["overlap"]
    net = model
    if fast:
        net = gigaseg.optimize_for_inference(model, torch.zeros(1, 3, patch, patch), channels_last=True)
    normalization = gigaseg.Normalization.from_dict(info["normalization"])
    source = gigaseg.open_image(image)
    pixels = torch.from_numpy(normalization.apply(source.read()))[None]  # (1, C, H, W) float32
    source.close()

    def window_probabilities(batch: torch.Tensor) -> torch.Tensor:
        if fast:
            batch = batch.contiguous(memory_format=torch.channels_last)
        probs = torch.softmax(net(batch).float(), dim=1)  # softmax at the head's resolution, as gigaseg
        return F.interpolate(probs, size=batch.shape[-2:], mode="bilinear", align_corners=False)

    infer = time.perf_counter()
    with torch.inference_mode():
        scores = sliding_window_inference(
            pixels,
            roi_size=(patch, patch),
            sw_batch_size=SUB_BATCH,
            predictor=window_probabilities,
            overlap=overlap / patch,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
        )
    infer = time.perf_counter() - infer
    del pixels
    labels = scores[0].argmax(dim=0).to(torch.uint8).numpy()
    del scores
    tifffile.imwrite(mask, labels, tile=(512, 512), compression="zlib", bigtiff=True)
    return {"seconds": time.perf_counter() - start, "inference_seconds": infer}


def network_speeds(checkpoint: str, threads: int, batch: int, rounds: int, compile_network: bool) -> dict:
    """The network alone on a batch of windows: plain, folded, folded + channels_last (+ bf16, compiled), ORT.

    Every variant is timed once per round, the variants interleaved; the fastest round is kept.
    """
    import warnings

    import torch

    import gigaseg

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    model, _ = gigaseg.load_model(checkpoint)
    p = model.options["patch_size"]
    x = torch.randn(batch, 3, p, p)
    xc = x.contiguous(memory_format=torch.channels_last)
    folded = gigaseg.optimize_for_inference(model, x[:1])
    fast = gigaseg.optimize_for_inference(model, x[:1], channels_last=True)

    def bf16(a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fast(a)

    variants = {"plain": (model, x), "folded": (folded, x), "folded_channels_last": (fast, xc), "bf16": (bf16, xc)}
    notes = {}
    if compile_network:
        start = time.perf_counter()
        compiled = torch.compile(fast)
        with torch.no_grad():
            compiled(xc)
        notes["compile_seconds"] = time.perf_counter() - start
        variants["folded_channels_last_compiled"] = (compiled, xc)
    try:
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "net.onnx"
        with torch.no_grad():
            torch.onnx.export(
                folded,
                (x[:1],),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                dynamic_axes={"x": {0: "b"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        variants["onnxruntime"] = (lambda a: session.run(None, {"x": a}), xn)
    except ImportError:
        notes["onnxruntime"] = "not installed"
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn, a in variants.values():
            fn(a)  # warm-up
        for _ in range(rounds):
            for name, (fn, a) in variants.items():
                start = time.perf_counter()
                fn(a)
                times[name].append(time.perf_counter() - start)
    pixels = batch * p * p / 1e6
    return {
        "batch": [batch, 3, p, p],
        "threads": threads,
        "seconds": times,
        "window_mpx_per_s": {name: pixels / min(t) for name, t in times.items()},
        **notes,
    }


# --------------------------------------------------------------------------- setup


def make_checkpoint(work: Path, network: dict, encoder: str, train_size: int) -> Path:
    """Train the patch network briefly on synthetic land-cover scenes (once per ``work`` folder)."""
    import gigaseg
    from gigaseg.bench import write_landcover_dataset

    run = work / "run"
    for name in ("best.ckpt", "last.ckpt"):
        if (run / name).exists():
            return run / name
    data = work / "train_data"
    if not (data / "dataset.yaml").exists():
        write_landcover_dataset(data, count=4, height=train_size, width=train_size, seed=1, val_fraction=0.25)
    settings = gigaseg.TrainSettings(epochs=2, batch_size=6, lr=1e-3, progress=False)
    gigaseg.train("patch", data, run, encoder=encoder, options=network, settings=settings)
    for name in ("best.ckpt", "last.ckpt"):
        if (run / name).exists():
            return run / name
    raise RuntimeError(f"training wrote no checkpoint in {run}")


def make_scene(work: Path, side: int) -> Path:
    """A synthetic land-cover scene of ``side`` x ``side`` (tiled BigTIFF, written band by band)."""
    from gigaseg.bench import write_landcover_dataset

    folder = work / f"scene_{side}"
    if not (folder / "dataset.yaml").exists():
        write_landcover_dataset(folder, count=1, height=side, width=side, seed=7, val_fraction=0.0)
    return next((folder / "images").glob("*.tif"))


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def monai_bytes(side: int, classes: int) -> int:
    """What MONAI holds for a ``side``² image: the float32 image, class scores and weight sums, the argmax."""
    pixels = side * side
    return pixels * (3 * 4 + 3 * 1 + classes * 4 + 4 + 8 + 1)


# --------------------------------------------------------------------------- the runs


def run_one(variant: str, checkpoint: Path, image: Path, mask: Path, threads: int) -> dict:
    """One run of ``variant`` in a fresh child: its figures, or why it has none."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_sliding_window as me  # this file, importable by the measuring child
    from gigaseg.bench import ChildError, measure_call

    settings = {
        "gigaseg": {},
        "gigaseg_fast": {"fast": True},
        "gigaseg_fast_bf16": {"fast": True, "precision": "bf16-mixed"},
        "gigaseg_onnxruntime": {"backend": "onnxruntime"},
    }
    if variant.startswith("monai"):
        fn, args = me.run_monai, (str(checkpoint), str(image), str(mask), threads, variant == "monai_fast")
    else:
        fn, args = me.run_gigaseg, (str(checkpoint), str(image), str(mask), threads, settings[variant])
    load = os.getloadavg()[0]
    try:
        report = measure_call(fn, args, baseline=False)
    except ChildError as error:
        return {"variant": variant, "failed": str(error), "load_before": load}
    return {"variant": variant, **report.value, "peak_rss": report.peak_rss, "load_before": load}


def agreement(mask: Path, reference: Path) -> float:
    """The share of pixels with the same label in both masks."""
    import tifffile

    a, b = tifffile.imread(mask), tifffile.imread(reference)
    return float(np.count_nonzero(a == b) / a.size)


def class_shares(mask: Path, classes: int) -> list[float]:
    import tifffile

    counts = np.bincount(tifffile.imread(mask).ravel(), minlength=classes)
    return (counts / counts.sum()).round(4).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rounds", type=int, default=2, help="rounds at the smallest size")
    parser.add_argument("--large-rounds", type=int, default=1, help="rounds at the other sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the checkpoint, scenes and masks (kept)")
    parser.add_argument("--results", default=None, help=f"results folder (default {RESULTS})")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny network and scenes, one round")
    parser.add_argument(
        "--from-log",
        metavar="LOG",
        help="write the results of an interrupted run from its printed lines (speed, peak RSS, load) and the masks "
        "it left in --work",
    )
    parser.add_argument(
        "--not-run-reason", default="", help="with --from-log: why the planned runs missing were not run"
    )
    parser.add_argument(
        "--networks",
        action="store_true",
        help="only time the network alone (plain, folded, channels_last, bf16, torch.compile, ONNX Runtime) in a "
        "child and add it to the existing results",
    )
    args = parser.parse_args(argv)

    from gigaseg.bench import describe_machine

    network, encoder, train_size = NETWORK, ENCODER, 1024
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        network, encoder, train_size = SMOKE["network"], SMOKE["encoder"], SMOKE["train_size"]
        sizes, args.rounds, args.large_rounds = list(SMOKE["sizes"]), 1, 1
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="peer-sliding-"))
    results_dir = Path(args.results) if args.results else (Path(tempfile.mkdtemp()) if args.smoke else RESULTS)
    work.mkdir(parents=True, exist_ok=True)
    if args.networks:
        add_network_speeds(work, results_dir, network, encoder, train_size, args)
        return
    variants = [v for v in args.variants.split(",") if v]
    if args.from_log:
        results = from_log(Path(args.from_log), work, sizes, variants, args)
        previous = results_dir / "peer_sliding_window.json"
        if previous.exists() and "networks" in json.loads(previous.read_text()):
            results["networks"] = json.loads(previous.read_text())["networks"]  # a --networks run's, kept
        write(results, results_dir)
        print(f"wrote {results_dir / 'peer_sliding_window.md'} from {args.from_log}", flush=True)
        return
    start = time.perf_counter()
    checkpoint = make_checkpoint(work, network, encoder, train_size)
    print(f"checkpoint {checkpoint} ({time.perf_counter() - start:.0f} s)", flush=True)
    scenes = {side: make_scene(work, side) for side in sizes}
    classes = 7
    runs: list[dict] = []
    skipped: dict[str, str] = {}
    rounds = max(args.rounds, args.large_rounds)
    for r in range(rounds):
        for side in sizes:
            largest = side == max(sizes) and len(sizes) > 1
            if r >= (args.rounds if side == min(sizes) else args.large_rounds):
                continue
            todo = [v for v in variants if not (v in SMALLEST_ONLY and (side != min(sizes) or r > 0))]
            if largest:
                todo = [v for v in todo if v not in LARGEST_SKIPS]
            todo = todo[r % len(todo) :] + todo[: r % len(todo)]  # rotate the order between rounds
            for variant in todo:
                key = f"{variant}@{side}"
                if variant.startswith("monai"):
                    need, free = monai_bytes(side, classes), available_memory()
                    if free is not None and need > 0.8 * free:
                        skipped[key] = (
                            f"MONAI would hold about {need / 1e9:.1f} GB (image, class scores, weights) with "
                            f"{free / 1e9:.1f} GB available on this shared machine"
                        )
                        print(f"skip {key}: {skipped[key]}", flush=True)
                        continue
                mask = work / "masks" / f"{variant}_{side}.tif"
                mask.parent.mkdir(exist_ok=True)
                row = {"size": side, "round": r, **run_one(variant, checkpoint, scenes[side], mask, args.threads)}
                if "seconds" in row:
                    row["mpx_per_s"] = side * side / 1e6 / row["seconds"]
                    row["mask"] = str(mask)
                runs.append(row)
                print(
                    f"round {r} {key}: "
                    + (
                        f"{row['mpx_per_s']:.3f} Mpx/s, peak RSS {row['peak_rss'] / 1e9:.2f} GB"
                        if "seconds" in row
                        else f"failed: {row['failed']}"
                    )
                    + f" (load {row['load_before']:.2f})",
                    flush=True,
                )
    summary = summarise(runs, sizes, variants, classes)
    results = {
        "machine": describe_machine(),
        "command": "python benchmarks/peer_sliding_window.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "network": {"method": "patch", "encoder": encoder, **network, "classes": classes, "sub_batch": SUB_BATCH},
        "threads": args.threads,
        "sizes": sizes,
        "variants": variants,
        "fast_options": "fast=True: BatchNorm folded, channels_last, next block decoded in a background thread, "
        "sub-batches full across block borders",
        "runs": runs,
        "skipped": skipped,
        "summary": summary,
        "total_seconds": time.perf_counter() - start,
        "smoke": args.smoke,
    }
    write(results, results_dir)
    print(f"wrote {results_dir / 'peer_sliding_window.md'} ({results['total_seconds']:.0f} s)", flush=True)


def from_log(log: Path, work: Path, sizes: list[int], variants: list[str], args) -> dict:
    """The results of a run that was stopped before it wrote them: its printed lines and the masks it left."""
    import re

    from gigaseg.bench import describe_machine

    pattern = re.compile(r"round (\d+) (\w+)@(\d+): ([\d.]+) Mpx/s, peak RSS ([\d.]+) GB \(load ([\d.]+)\)")
    runs = []
    for line in log.read_text().splitlines():
        match = pattern.match(line)
        if match:
            r, variant, side, speed, rss, load = match.groups()
            side, speed = int(side), float(speed)
            mask = work / "masks" / f"{variant}_{side}.tif"
            runs.append(
                {
                    "size": side,
                    "round": int(r),
                    "variant": variant,
                    "seconds": side * side / 1e6 / speed,
                    "mpx_per_s": speed,
                    "peak_rss": float(rss) * 1e9,
                    "load_before": float(load),
                    "mask": str(mask),
                }
            )
    done = sorted({r["size"] for r in runs})
    skipped = {}
    for side in done:
        planned = [v for v in variants if not (v in SMALLEST_ONLY and side != min(sizes))]
        if side == max(sizes) and len(sizes) > 1:
            planned = [v for v in planned if v not in LARGEST_SKIPS]
        for variant in planned:
            if not any(r["size"] == side and r["variant"] == variant for r in runs):
                reason = args.not_run_reason or "not run"
                if variant.startswith("monai"):
                    reason += f"; MONAI would hold about {monai_bytes(side, 7) / 1e9:.1f} GB there (estimate)"
                skipped[f"{variant}@{side}"] = reason
    return {
        "machine": describe_machine(),
        "command": "python benchmarks/peer_sliding_window.py " + " ".join(sys.argv[1:]),
        "network": {"method": "patch", "encoder": ENCODER, **NETWORK, "classes": 7, "sub_batch": SUB_BATCH},
        "threads": args.threads,
        "sizes": done,
        "variants": variants,
        "fast_options": "fast=True: BatchNorm folded, channels_last, next block decoded in a background thread, "
        "sub-batches full across block borders",
        "runs": runs,
        "skipped": skipped,
        "summary": summarise(runs, done, variants, 7),
        "total_seconds": sum(r["seconds"] for r in runs),
        "smoke": False,
        "from_log": (
            f"rebuilt from the printed lines of the runs in {log.name} (stopped runs leave no results file): speeds "
            "to 3 decimals, peak RSS to 10 MB; the masks are those runs' (the last round of each variant and size)"
        ),
    }


def add_network_speeds(work: Path, results_dir: Path, network: dict, encoder: str, train_size: int, args) -> None:
    """Time the network alone in a child and add it to ``peer_sliding_window.json`` (then rewrite the report)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_sliding_window as me
    from gigaseg.bench import measure_call

    checkpoint = make_checkpoint(work, network, encoder, train_size)
    rounds = 1 if args.smoke else 5
    report = measure_call(
        me.network_speeds, (str(checkpoint), args.threads, SUB_BATCH, rounds, not args.smoke), baseline=False
    )
    path = results_dir / "peer_sliding_window.json"
    results = json.loads(path.read_text())
    results["networks"] = {**report.value, "load_before": os.getloadavg()[0]}
    write(results, results_dir)
    print(json.dumps(results["networks"]["window_mpx_per_s"], indent=1), flush=True)


def summarise(runs: list[dict], sizes: list[int], variants: list[str], classes: int) -> dict:
    """Per size and variant: fastest round, its peak RSS (largest over rounds), agreement with MONAI's mask."""
    out: dict = {}
    for side in sizes:
        rows = {}
        for variant in variants:
            done = [r for r in runs if r["size"] == side and r["variant"] == variant and "seconds" in r]
            failed = [r["failed"] for r in runs if r["size"] == side and r["variant"] == variant and "failed" in r]
            if not done:
                if failed:
                    rows[variant] = {"failed": failed[0]}
                continue
            best = min(done, key=lambda r: r["seconds"])
            rows[variant] = {
                "mpx_per_s": best["mpx_per_s"],
                "seconds": best["seconds"],
                "all_seconds": [r["seconds"] for r in done],
                "peak_rss": max(r["peak_rss"] for r in done),
                "load_before": [r["load_before"] for r in done],
                "mask": best["mask"],
            }
        reference = rows.get("monai", {}).get("mask")
        for row in rows.values():
            if "mask" in row and reference:
                row["agreement_with_monai"] = agreement(Path(row["mask"]), Path(reference))
                if "mpx_per_s" in rows.get("monai", {}):
                    row["speed_vs_monai"] = row["mpx_per_s"] / rows["monai"]["mpx_per_s"]
            if "mask" in row and "gigaseg" in rows and "mask" in rows["gigaseg"]:
                row["agreement_with_gigaseg_plain"] = agreement(Path(row["mask"]), Path(rows["gigaseg"]["mask"]))
        if reference:
            rows["monai"]["class_shares"] = class_shares(Path(reference), classes)
        out[str(side)] = rows
    return out


# --------------------------------------------------------------------------- report

LABELS = {
    "monai": "MONAI sliding_window_inference",
    "gigaseg": "gigaseg (plain path, default)",
    "gigaseg_fast": "gigaseg --fast (fp32)",
    "gigaseg_fast_bf16": "gigaseg --fast --precision bf16-mixed",
    "gigaseg_onnxruntime": "gigaseg --backend onnxruntime (fp32)",
    "monai_fast": "MONAI with gigaseg's fast network",
}


def markdown(results: dict) -> str:
    from gigaseg.bench import machine_header

    net = results["network"]
    lines = [
        "# gigaseg against MONAI's sliding_window_inference",
        "",
        machine_header(results["machine"]),
        f"{results['machine'].get('usable_cores')} usable cores shared with other work; {results['threads']} torch "
        "threads per run; load averages before each run are in the table and the JSON.",
        "",
        f"Network: the patch baseline, `{net['encoder']}` encoder, {net['fpn_channels']}-channel FPN, "
        f"{net['classes']} classes, trained briefly on synthetic land-cover scenes; {net['patch_size']}-px windows, "
        f"{net['overlap']} px overlap, gaussian blending (sigma 0.125 of the window), {net['sub_batch']} windows per "
        "forward pass for both. Each run is a fresh child process, end to end: load the checkpoint, read the scene "
        "(a synthetic land-cover tiled TIFF), predict, write a tiled mask TIFF, timed after the same imports in "
        "both (torch, gigaseg's methods with timm and torchvision, MONAI). Speed: the fastest of the rounds "
        "(sizes and variants interleaved); peak RSS: the child's, the largest over rounds.",
        "",
        f"Fast path: {results['fast_options']}.",
        "",
        "| size | variant | Mpx/s | x MONAI | peak RSS | label agreement with MONAI | with gigaseg plain | "
        "seconds (all rounds) | load before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, rows in results["summary"].items():
        for variant in results["variants"]:
            key = f"{variant}@{side}"
            if key in results["skipped"]:
                lines.append(f"| {side}² | {LABELS[variant]} | skipped: {results['skipped'][key]} | | | | | | |")
                continue
            row = rows.get(variant)
            if row is None:
                continue
            if "failed" in row:
                lines.append(f"| {side}² | {LABELS[variant]} | failed: {row['failed']} | | | | | | |")
                continue
            agree = row.get("agreement_with_monai")
            ratio = f"{row['speed_vs_monai']:.2f}" if "speed_vs_monai" in row else "n/a (no MONAI run)"
            plain = row.get("agreement_with_gigaseg_plain")
            lines.append(
                f"| {side}² | {LABELS[variant]} | {row['mpx_per_s']:.3f} | "
                f"{ratio} | {row['peak_rss'] / 1e9:.2f} GB | "
                f"{'' if agree is None else f'{agree:.5%}'} | {'' if plain is None else f'{plain:.5%}'} | "
                f"{', '.join(f'{s:.1f}' for s in row['all_seconds'])} | "
                f"{', '.join(f'{x:.2f}' for x in row['load_before'])} |"
            )
    lines += ["", f"Total run time {results['total_seconds'] / 60:.1f} min. Command: `{results['command']}`.", ""]
    if results.get("from_log"):
        lines += [f"Note: {results['from_log']}.", ""]
    nets = results.get("networks")
    if nets:
        lines += [
            "## The network alone",
            "",
            f"A batch of {nets['batch'][0]} windows of {nets['batch'][2]}², {nets['threads']} threads, in one child, "
            "the variants interleaved, fastest of the rounds (`--networks`). Window megapixels per second (MONAI and "
            "the plain path run `plain`; `--fast` runs `folded_channels_last`, or `bf16` with --precision "
            "bf16-mixed; `--backend onnxruntime` runs `onnxruntime`; `--compile` adds torch.compile).",
            "",
            "| network | window Mpx/s | x plain |",
            "|---|---|---|",
        ]
        base = nets["window_mpx_per_s"]["plain"]
        for name, speed in nets["window_mpx_per_s"].items():
            lines.append(f"| {name} | {speed:.2f} | {speed / base:.2f} |")
        if "compile_seconds" in nets:
            lines += ["", f"torch.compile took {nets['compile_seconds']:.0f} s to compile the network (first call)."]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in results["summary"]]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in results["variants"]:
        xs = [s for s in sizes if "mpx_per_s" in results["summary"][str(s)].get(variant, {})]
        if not xs:
            continue
        rows = [results["summary"][str(s)][variant] for s in xs]
        speed.plot(xs, [r["mpx_per_s"] for r in rows], "o-", label=LABELS[variant])
        memory.plot(xs, [r["peak_rss"] / 1e9 for r in rows], "o-", label=LABELS[variant])
    for ax, title in ((speed, "megapixels per second"), (memory, "peak RSS of the process (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s}²" for s in sizes])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_sliding_window.json").write_text(json.dumps(results, indent=2))
    (out / "peer_sliding_window.md").write_text(markdown(results))
    plot(results, out / "peer_sliding_window.png")


if __name__ == "__main__":
    main()
