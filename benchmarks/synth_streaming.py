"""Streaming benchmark of the synthetic land-cover generator and of reading its output.

Measures, each in a fresh child process (``gigaseg.bench.measure_command``, peak
RSS of exactly that process):

1. ``gigaseg synth landcover big --count 1 --size 20000x20000``: peak RSS (bound 1.5 GB),
   wall time, file sizes;
2. the self-checks read back band by band from the written mask (figures and peak RSS);
3. ``gigaseg.open_image`` on the written image: one 1024x1024 window and a 1024-px
   thumbnail (bound 1 GB);
4. baselines: a child that only imports the generator's modules (through the public names
   that reach them: ``gigaseg.bench.write_landcover_dataset``, ``check_mask``,
   ``write_tiled_tiff`` and ``gigaseg.open_image``), and one that only imports torch (the
   benchmarks design asks for it; the generator itself never imports torch).

Writes ``benchmarks/results/synth_streaming.json`` and ``.md`` with the machine (CPU
model, cores) and the git commit. The scene (about 1.4 GB) is written to a temporary
folder that is removed afterwards unless ``--keep``.

    python benchmarks/synth_streaming.py [--size 20000x20000] [--work DIR] [--keep]

``--smoke`` runs the same steps on a 512x512 scene in seconds, writing only to ``--work`` and
``--results`` (default: temporary folders).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GENERATE_LIMIT = 1.5e9
READ_LIMIT = 1.0e9
#: side of the window read from the scene's centre (smaller scenes: their side)
READ_SIDE = 1024
#: what the imports baseline imports: the generator's and the readers' modules, by their public names
IMPORTS = (
    "import gigaseg, gigaseg.bench as bench; "
    "bench.write_landcover_dataset; bench.check_mask; bench.write_tiled_tiff; gigaseg.open_image"
)


# --------------------------------------------------------------------------- children


def child_check(mask: str) -> dict:
    from gigaseg.bench import check_mask

    start = time.perf_counter()
    report = check_mask(mask)
    return {"seconds": time.perf_counter() - start, **report.as_dict()}


def child_read(image: str) -> dict:
    import gigaseg

    out = {}
    start = time.perf_counter()
    source = gigaseg.open_image(image)
    out["open_s"] = time.perf_counter() - start
    out["shape"] = list(source.shape)
    out["levels"] = [list(level) for level in getattr(source, "levels", [])]
    side = min(READ_SIDE, source.height, source.width)
    top, left = (source.height - side) // 2, (source.width - side) // 2
    start = time.perf_counter()
    window = source.read(gigaseg.Window(top, left, side, side))
    out["window_s"] = time.perf_counter() - start
    out["window"] = {"top": top, "left": left, "shape": list(window.shape), "mean": float(window.mean())}
    start = time.perf_counter()
    thumb = source.thumbnail(1024)
    out["thumbnail_s"] = time.perf_counter() - start
    out["thumbnail"] = {"shape": list(thumb.shape), "mean": float(thumb.mean())}
    source.close()
    return out


CHILDREN = {"check": child_check, "read": child_read}


# --------------------------------------------------------------------------- context


def machine() -> dict:
    """``gigaseg.bench.describe_machine()`` plus the versions of the libraries the streaming code uses."""
    import numpy
    import scipy
    import tifffile

    from gigaseg.bench import describe_machine

    return {
        **describe_machine(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "tifffile": tifffile.__version__,
    }


def _last_json(text: str | None) -> dict:
    lines = [line for line in (text or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:,.0f} MB"


# --------------------------------------------------------------------------- main


def run(size: str, work: Path, keep: bool) -> dict:
    from gigaseg.bench import baseline_rss, measure_command

    python = sys.executable
    out = work / "big"
    command = [python, "-m", "gigaseg", "synth", "landcover", str(out), "--count", "1", "--size", size, "--seed", "0"]
    print("generating:", " ".join(command[2:]), flush=True)
    generate = measure_command(command, capture_output=True)
    if generate.returncode != 0:
        raise SystemExit(f"generation failed ({generate.returncode}):\n{generate.stderr}")
    image, mask = out / "images" / "landcover_000.tif", out / "masks" / "landcover_000.tif"
    print(generate, flush=True)

    check = measure_command([python, __file__, "--child", "check", str(mask)], capture_output=True)
    print(check, flush=True)
    read = measure_command([python, __file__, "--child", "read", str(image)], capture_output=True)
    print(read, flush=True)
    imports = measure_command([python, "-c", IMPORTS])
    torch_only = baseline_rss(True)

    manifest = json.loads((out / "synth.json").read_text())
    result = {
        "benchmark": "synth_streaming",
        "machine": machine(),  # with the commit, the command line and the date
        "generate": {
            "command": " ".join(["gigaseg", *command[3:5], "big", *command[6:]]),
            "work_dir": str(work),
            "peak_rss_bytes": generate.peak_rss,
            "wall_s": generate.wall_s,
            "limit_bytes": GENERATE_LIMIT,
            "within_limit": generate.peak_rss < GENERATE_LIMIT,
            "files": {
                "image_bytes": image.stat().st_size,
                "mask_bytes": mask.stat().st_size,
            },
            "scene": manifest["scenes"][0],
        },
        "checks": {
            "peak_rss_bytes": check.peak_rss,
            "wall_s": check.wall_s,
            **_last_json(check.stdout),
        },
        "read": {
            "peak_rss_bytes": read.peak_rss,
            "wall_s": read.wall_s,
            "limit_bytes": READ_LIMIT,
            "within_limit": read.peak_rss < READ_LIMIT,
            **_last_json(read.stdout),
        },
        "baselines": {
            "imports_only_peak_rss_bytes": imports.peak_rss,
            "torch_import_only_peak_rss_bytes": torch_only,
        },
        "notes": [
            "Peak RSS is ru_maxrss of the measured child alone (gigaseg.bench.measure_command).",
            "The generator and the readers never import torch; the torch baseline is for comparison with "
            "the other benchmarks only.",
        ],
    }
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def markdown(result: dict) -> str:
    from gigaseg.bench import machine_header

    m, g, c, r, b = (result[k] for k in ("machine", "generate", "checks", "read", "baselines"))
    size = "x".join(str(v) for v in c.get("size", [])) or "?"
    fine, context = c.get("fine_iou", {}), c.get("context", {}).get(c.get("context_class", ""), {})
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Synthetic land-cover scene: streaming generation and reading",
        "",
        machine_header(m),
        f"{m['usable_cores']} usable of {m['cores']} logical cores, {_mb(m['memory_bytes'])} RAM; "
        f"Python {m['python']}, numpy {m['numpy']}, tifffile {m['tifffile']}. Each row ran in a fresh child process.",
        "",
        "| step | peak RSS | bound | wall time |",
        "|---|---|---|---|",
        f"| `{g['command']}` | {_mb(g['peak_rss_bytes'])} | < {_mb(g['limit_bytes'])} "
        f"{'ok' if g['within_limit'] else 'EXCEEDED'} | {g['wall_s']:.0f} s |",
        f"| self-checks, mask read back band by band | {_mb(c['peak_rss_bytes'])} | | {c['wall_s']:.0f} s |",
        f"| `open_image`: 1024x1024 window + 1024-px thumbnail | {_mb(r['peak_rss_bytes'])} | "
        f"< {_mb(r['limit_bytes'])} "
        f"{'ok' if r['within_limit'] else 'EXCEEDED'} | {r['wall_s']:.1f} s "
        f"(window {r.get('window_s', float('nan')):.2f} s, thumbnail {r.get('thumbnail_s', float('nan')):.2f} s) |",
        f"| baseline: import the generator's modules only | {_mb(b['imports_only_peak_rss_bytes'])} | | |",
        f"| baseline: import torch only | {_mb(b['torch_import_only_peak_rss_bytes'])} | | |",
        "",
        f"Files ({size}): image {_mb(g['files']['image_bytes'])} (RGB uint8, tiled zlib BigTIFF with a 2x pyramid), "
        f"mask {_mb(g['files']['mask_bytes'])}.",
        "",
        f"Self-checks of the scene: fine-structure IoU after 4x nearest down/up {fmt(fine.get('all'))} "
        f"(road {fmt(fine.get('road'))}, stream {fmt(fine.get('stream'))}; bound <= 0.5); "
        f"{fmt(context.get('fraction'))} of the {c.get('context_class')} pixels lie only in water-free "
        f"508-px GLNet patches ({fmt(context.get('fraction_any'))} in at least one; bound >= 0.3).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", help="scene size, HxW (default 20000x20000; --smoke 512x512)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the scene (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated scene")
    parser.add_argument("--results", type=Path, help="where the results go (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="a small scene, temporary output (a smoke run)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.path)), flush=True)
        return 0
    if args.smoke:
        args.size = args.size or "512x512"
        args.results = args.results or Path(tempfile.mkdtemp(prefix="gigaseg-synth-smoke-results-"))
        if args.results.resolve() == RESULTS.resolve():
            parser.error("--smoke never writes to benchmarks/results")
    args.size, args.results = args.size or "20000x20000", args.results or RESULTS
    work = args.work or Path(tempfile.mkdtemp(prefix="gigaseg-synth-bench-"))
    try:
        result = run(args.size, work, args.keep)
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "synth_streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "synth_streaming.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results in {args.results}", flush=True)
    return 0 if result["generate"]["within_limit"] and result["read"]["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
