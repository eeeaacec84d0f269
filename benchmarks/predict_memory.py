"""Peak memory of `gigaseg predict` stays flat as the image grows; a killed run resumes exactly.

Writes benchmarks/results/predict_memory.{json,md}. For each side (2k, 6k, 20k by
default) it writes a synthetic RGB tiled BigTIFF (cheap procedural texture: content
does not change memory or speed), then runs `gigaseg predict` with the patch baseline
(ResNet-18 encoder; by default the demo's settings, 256-px patches with 32-px overlap and a
64-channel FPN, which run about 10x faster on CPU than the paper defaults, 508 px with
120-px overlap and 256 channels: `--patch-size 508 --overlap 120 --fpn-channels 256`) in a
fresh child process and records its peak RSS, wall time and megapixels per second. Then, on the
largest image, it SIGKILLs a second run halfway (after half the bands are done),
reruns it, and checks the resumed mask equals the uninterrupted one, band by band.

    python benchmarks/predict_memory.py [--sides 2048,6144,20000] [--work DIR] [--output-stride 1]

``--output-stride 1`` (or 2) predicts with the full-resolution head instead of the paper
heads' 1/4 logits and writes ``predict_memory_stride1.{json,md}`` beside the stride-4 results.

``--smoke`` runs the same path in seconds (one 1024-px scene, a test_resnet patch model with
64-px patches), writing only to ``--work`` and ``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gigaseg.bench import describe_machine, format_size, machine_header, measure_command, write_tiled_tiff

RESULTS = Path(__file__).parent / "results"
#: ``--smoke``: settings that replace the defaults
SMOKE = {"sides": "1024", "encoder": "test_resnet", "patch_size": 64, "overlap": 16, "fpn_channels": 16}


def write_scene(path: Path, side: int) -> None:
    """A procedural RGB texture written band by band (bounded memory at any size)."""

    def render(window):
        y = np.arange(window.top, window.bottom, dtype=np.float32)[:, None]
        x = np.arange(window.left, window.right, dtype=np.float32)[None, :]
        base = (np.sin(x / 97.0) + np.cos(y / 131.0) + np.sin((x + y) / 41.0)) * 40 + 128
        return np.stack([base, base * 0.8 + 20, 255 - base], axis=-1).clip(0, 255).astype(np.uint8)

    if not path.exists():
        write_tiled_tiff(path, side, side, 3, np.uint8, render, tile=512, render_width=4096)


def make_checkpoint(path: Path, options: dict, encoder: str = "resnet18") -> None:
    if path.exists():
        return
    import torch

    from gigaseg import Normalization, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("patch", encoder=encoder, num_classes=7, **options)
    data = {
        "classes": [f"class_{i}" for i in range(7)],
        "palette": [[i * 36, 255 - i * 36, 128] for i in range(7)],
        "ignore_index": 255,
        "exclude_from_miou": [],
        "normalization": Normalization.for_image(3, np.uint8).to_dict(),
    }
    save_checkpoint(path, model, data)


def predict_argv(image: Path, ckpt: Path, out: Path, budget: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gigaseg",
        "predict",
        str(image),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--max-memory",
        budget,
    ]


def masks_equal(a: Path, b: Path) -> bool:
    import tifffile
    import zarr

    with tifffile.TiffFile(a) as fa, tifffile.TiffFile(b) as fb:
        za = zarr.open(fa.series[0].aszarr(level=0), mode="r")
        zb = zarr.open(fb.series[0].aszarr(level=0), mode="r")
        if za.shape != zb.shape:
            return False
        for top in range(0, za.shape[0], 2048):
            if not np.array_equal(za[top : top + 2048], zb[top : top + 2048]):
                return False
    return True


def kill_halfway_and_resume(image: Path, ckpt: Path, out: Path, budget: str, side: int) -> dict:
    progress = out / f".{image.stem}.tif.scratch" / "progress.json"
    total_bands = -(-side // 512)
    child = subprocess.Popen(
        predict_argv(image, ckpt, out, budget), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    done = 0
    while child.poll() is None:
        if progress.exists():
            try:
                done = len(json.loads(progress.read_text()).get("done", []))
            except (json.JSONDecodeError, OSError):
                pass
            if done >= total_bands // 2:
                child.send_signal(signal.SIGKILL)
                child.wait()
                break
        time.sleep(0.5)
    killed_with = done
    final_existed = (out / f"{image.stem}.tif").exists()
    resumed = measure_command(predict_argv(image, ckpt, out, budget), baseline=False)
    return {
        "bands_total": total_bands,
        "bands_done_when_killed": killed_with,
        "final_file_existed_after_kill": final_existed,
        "resume_peak_rss": resumed.peak_rss,
        "resume_seconds": resumed.wall_s,
        "returncode": resumed.returncode,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="2048,6144,20000")
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--work", help="scenes, checkpoint and masks (default: /tmp/gigaseg-predict-bench)")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--output-stride", type=int, default=4, choices=(1, 2, 4), help="where the logits are made")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="a small scene and model, temporary output (a smoke run)")
    args = parser.parse_args(argv)
    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-predict-smoke-"))
        work, results_dir = Path(args.work) if args.work else scratch / "work", args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        for key, value in SMOKE.items():
            setattr(args, key, value)
    else:
        work, results_dir = Path(args.work or "/tmp/gigaseg-predict-bench"), args.results or RESULTS
    work.mkdir(parents=True, exist_ok=True)
    options = {"patch_size": args.patch_size, "overlap": args.overlap, "fpn_channels": args.fpn_channels}
    if args.output_stride != 4:  # stride 4 keeps the options of the results committed before the option existed
        options["output_stride"] = args.output_stride
    stem = "predict_memory" if args.output_stride == 4 else f"predict_memory_stride{args.output_stride}"
    ckpt = (
        work / f"patch-{args.encoder}-{args.patch_size}-{args.overlap}-{args.fpn_channels}-s{args.output_stride}.ckpt"
    )
    make_checkpoint(ckpt, options, args.encoder)
    results = {
        "machine": describe_machine(),
        "method": "patch",
        "encoder": args.encoder,
        "options": options,
        "budget": args.budget,
        "runs": [],
        "command": "benchmarks/predict_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
        "stem": stem,
    }
    sides = [int(s) for s in args.sides.split(",")]
    for side in sides:
        image = work / f"scene_{side}.tif"
        write_scene(image, side)
        out = work / f"pred_{side}_s{args.output_stride}"
        report = measure_command(predict_argv(image, ckpt, out, args.budget) + ["--restart"], baseline=True)
        run = {
            "side": side,
            "megapixels": side * side / 1e6,
            "peak_rss": report.peak_rss,
            "torch_import_rss": report.baseline_rss,
            "seconds": report.wall_s,
            "megapixels_per_second": side * side / 1e6 / report.wall_s,
            "returncode": report.returncode,
        }
        results["runs"].append(run)
        print(f"{side}: peak RSS {format_size(report.peak_rss)} in {report.wall_s:.0f} s", flush=True)
        write(results, results_dir)
    if not args.skip_kill:
        side = sides[-1]
        image = work / f"scene_{side}.tif"
        out = work / f"pred_{side}_s{args.output_stride}_killed"
        results["kill_and_resume"] = kill_halfway_and_resume(image, ckpt, out, args.budget, side)
        results["kill_and_resume"]["identical_to_uninterrupted"] = masks_equal(
            out / f"{image.stem}.tif", work / f"pred_{side}_s{args.output_stride}" / f"{image.stem}.tif"
        )
        write(results, results_dir)
    print(f"results in {results_dir}", flush=True)


def write(results: dict, results_dir: Path = RESULTS) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results.get("stem", "predict_memory")
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Peak memory of `gigaseg predict` versus image size",
        "",
        machine_header(results["machine"]),
        f"Method: patch baseline, encoder {results['encoder']}, options {results['options']}, "
        f"--max-memory {results['budget']}.",
        "",
        f"Command: `{results.get('command', 'benchmarks/predict_memory.py')}` (OMP_NUM_THREADS="
        f"{results.get('threads', 'all cores')}).",
        "",
        "| image side | megapixels | peak RSS (whole process) | seconds | Mpx/s |",
        "|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['side']} | {run['megapixels']:.1f} | {format_size(run['peak_rss'])} | "
            f"{run['seconds']:.0f} | {run['megapixels_per_second']:.2f} |"
        )
    if results["runs"] and results["runs"][0].get("torch_import_rss"):
        lines += [
            "",
            f"A child that only imports torch peaks at {format_size(results['runs'][0]['torch_import_rss'])}.",
        ]
    kill = results.get("kill_and_resume")
    if kill:
        lines += [
            "",
            f"SIGKILL after {kill['bands_done_when_killed']} of {kill['bands_total']} bands; final file "
            f"present after the kill: {kill['final_file_existed_after_kill']}; the rerun resumed in "
            f"{kill['resume_seconds']:.0f} s at peak RSS {format_size(kill['resume_peak_rss'])}; resumed mask "
            f"identical to the uninterrupted one: {kill.get('identical_to_uninterrupted')}.",
        ]
    (results_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
