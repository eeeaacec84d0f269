"""The GPU figures in one run (at most 8 minutes on a lent GPU); ``--dry-run`` runs the same code on CPU.

Sections, each on the device it is given (``cuda`` by default), results naming the device
(``torch.cuda.get_device_name``):

1. ``icnet``: ICNet (``icnet_resnet50_half``, 19 classes, random weights) frames per second at
   1024x2048, batch 1, BatchNorm folded and channels_last (``gigaseg.optimize_for_inference``), in
   float32 and under bfloat16 and float16 autocast (the paper: 30 fps on a Titan X); warm-up
   forwards first, then the median of timed forwards (synchronised), and the peak memory allocated.
2. ``memory``: the peak CUDA memory allocated by ``gigaseg.predict`` of a DeepGlobe-sized
   2448x2448 scene with GLNet (ResNet-50 FPN, the paper's 508-px global view and patches, stage 3)
   and MagNet (its ``deepglobe`` preset, refinement on), each after resetting the peak (the papers:
   1865 MB and 1559 MB).
3. ``patch_vs_monai``: the patch baseline (ResNet-18, 64-channel FPN, 256-px windows, 32 px
   overlap, gaussian blending) on a 4096x4096 scene: ``gigaseg.predict`` with ``max_memory="8GB"``
   (plain, ``fast=True``, ``fast=True`` with bf16) next to MONAI's ``sliding_window_inference`` with
   the same network, window, overlap, blending and batch (the windows per pass gigaseg plans for
   that budget; MONAI's windows and sums on the GPU), megapixels per second (fastest of
   ``--repeat``) and the agreement of the labels with MONAI's.

Every section records its own wall time; a section that fails is recorded with its error and the
others still run. Weights are random (seeded): speed and memory do not depend on them.

    python benchmarks/gpu_suite.py [--device cuda] [--repeat 2] [--results DIR]

Writes ``benchmarks/results/gpu_suite.{json,md}``. ``--dry-run`` (also ``--smoke``) runs every section
on the CPU with tiny networks and sizes in seconds, writing to ``--results`` (default: a temporary
folder), never to the committed results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

FULL = {
    "icnet": {"encoder": "icnet_resnet50_half", "options": {}, "size": (1024, 2048), "warmup": 10, "repeats": 50},
    "glnet": {"encoder": "resnet50", "options": {}, "scene": 2448},
    "magnet": {"encoder": "resnet50", "options": {"preset": "deepglobe"}, "scene": 2448},
    "patch": {
        "encoder": "resnet18",
        "options": {"patch_size": 256, "overlap": 32, "fpn_channels": 64, "blend": "gaussian"},
        "scene": 4096,
        "max_memory": "8GB",
    },
}
DRY = {
    "icnet": {"encoder": "test_resnet", "options": {"width": 0.25}, "size": (64, 128), "warmup": 1, "repeats": 2},
    "glnet": {
        "encoder": "test_resnet",
        "options": {"size_g": 64, "size_p": 64, "min_overlap": 16, "fpn_channels": 16},
        "scene": 160,
    },
    "magnet": {
        "encoder": "test_resnet",
        "options": {"scales": [[32, 32], [64, 64], [128, 128]], "input_size": [32, 32], "median_kernel": 3},
        "scene": 160,
    },
    "patch": {
        "encoder": "test_resnet",
        "options": {"patch_size": 64, "overlap": 16, "fpn_channels": 16, "blend": "gaussian"},
        "scene": 256,
        "max_memory": None,
    },
}
CLASSES = {"icnet": 19, "glnet": 7, "magnet": 7, "patch": 7}


# --------------------------------------------------------------------------- helpers


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> int | None:
    """The peak CUDA memory allocated since the last reset (None on the CPU)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else None


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from gigaseg.bench import describe_machine

    return f"CPU: {describe_machine().get('cpu')}"


def scene(side: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic RGB scene (speed and memory do not depend on its content)."""
    y = np.arange(side, dtype=np.float32)[:, None]
    x = np.arange(side, dtype=np.float32)[None, :]
    base = (np.sin(x / 97.0) + np.cos(y / 131.0) + np.sin((x + y) / 41.0)) * 40 + 128
    noise = np.random.default_rng(seed).integers(-20, 20, (side, side, 1))
    return (np.stack([base, base * 0.8 + 20, 255 - base], axis=-1) + noise).clip(0, 255).astype(np.uint8)


def autocast(device, precision: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- sections


def icnet_fps(device, cfg: dict) -> dict:
    """ICNet frames per second at ``cfg['size']``: folded + channels_last, fp32 / bf16 / fp16 autocast."""
    import torch

    import gigaseg

    torch.manual_seed(0)
    model = gigaseg.create_model("icnet", encoder=cfg["encoder"], num_classes=CLASSES["icnet"], **cfg["options"])
    model = model.eval().to(device)
    net = gigaseg.optimize_for_inference(model, torch.zeros(1, 3, 64, 64, device=device), channels_last=True)
    x = torch.randn(1, 3, *cfg["size"], device=device).contiguous(memory_format=torch.channels_last)
    out = {"size": list(cfg["size"]), "folded_batchnorms": net.folded_batchnorms, "precisions": {}}
    precisions = ["fp32", "bf16", "fp16"]
    if torch.device(device).type == "cpu":
        precisions = ["fp32", "bf16"]  # float16 autocast is a GPU mode
        out["note"] = "fp16 autocast is for GPUs: not run on the CPU"
    for precision in precisions:
        reset_peak(device)
        times = []
        with torch.inference_mode(), autocast(device, precision):
            for i in range(cfg["warmup"] + cfg["repeats"]):
                sync(device)
                start = time.perf_counter()
                net(x)
                sync(device)
                if i >= cfg["warmup"]:
                    times.append(time.perf_counter() - start)
        median = statistics.median(times)
        out["precisions"][precision] = {
            "median_s": median,
            "fps": 1.0 / median,
            "max_memory_allocated": peak(device),
            "repeats": cfg["repeats"],
        }
        print(f"icnet {precision}: {1.0 / median:.1f} fps", flush=True)
    return out


def prediction_memory(device, method: str, cfg: dict) -> dict:
    """Peak CUDA memory of ``gigaseg.predict`` on a ``cfg['scene']``² scene with ``method``."""
    import torch

    import gigaseg

    torch.manual_seed(0)
    model = gigaseg.create_model(method, encoder=cfg["encoder"], num_classes=CLASSES[method], **cfg["options"])
    if method == "glnet":
        model.set_stage(3)
        model.copy_global_to_fixed()
    model = model.eval().to(device)
    image = scene(cfg["scene"])
    reset_peak(device)
    start = time.perf_counter()
    options = {"refine": "always"} if method == "magnet" else None
    result = gigaseg.predict(model, image, None, device=device, progress=False, options=options)
    sync(device)
    seconds = time.perf_counter() - start
    figure = peak(device)
    print(f"{method} on {cfg['scene']}²: {seconds:.1f} s, peak {figure} bytes", flush=True)
    return {
        "scene": cfg["scene"],
        "seconds": seconds,
        "mpx_per_s": result.megapixels_per_second,
        "max_memory_allocated": figure,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def patch_vs_monai(device, cfg: dict, repeat: int) -> dict:
    """The patch baseline through gigaseg (plain, fast, fast bf16) and MONAI on the same network and scene."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    import gigaseg

    torch.manual_seed(0)
    model = gigaseg.create_model("patch", encoder=cfg["encoder"], num_classes=CLASSES["patch"], **cfg["options"])
    model = model.eval().to(device)
    image = scene(cfg["scene"])
    normalization = gigaseg.Normalization.for_image(3, np.uint8)
    patch, overlap = cfg["options"]["patch_size"], cfg["options"]["overlap"]
    # MONAI's batch: the windows per pass gigaseg plans for the budget
    budget = cfg["max_memory"]
    batch = gigaseg.build_predictor(model, normalization, device=device, max_memory=budget).sub_batch

    def run_gigaseg(**settings):
        bands = []
        start = time.perf_counter()
        gigaseg.predict(
            model,
            image,
            None,
            device=device,
            max_memory=budget,
            progress=False,
            on_band=lambda _w, b: bands.append(b),
            **settings,
        )
        sync(device)
        return time.perf_counter() - start, np.concatenate(bands)

    def run_monai():
        start = time.perf_counter()
        pixels = torch.from_numpy(normalization.apply(image))[None]

        def window(b):
            probs = torch.softmax(model(b).float(), dim=1)
            return F.interpolate(probs, size=b.shape[-2:], mode="bilinear", align_corners=False)

        with torch.inference_mode():
            scores = sliding_window_inference(
                pixels,
                (patch, patch),
                batch,
                window,
                overlap=overlap / patch,
                mode="gaussian",
                sigma_scale=0.125,
                sw_device=device,
                device=device,
            )
            labels = scores[0].argmax(0).to(torch.uint8).cpu().numpy()
        sync(device)
        return time.perf_counter() - start, labels

    variants = {
        "monai": run_monai,
        "gigaseg": lambda: run_gigaseg(),
        "gigaseg_fast": lambda: run_gigaseg(fast=True),
        "gigaseg_fast_bf16": lambda: run_gigaseg(fast=True, precision="bf16-mixed"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    labels = {}
    for _ in range(repeat):
        for name, run in variants.items():
            seconds, labels[name] = run()
            times[name].append(seconds)
    side = cfg["scene"]
    out = {"scene": side, "sub_batch": batch, "max_memory": budget, "variants": {}}
    for name, t in times.items():
        out["variants"][name] = {
            "seconds": t,
            "mpx_per_s": side * side / 1e6 / min(t),
            "agreement_with_monai": float((labels[name] == labels["monai"]).mean()),
        }
        print(f"patch {name}: {side * side / 1e6 / min(t):.2f} Mpx/s", flush=True)
    return out


# --------------------------------------------------------------------------- run and report


def section(results: dict, name: str, fn, *args) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as error:  # noqa: BLE001 - a failed section is recorded, the others run
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"{name} failed: {error}", flush=True)
    results[name]["section_seconds"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--results", default=None)
    parser.add_argument("--dry-run", "--smoke", dest="dry_run", action="store_true", help="CPU, tiny sizes")
    args = parser.parse_args(argv)

    import torch

    from gigaseg.bench import describe_machine

    cfg = DRY if args.dry_run else FULL
    device = "cpu" if args.dry_run else args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        raise SystemExit(2)
    repeat = 1 if args.dry_run else args.repeat
    start = time.perf_counter()
    results: dict = {
        "machine": describe_machine(),
        "device": device_name(device),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg,
    }
    section(results, "icnet", icnet_fps, device, cfg["icnet"])
    section(results, "glnet", prediction_memory, device, "glnet", cfg["glnet"])
    section(results, "magnet", prediction_memory, device, "magnet", cfg["magnet"])
    section(results, "patch_vs_monai", patch_vs_monai, device, cfg["patch"], repeat)
    results["total_seconds"] = time.perf_counter() - start
    out = Path(args.results) if args.results else (Path(tempfile.mkdtemp()) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_suite.md").write_text(markdown(results))
    print(f"wrote {out / 'gpu_suite.md'} in {results['total_seconds']:.0f} s", flush=True)
    return results


def _mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MB"


def markdown(results: dict) -> str:
    from gigaseg.bench import machine_header

    lines = [
        "# GPU suite"
        + (" (dry run on the CPU: tiny networks and sizes, not GPU figures)" if results["dry_run"] else ""),
        "",
        machine_header(results["machine"]),
        f"Device: **{results['device']}**; torch {results['torch']}. Random weights (seeded). "
        f"Total {results['total_seconds']:.0f} s.",
        "",
        "## ICNet, batch 1, BatchNorm folded, channels_last",
        "",
    ]
    icnet = results["icnet"]
    if "error" in icnet:
        lines.append(f"failed: {icnet['error']}")
    else:
        h, w = icnet["size"]
        lines += [f"| precision | frames/s at {h}x{w} | max allocated |", "|---|---|---|"]
        for precision, row in icnet["precisions"].items():
            lines.append(f"| {precision} | {row['fps']:.1f} | {_mb(row['max_memory_allocated'])} |")
        lines.append("")
        lines.append("The paper: 30.3 fps on a Titan X (Maxwell) at 1024x2048.")
    lines += ["", "## Prediction memory on a DeepGlobe-sized scene", "", "| method | scene | max allocated | s |"]
    lines.append("|---|---|---|---|")
    for method, paper in (("glnet", "1865 MB"), ("magnet", "1559 MB")):
        row = results[method]
        if "error" in row:
            lines.append(f"| {method} | failed: {row['error']} | | |")
        else:
            lines.append(
                f"| {method} (paper: {paper}) | {row['scene']}² | {_mb(row['max_memory_allocated'])} | "
                f"{row['seconds']:.1f} |"
            )
    lines += ["", "## Patch baseline against MONAI's sliding_window_inference", ""]
    row = results["patch_vs_monai"]
    if "error" in row:
        lines.append(f"failed: {row['error']}")
    else:
        lines += [
            f"{row['scene']}² scene, {row['sub_batch']} windows per pass for both.",
            "",
            "| variant | Mpx/s | x MONAI | agreement with MONAI |",
            "|---|---|---|---|",
        ]
        base = row["variants"]["monai"]["mpx_per_s"]
        for name, v in row["variants"].items():
            lines.append(
                f"| {name} | {v['mpx_per_s']:.2f} | {v['mpx_per_s'] / base:.2f} | {v['agreement_with_monai']:.5%} |"
            )
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
