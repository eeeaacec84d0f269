"""Peak memory of decoding a PNG or JPEG through ``gigaseg.open_image`` (Pillow), per format.

Pillow cannot decode part of a PNG or JPEG, so ``PillowSource`` decodes the whole image on the
first read and keeps it. Its memory check needs the peak of that decode as a multiple of the
decoded array (``decoded_bytes = H * W * C * itemsize``): Pillow holds its own image buffer (4
bytes per pixel for RGB) while the numpy array is filled, and its decoders have buffers of their
own. This script measures that multiple.

Each image (PNG: RGB, grey, 16-bit grey, palette; JPEG: RGB and grey, each also progressive;
square sides up to 8000 px; smooth content with mild noise) is decoded in a fresh child process
(``gigaseg.bench.measure_command``: the peak RSS of exactly that process) that opens it with
``gigaseg.open_image`` and reads a 1x1 window, which decodes the whole image into the source and
returns almost nothing (a whole-image ``read()`` would add one copy of ``decoded_bytes`` held by the
caller). The baseline is the same child that only imports the same modules. Per format the
factor is the largest measured ``(peak - baseline) / decoded_bytes`` among the images of at least
``FIT_MIN_BYTES`` (smaller images are dominated by fixed allocations), rounded up to 0.05, next to
a least-squares slope per kind; ``DECODE_PEAK_FACTOR`` in ``gigaseg.io.pillow`` takes these
values (and the fixed part that covers the small images, ``DECODE_PEAK_FIXED_BYTES``), and the
report shows whether the library's estimate covers each measured peak.

    python benchmarks/pillow_decode.py [--sizes 1000,2000,4000,8000] [--out DIR]

Writes ``benchmarks/results/pillow_decode.json``, ``.md`` and ``.png`` (``--out`` elsewhere).
``--smoke`` runs the same path on 48- and 96-px images in seconds, writing only to ``--out``
(default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (1000, 2000, 4000, 8000)
SMOKE_SIZES = (48, 96)
#: images smaller than this (decoded) do not enter the per-format factor
FIT_MIN_BYTES = 20 * 10**6
#: kind -> (format, Pillow mode written, description)
KINDS = {
    "png_rgb": ("PNG", "RGB", "PNG, RGB 8-bit"),
    "png_grey": ("PNG", "L", "PNG, grey 8-bit"),
    "png_grey16": ("PNG", "I;16", "PNG, grey 16-bit"),
    "png_palette": ("PNG", "P", "PNG, palette (read as RGB colours)"),
    "jpeg_rgb": ("JPEG", "RGB", "JPEG, RGB"),
    "jpeg_grey": ("JPEG", "L", "JPEG, grey"),
    "jpeg_rgb_progressive": ("JPEG (progressive)", "RGB", "JPEG, RGB, progressive, 4:4:4"),
    "jpeg_grey_progressive": ("JPEG (progressive)", "L", "JPEG, grey, progressive"),
}
#: repeats of the imports-only baseline (its median is subtracted)
BASELINE_REPEATS = 3


# --------------------------------------------------------------------------- the child


def child(path: str | None) -> None:
    """Import what a decode needs; with ``path``, open it and read a 1x1 window (decoding it whole)."""
    import numpy  # noqa: F401
    from PIL import Image, JpegImagePlugin, PngImagePlugin  # noqa: F401

    import gigaseg

    open_image, window = gigaseg.open_image, gigaseg.Window
    Image.init()
    if path is None:
        print(json.dumps({"baseline": True}), flush=True)
        return
    start = time.perf_counter()
    source = open_image(path)
    pixel = source.read(window(0, 0, 1, 1))
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "pillow_format": getattr(source, "format", None),
                "file_mode": source.mode,
                "shape": list(source.shape),
                "dtype": str(source.dtype),
                "decoded_bytes": int(source.decoded_bytes),
                "estimated_peak_bytes": getattr(source, "estimated_peak_bytes", None),
                "decode_s": seconds,
                "pixel": pixel.ravel().tolist(),
            }
        ),
        flush=True,
    )


# --------------------------------------------------------------------------- the images


def make_image(kind: str, side: int, path: Path) -> None:
    """Write a ``side`` x ``side`` image of ``kind``: smooth gradients with mild noise (compresses well)."""
    import numpy as np
    from PIL import Image

    fmt, mode, _ = KINDS[kind]
    rng = np.random.default_rng(side)
    ramp = np.arange(side, dtype=np.uint16)
    grey = ((ramp[:, None] + ramp[None, :]) // 8 % 256).astype(np.uint8)
    grey += rng.integers(0, 8, grey.shape, dtype=np.uint8)
    if mode == "RGB":
        image = Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], axis=-1))
    elif mode == "L":
        image = Image.fromarray(grey)
    elif mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257)
    else:  # palette: 16 colours
        image = Image.frombytes("P", (side, side), (grey // 16).tobytes())
        image.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, (i * 48) % 256)])
    del grey
    if fmt == "PNG":
        image.save(path, format="PNG", compress_level=1)
    elif fmt == "JPEG":
        image.save(path, format="JPEG", quality=90)
    else:  # progressive, without chroma subsampling: the most coefficients a decoder keeps
        image.save(path, format="JPEG", quality=90, progressive=True, subsampling=0)
    image.close()


# --------------------------------------------------------------------------- measuring


def _last_json(text: str | None) -> dict:
    lines = [line for line in (text or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def run(sizes: tuple[int, ...], work: Path) -> dict:
    """Measure every kind at every size; the raw figures plus the per-format fit."""
    from gigaseg.bench import measure_command

    python = sys.executable
    baselines = []
    for _ in range(BASELINE_REPEATS):
        report = measure_command([python, __file__, "--child"], capture_output=True, timeout=300)
        if report.returncode != 0:
            raise SystemExit(f"baseline child failed ({report.returncode}):\n{report.stderr}")
        baselines.append(report.peak_rss)
    baseline = int(statistics.median(baselines))
    print(f"baseline (imports only): {baseline / 1e6:.1f} MB", flush=True)
    runs = []
    for kind in KINDS:
        for side in sizes:
            suffix = ".png" if KINDS[kind][0] == "PNG" else ".jpg"
            path = work / f"{kind}_{side}{suffix}"
            make_image(kind, side, path)
            report = measure_command([python, __file__, "--child", str(path)], capture_output=True, timeout=600)
            info = _last_json(report.stdout)
            row = {
                "kind": kind,
                "format": KINDS[kind][0],
                "side": side,
                "file_bytes": path.stat().st_size,
                "returncode": report.returncode,
                "peak_rss": report.peak_rss,
                "wall_s": report.wall_s,
                **info,
            }
            path.unlink()
            if report.returncode != 0:
                row["stderr_tail"] = (report.stderr or "")[-2000:]
                print(f"{kind} {side}: child failed ({report.returncode})", flush=True)
            else:
                row["above_baseline"] = report.peak_rss - baseline
                row["ratio"] = row["above_baseline"] / row["decoded_bytes"]
                estimate = row.get("estimated_peak_bytes")
                row["estimate_covers"] = None if estimate is None else estimate >= row["above_baseline"]
                print(
                    f"{kind} {side}: decoded {row['decoded_bytes'] / 1e6:.1f} MB, peak above baseline "
                    f"{row['above_baseline'] / 1e6:.1f} MB, ratio {row['ratio']:.2f}, {row['decode_s']:.2f} s",
                    flush=True,
                )
            runs.append(row)
    return {"baseline_rss": baseline, "baseline_runs": baselines, "runs": runs, "fit": fit(runs)}


def fit(runs: list[dict]) -> dict:
    """Per format, the factor (largest ratio among images of at least ``FIT_MIN_BYTES``) and slopes per kind;
    then the fixed bytes that make ``factor * decoded + fixed`` cover every measured peak."""
    formats: dict = {}
    ok = [r for r in runs if r["returncode"] == 0]
    for fmt in sorted({r["format"] for r in ok}):
        rows = [r for r in ok if r["format"] == fmt]
        large = [r for r in rows if r["decoded_bytes"] >= FIT_MIN_BYTES] or rows
        slopes = {}
        for kind in sorted({r["kind"] for r in rows}):
            points = [(r["decoded_bytes"], r["above_baseline"]) for r in rows if r["kind"] == kind]
            mean_x = sum(x for x, _ in points) / len(points)
            mean_y = sum(y for _, y in points) / len(points)
            sxx = sum((x - mean_x) ** 2 for x, _ in points)
            if sxx > 0:
                slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
                slopes[kind] = {"slope": slope, "intercept_bytes": mean_y - slope * mean_x}
        largest = max(r["ratio"] for r in large)
        formats[fmt] = {
            "max_ratio": largest,
            "factor": math.ceil(largest * 20) / 20,
            "images_fitted": len(large),
            "by_kind": slopes,
        }
    residual = max((r["above_baseline"] - formats[r["format"]]["factor"] * r["decoded_bytes"] for r in ok), default=0)
    return {"formats": formats, "fixed_bytes": max(0, math.ceil(residual / 1e6)) * 10**6}


# --------------------------------------------------------------------------- report


def machine() -> dict:
    """``gigaseg.bench.describe_machine()`` plus the versions of the decoding libraries."""
    import numpy
    import PIL

    from gigaseg.bench import describe_machine

    return {**describe_machine(), "numpy": numpy.__version__, "pillow": PIL.__version__}


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.1f} MB"


def markdown(result: dict) -> str:
    from gigaseg.bench import machine_header

    m = result["machine"]
    lines = [
        "# Peak memory of decoding PNG and JPEG with Pillow",
        "",
        machine_header(m),
        f"Pillow {m['pillow']}, numpy {m['numpy']}; {m['usable_cores']} usable cores, "
        f"{(m['memory_bytes'] or 0) / 1e9:.1f} GB RAM.",
        "",
        "Each image was decoded in a fresh child process (`gigaseg.open_image(path).read(Window(0, 0, 1, 1))`, "
        "which decodes the whole image into the source). *Peak above baseline* is that child's peak RSS minus "
        f"the median peak of a child that only imports the same modules ({_mb(result['baseline_rss'])}). "
        "*Ratio* = peak above baseline / decoded bytes (H x W x C x itemsize of the array gigaseg returns). "
        "*Estimate* is the library's `PillowSource.estimated_peak_bytes` for that file.",
        "",
        "| image | side | decoded | file | peak above baseline | ratio | estimate | covered | decode s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if r["returncode"] != 0:
            lines.append(f"| {KINDS[r['kind']][2]} | {r['side']} | child failed ({r['returncode']}) | | | | | | |")
            continue
        covered = {None: "n/a", True: "yes", False: "**no**"}[r.get("estimate_covers")]
        lines.append(
            f"| {KINDS[r['kind']][2]} | {r['side']} | {_mb(r['decoded_bytes'])} | {_mb(r['file_bytes'])} | "
            f"{_mb(r['above_baseline'])} | {r['ratio']:.2f} | {_mb(r.get('estimated_peak_bytes'))} | {covered} | "
            f"{r['decode_s']:.2f} |"
        )
    lines += [
        "",
        "## Factor per format",
        "",
        f"The largest ratio among images of at least {FIT_MIN_BYTES / 1e6:.0f} MB decoded, rounded up to 0.05 "
        "(the value for `DECODE_PEAK_FACTOR` in `gigaseg.io.pillow`); slopes are least-squares fits of peak "
        "above baseline against decoded bytes per kind.",
        "",
        "| format | max ratio | factor | images | slope per kind |",
        "|---|---|---|---|---|",
    ]
    for fmt, f in result["fit"]["formats"].items():
        slopes = ", ".join(f"{k} {v['slope']:.2f}" for k, v in f["by_kind"].items())
        lines.append(f"| {fmt} | {f['max_ratio']:.2f} | {f['factor']:.2f} | {f['images_fitted']} | {slopes} |")
    fixed = result["fit"]["fixed_bytes"]
    lines += [
        "",
        f"Fixed part: {_mb(fixed)}, the largest measured peak above `factor x decoded bytes` (small images, where "
        "the decoders' own buffers and the allocator's granularity dominate), rounded up to a whole MB: the value "
        "for `DECODE_PEAK_FIXED_BYTES`. The library estimates a decode's peak as `factor x decoded_bytes + fixed`.",
        "",
        "The decoded array is filled from Pillow's buffer in bands of rows, so the peak is Pillow's buffer (4 bytes "
        "per pixel for RGB, 1 for grey and palette, 2 for 16-bit) plus the array, plus for progressive JPEG the "
        "decoder's coefficient buffers. A whole-image `read()` returns a copy: add one `decoded_bytes` for the "
        "caller's array. Interlaced PNGs were not measured (Pillow cannot write them).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colours = {"PNG": "tab:blue", "JPEG": "tab:orange", "JPEG (progressive)": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for index, kind in enumerate(KINDS):
        rows = [r for r in result["runs"] if r["kind"] == kind and r["returncode"] == 0]
        if rows:
            fmt = KINDS[kind][0]
            ax.plot(
                [r["decoded_bytes"] / 1e6 for r in rows],
                [r["ratio"] for r in rows],
                marker=markers[index % len(markers)],
                color=colours[fmt],
                alpha=0.5 + 0.5 * (index % 2),
                label=KINDS[kind][2],
            )
    for fmt, f in result["fit"]["formats"].items():
        ax.axhline(f["factor"], color=colours[fmt], linestyle="--", linewidth=1, label=f"{fmt} factor")
    ax.set_xscale("log")
    ax.set_xlabel("decoded size (MB)")
    ax.set_ylabel("peak RSS above baseline / decoded size")
    ax.set_title("Pillow decode peak through gigaseg.open_image")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated square sides (default 1000,2000,4000,8000)")
    parser.add_argument("--out", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny images, temporary output (a smoke run)")
    parser.add_argument("--child", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child or None)
        return 0
    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="gigaseg-pillow-smoke-"))
        if out.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        sizes = SMOKE_SIZES
    else:
        out, sizes = args.out or RESULTS, SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="gigaseg-pillow-") as work:
        measured = run(sizes, Path(work))
    result = {"benchmark": "pillow_decode", "machine": machine(), "sizes": list(sizes), **measured}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pillow_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pillow_decode.md").write_text(markdown(result))
    plot(result, out / "pillow_decode.png")
    factors = {fmt: f["factor"] for fmt, f in result["fit"]["formats"].items()}
    print(json.dumps({"factors": factors, "fixed_bytes": result["fit"]["fixed_bytes"]}), flush=True)
    print(f"results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
