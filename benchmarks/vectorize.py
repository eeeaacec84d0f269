"""Polygonising land-cover masks with `gigaseg vectorize`: peak RSS and time up to 20000 x 20000.

For each side (2048, 6144, 20000 by default) it writes a synthetic land-cover scene with the
project's generator (``gigaseg synth landcover --count 1``: image and a tiled, compressed uint8
mask with its class names and colour map), then runs ``gigaseg vectorize`` on the mask in a fresh
child process (``gigaseg.bench.measure_command``) and records its peak RSS and wall time. The
polygons are then checked against the mask, read band by band: every class's ``pixels`` add up
to its pixel count, and the polygons of each class number exactly its 4-connected regions
(``scipy.ndimage.label`` on the whole mask, in this process, not the measured one), so no region
was split at a band border or merged with another.

Writes ``benchmarks/results/vectorize.{json,md,png}`` with the machine, commit and command. A child
that only imports the modules vectorising needs is measured as the baseline.

    python benchmarks/vectorize.py [--sides 2048,6144,20000] [--work DIR] [--band-rows 512]

``--smoke`` runs the same steps on a 512 x 512 scene in seconds, writing only to ``--work`` and
``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import gigaseg
from gigaseg.bench import describe_machine, format_size, machine_header, measure_command

RESULTS = Path(__file__).parent / "results"
#: what the baseline child imports: the vectoriser and the libraries it works through
IMPORTS = "import gigaseg; gigaseg.vectorize_mask; import rasterio.features, shapely, pyogrio, scipy.ndimage"
#: rows read at once when counting the mask's pixels
COUNT_ROWS = 1024


def synth_mask(work: Path, side: int) -> tuple[Path, float | None]:
    """The mask of a ``side`` x ``side`` synthetic land-cover scene (made once per work folder)."""
    folder = work / f"landcover_{side}"
    mask = folder / "masks" / "landcover_000.tif"
    if mask.exists():
        return mask, None
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, "-m", "gigaseg", "synth", "landcover", str(folder), "--count", "1"]
    report = measure_command([*argv, "--size", f"{side}x{side}", "--seed", "0"], capture_output=True, check=True)
    (folder / "images" / "landcover_000.tif").unlink()  # only the mask is used: free the disk
    return mask, report.wall_s


def mask_counts(mask: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of each class (read band by band) and its 4-connected regions (whole mask, scipy)."""
    from scipy import ndimage

    with gigaseg.open_image(mask) as source:
        pixels = np.zeros(classes, np.int64)
        for top in range(0, source.height, COUNT_ROWS):
            rows = min(COUNT_ROWS, source.height - top)
            band = source.read(gigaseg.Window(top, 0, rows, source.width))[..., 0]
            pixels += np.bincount(band.ravel(), minlength=classes)[:classes]
        whole = source.read()[..., 0]
    regions = np.zeros(classes, np.int64)
    for class_id in range(classes):
        regions[class_id] = ndimage.label(whole == class_id)[1]
    return pixels, regions


def polygon_counts(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Polygons and their ``pixels`` per class, read back with pyogrio (attributes only)."""
    from pyogrio.raw import read

    _, _, _, (ids, pixels) = read(str(path), columns=["class_id", "pixels"], read_geometry=False)
    return np.bincount(ids, minlength=classes)[:classes], np.bincount(ids, weights=pixels, minlength=classes)[:classes]


def run_side(work: Path, side: int, band_rows: int) -> dict:
    mask, synth_s = synth_mask(work, side)
    names = json.loads((mask.parents[1] / "synth.json").read_text())["classes"]
    out = work / f"landcover_{side}.gpkg"
    argv = [sys.executable, "-m", "gigaseg", "vectorize", str(mask), "--out", str(out), "--band-rows", str(band_rows)]
    report = measure_command(argv, capture_output=True)
    run = {
        "side": side,
        "megapixels": side * side / 1e6,
        "mask_bytes": mask.stat().st_size,
        "synth_seconds": synth_s,
        "peak_rss": report.peak_rss,
        "seconds": report.wall_s,
        "returncode": report.returncode,
        "stdout_tail": (report.stdout or "")[-2000:],
        "stderr_tail": (report.stderr or "")[-2000:],
    }
    if report.returncode != 0:
        return run
    polygons, polygon_pixels = polygon_counts(out, len(names))
    pixels, regions = mask_counts(mask, len(names))
    run.update(
        {
            "output_bytes": out.stat().st_size,
            "polygons": int(polygons.sum()),
            "per_class": {
                name: {
                    "polygons": int(polygons[k]),
                    "regions_in_mask": int(regions[k]),
                    "polygon_pixels": int(polygon_pixels[k]),
                    "mask_pixels": int(pixels[k]),
                }
                for k, name in enumerate(names)
            },
            "pixels_match": bool((polygon_pixels == pixels).all()),
            "polygons_match_regions": bool((polygons == regions).all()),
        }
    )
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="2048,6144,20000")
    parser.add_argument("--band-rows", type=int, default=512, help="rows gigaseg vectorize reads at once")
    parser.add_argument("--work", help="scenes and polygons (default: /tmp/gigaseg-vectorize-bench)")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="one 512-px scene, temporary output (a smoke run)")
    parser.add_argument("--note", help="a line for the report on the conditions (e.g. what else ran)")
    args = parser.parse_args(argv)
    if args.smoke:
        scratch = None if args.work and args.results else Path(tempfile.mkdtemp(prefix="gigaseg-vectorize-smoke-"))
        work, results_dir = Path(args.work) if args.work else scratch / "work", args.results or scratch / "results"
        if results_dir.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
        args.sides, args.band_rows = "512", 64
    else:
        work, results_dir = Path(args.work or "/tmp/gigaseg-vectorize-bench"), args.results or RESULTS
    work.mkdir(parents=True, exist_ok=True)
    baseline = measure_command([sys.executable, "-c", IMPORTS], check=True)
    results = {
        "machine": describe_machine(),
        "command": "benchmarks/vectorize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
        "band_rows": args.band_rows,
        "imports_peak_rss": baseline.peak_rss,
        "note": args.note,
        "runs": [],
    }
    for side in (int(s) for s in args.sides.split(",")):
        run = run_side(work, side, args.band_rows)
        results["runs"].append(run)
        print(f"{side}: peak RSS {format_size(run['peak_rss'])} in {run['seconds']:.1f} s", flush=True)
        write(results, results_dir)
    print(f"results in {results_dir}", flush=True)


def write(results: dict, results_dir: Path = RESULTS) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "vectorize.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Polygonising land-cover masks with `gigaseg vectorize`",
        "",
        machine_header(results["machine"]),
        f"OMP_NUM_THREADS={results['threads']}; each `gigaseg vectorize MASK --out landcover_<side>.gpkg "
        f"--band-rows {results['band_rows']}` ran in a fresh child process.",
        "Masks: `gigaseg synth landcover --count 1 --size <side>x<side> --seed 0` (7 classes: water, vegetation "
        "near/far from water, cropland, urban, 2-3 px roads and field tracks, 2-2.6 px streams), tiled zlib "
        "uint8 TIFF, no georeferencing (so pixel coordinates).",
        "",
        "| mask side | megapixels | mask file | peak RSS (whole process) | seconds | polygons | GeoPackage | "
        "pixels per class = mask's | polygons per class = 4-connected regions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        if run["returncode"] != 0:
            lines.append(f"| {run['side']} | {run['megapixels']:.1f} | | failed: exit {run['returncode']} | | | | | |")
            continue
        lines.append(
            f"| {run['side']} | {run['megapixels']:.1f} | {format_size(run['mask_bytes'])} | "
            f"{format_size(run['peak_rss'])} | {run['seconds']:.1f} | {run['polygons']:,} | "
            f"{format_size(run['output_bytes'])} | {run['pixels_match']} | {run['polygons_match_regions']} |"
        )
    if results.get("note"):
        lines += ["", f"Note: {results['note']}"]
    lines += [
        "",
        f"A child that only imports the modules (`{IMPORTS}`) peaks at {format_size(results['imports_peak_rss'])}.",
    ]
    done = [r for r in results["runs"] if r["returncode"] == 0]
    if done:
        largest = done[-1]
        lines += ["", f"Per class at {largest['side']}x{largest['side']}:", ""]
        lines += ["| class | polygons | 4-connected regions in the mask | polygon pixels | mask pixels |"]
        lines += ["|---|---|---|---|---|"]
        for name, row in largest["per_class"].items():
            lines.append(
                f"| {name} | {row['polygons']:,} | {row['regions_in_mask']:,} | {row['polygon_pixels']:,} | "
                f"{row['mask_pixels']:,} |"
            )
        plot(done, results_dir / "vectorize.png")
        lines += ["", "![peak RSS and time against mask size](vectorize.png)"]
    (results_dir / "vectorize.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    megapixels = [r["megapixels"] for r in runs]
    figure, (memory, time) = plt.subplots(1, 2, figsize=(9, 3.4))
    memory.plot(megapixels, [r["peak_rss"] / 1e6 for r in runs], "o-")
    memory.set(xlabel="mask megapixels", ylabel="peak RSS (MB)", title="gigaseg vectorize: memory", ylim=(0, None))
    time.plot(megapixels, [r["seconds"] for r in runs], "o-", color="tab:orange")
    time.set(xlabel="mask megapixels", ylabel="seconds", title="wall time", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
