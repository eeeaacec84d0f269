"""Every benchmark script end to end in its quick mode, and the API the scripts may import.

Each ``benchmarks/*.py`` runs with ``--smoke`` (tiny data and networks, one epoch, its child-process
measurements on tiny work) into a temporary folder, must exit 0 and must leave its results files
there with the keys its report is built from; ``benchmarks/results`` must stay untouched. So a
re-layout of the library cannot break a benchmark silently.

The scripts run two at a time in the background as soon as the first of these tests needs one
(each spends most of its time starting child processes that import torch); each test waits for its
own. A second test reads every script's imports (ast): only the names ``gigaseg`` and
``gigaseg.bench`` export, never a module below them, a private name or an assignment to gigaseg's
objects.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
COMMITTED = BENCHMARKS / "results"
SRC = ROOT / "src" / "gigaseg"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
#: seconds one script's smoke run may take (they take well under a minute each on 2 cores)
TIMEOUT = 900
WORKERS = 2


# --------------------------------------------------------------------------- the runs


@dataclass
class Smoke:
    """One script's smoke run: its arguments in a folder, what it must leave there, a rough CPU cost."""

    args: Callable[[Path], list[str]]
    check: Callable[[Path], None]
    cost: int  # seconds of CPU on 2 cores, to start the longest runs first


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def read_json(path: Path) -> dict:
    assert path.exists(), f"{path.name} was not written"
    return json.loads(path.read_text())


def check_markdown(path: Path, title: str) -> None:
    assert path.exists(), f"{path.name} was not written"
    text = path.read_text()
    assert text.startswith(title) and "Machine: " in text, text[:300]


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def returncodes(value) -> list[int]:
    """Every ``returncode`` in a results tree (a failed child is recorded, not raised, by some scripts)."""
    if isinstance(value, dict):
        return ([value["returncode"]] if "returncode" in value else []) + [
            code for item in value.values() for code in returncodes(item)
        ]
    if isinstance(value, list):
        return [code for item in value for code in returncodes(item)]
    return []


def check_comparison(results: Path, stem: str, rows: list[str]) -> None:
    data = read_json(results / f"{stem}.json")
    assert {"machine", "methods", "class_groups", "encoder"} <= set(data)
    assert [m["name"] for m in data["methods"]] == rows
    for row in data["methods"]:
        assert 0.0 <= row["miou"] <= 1.0 and row["train_peak_rss"] > 0 and row["predict_peak_rss"] > 0
    check_markdown(results / f"{stem}.md", "# Methods compared")
    check_png(results / f"{stem}.png")


def check_compare_fine_structure(folder: Path) -> None:
    check_comparison(folder / "results", "compare_fine_structure", ["glnet"])


def check_thin_structures(folder: Path) -> None:
    check_comparison(folder / "results", "thin_structures", ["patch_s1", "global", "patch_s4"])
    rows = read_json(folder / "results" / "thin_structures.json")["methods"]
    for row in rows:
        assert set(row["per_class_f1"]) == {"background", "vessel"} and row["boundary_f1"] is not None
    assert rows[0]["spec"]["options"]["output_stride"] == 1 and rows[2]["spec"]["options"]["output_stride"] == 4
    assert "Per-class F1" in (folder / "results" / "thin_structures.md").read_text()


def check_compare_methods(folder: Path) -> None:
    check_comparison(folder / "results", "compare_methods", ["magnet", "magnet (fast)"])
    trained = read_json(folder / "results" / "compare_methods.json")["methods"][0]
    assert trained["spec"]["options"]["points"] == 0.5  # --set points=0.5, read as a number
    assert trained["epoch_spread"]["epochs"] == 1 and set(trained["epoch_spread"]) >= {"miou", "fine", "context"}


def check_detection(folder: Path) -> None:
    data = read_json(folder / "results" / "detection.json")
    names = ["patchgd_detector (grid)", "patchgd_detector (paper)", "fcos (downsampled)", "fcos (sliced)"]
    assert [m["name"] for m in data["methods"]] == names
    for row in data["methods"]:
        assert row["task"] == "detection" and 0.0 <= row["AP"] <= 1.0 and 0.0 <= row["AP75"] <= 1.0, row
        assert row["train_peak_rss"] > 0 and row["predict_peak_rss"] > 0
    large = data["large_prediction"]
    assert large["returncode"] == 0 and large["side"] == 512 and large["peak_rss"] > 0, large
    assert large["detections"] is not None
    text = (folder / "results" / "detection.md").read_text()
    assert text.startswith("# Methods compared") and "Prediction of a 512x512 scene" in text
    check_png(folder / "results" / "detection.png")


def check_glnet_global_view(folder: Path) -> None:
    data = read_json(folder / "results" / "glnet_global_view.json")
    assert set(data["scores"]) == {"glnet", "glnet, tile policy", "patch"}
    for scores in data["scores"].values():
        assert set(scores) == {"small", "large"} and scores["large"]["peak_rss"] > 0
    assert {"policy_cost_miou", "tile_policy_cost_miou", "size_g", "machine"} <= set(data)
    check_markdown(folder / "results" / "glnet_global_view.md", "# GLNet's global view")


def check_glnet_memory(folder: Path) -> None:
    data = read_json(folder / "results" / "glnet_memory.json")
    assert data["torch_import_rss"] > 0 and data["gigaseg_import_rss"] > 0
    for part in ("predict2", "predict3"):
        log = data[part]["log"]
        assert log[0]["what"] == "prepare" and any(e["what"].startswith("block") for e in log), log
        assert data[part]["peak_rss"] > 0 and data[part]["blocks"] > 1
    train = data["train2"]
    assert train["peak_rss"] > 0 and len(train["log"]) == 2  # batches of 2 and 1 images
    assert all(e["patches_run"] < e["patches_loaded"] for e in train["log"])  # the step was truncated
    check_markdown(folder / "results" / "glnet_memory.md", "# GLNet memory")


def check_icnet_speed(folder: Path) -> None:
    data = read_json(folder / "results" / "icnet_speed.json")
    assert set(data["cpu_speed"]["median_s"]) >= {"icnet", "icnet_folded", "icnet_folded_channels_last", "pspnet"}
    assert data["cpu_speed"]["input"] == [1, 3, 64, 128]
    assert data["memory"]["icnet"]["peak_rss"] > 0 and data["memory"]["pspnet"]["peak_rss"] > 0
    assert {"claims", "gpu", "machine"} <= set(data)
    check_markdown(folder / "results" / "icnet_speed.md", "# ICNet versus PSPNet-50 at 64x128")


def check_magnet_inference(folder: Path) -> None:
    data = read_json(folder / "results" / "magnet_inference.json")
    speed, accuracy = data["speed"], data["accuracy"]
    assert {r["mode"] for r in speed["runs"]} == {"whole", "blocks"}
    assert all(r["peak_rss"] > 0 and r["frames"] > 0 for r in speed["runs"])
    assert speed["model_only"]["peak_rss"] > 0 and speed["alternate"]["magnet"] and speed["alternate"]["fast"]
    assert set(accuracy["variants"]) == {"backbone_coarsest_scale", "magnet", "magnet_fast"}
    assert {"max_peak_rss", "fast_miou_cost"} <= set(data["summary"])
    check_markdown(folder / "results" / "magnet_inference.md", "# MagNet / MagNet-Fast")


def check_patchgd(folder: Path) -> None:
    data = read_json(folder / "results" / "patchgd.json")
    assert {"memory", "ultramnist_128", "landcover_128", "torch_baseline_rss"} <= set(data)
    codes = returncodes({k: data[k] for k in ("memory", "ultramnist_128", "landcover_128")})
    assert codes and set(codes) == {0}, "a training or evaluation child failed: see the JSON's stderr_tail"
    assert data["memory"]["patchgd"]["scores"] and data["memory"]["downsampled_largest_fitting_input"]
    assert "scores" in data["ultramnist_128"]["patchgd_global"]
    assert "scores" in data["landcover_128"]["patchgd_no_global"] and data["landcover_128"]["downsampled"]
    check_markdown(folder / "results" / "patchgd.md", "# PatchGD with a global patch")


def check_patchgd_frozen_probe(folder: Path) -> None:
    data = read_json(folder / "results" / "patchgd_frozen_probe.json")
    assert set(data["patch_sizes"]) == {"64", "32"}
    for part in data["patch_sizes"].values():
        for view in ("grid", "grid+global", "global", "downsampled"):
            assert set(part[view]) == {"large", "small", "label"}
    check_markdown(folder / "results" / "patchgd_frozen_probe.md", "# What a frozen theta1 carries")


def check_peer_sliding_window(folder: Path) -> None:
    data = read_json(folder / "results" / "peer_sliding_window.json")
    small = data["summary"]["384"]
    assert set(small) == set(data["variants"])  # every variant ran at the smallest size
    for row in small.values():
        assert row["mpx_per_s"] > 0 and row["peak_rss"] > 0 and 0.99 <= row["agreement_with_monai"] <= 1.0
    # the largest size: every variant but those shown at the smallest size only
    assert set(data["summary"]["512"]) == {"monai", "gigaseg", "gigaseg_fast", "gigaseg_fast_bf16"}
    check_markdown(folder / "results" / "peer_sliding_window.md", "# gigaseg against MONAI")
    check_png(folder / "results" / "peer_sliding_window.png")


def check_gpu_suite(folder: Path) -> None:
    data = read_json(folder / "results" / "gpu_suite.json")
    assert data["dry_run"] is True and data["device"].startswith("CPU")
    for name in ("icnet", "glnet", "magnet", "patch_vs_monai"):
        assert "error" not in data[name], data[name].get("traceback")
    assert set(data["icnet"]["precisions"]) == {"fp32", "bf16"} and data["icnet"]["folded_batchnorms"] > 0
    assert data["glnet"]["seconds"] > 0 and data["magnet"]["max_memory_allocated"] is None  # no CUDA here
    variants = data["patch_vs_monai"]["variants"]
    assert set(variants) == {"monai", "gigaseg", "gigaseg_fast", "gigaseg_fast_bf16"}
    assert variants["gigaseg_fast"]["agreement_with_monai"] >= 0.99
    check_markdown(folder / "results" / "gpu_suite.md", "# GPU suite (dry run")


def check_predict_memory(folder: Path) -> None:
    data = read_json(folder / "results" / "predict_memory.json")
    assert [r["side"] for r in data["runs"]] == [1024] and data["runs"][0]["peak_rss"] > 0
    assert set(returncodes(data)) == {0}
    assert data["kill_and_resume"]["identical_to_uninterrupted"] is True
    check_markdown(folder / "results" / "predict_memory.md", "# Peak memory of `gigaseg predict`")


def check_pretrain_digits(folder: Path) -> None:
    data = read_json(folder / "results" / "digits.json")
    assert data["steps"] == 3 and {"val_accuracy", "val_fonts_accuracy", "generator_font_accuracy"} <= set(data)
    assert (folder / "results" / "digits.pth").stat().st_size > 0


def check_synth_streaming(folder: Path) -> None:
    data = read_json(folder / "results" / "synth_streaming.json")
    assert {"generate", "checks", "read", "baselines", "machine"} <= set(data)
    assert data["generate"]["peak_rss_bytes"] > 0 and data["read"]["window"]["shape"][:2] == [512, 512]
    check_markdown(folder / "results" / "synth_streaming.md", "# Synthetic land-cover scene")


def work_and_results(folder: Path) -> list[str]:
    return ["--work", str(folder / "work"), "--results", str(folder / "results")]


def check_pillow_decode(folder: Path) -> None:
    data = read_json(folder / "results" / "pillow_decode.json")
    assert {"machine", "runs", "fit", "baseline_rss"} <= set(data)
    assert set(returncodes(data["runs"])) == {0} and all(r["peak_rss"] > 0 for r in data["runs"])
    assert set(data["fit"]["formats"]) == {"PNG", "JPEG", "JPEG (progressive)"}
    check_markdown(folder / "results" / "pillow_decode.md", "# Peak memory of decoding PNG and JPEG")
    check_png(folder / "results" / "pillow_decode.png")


def check_distributed(folder: Path) -> None:
    data = read_json(folder / "results" / "distributed.json")
    assert {"machine", "workloads", "dask_round_trip", "budget"} <= set(data)
    assert len(data["workloads"]) == 2
    for rows in data["workloads"].values():
        assert {"single, tiff", "single, tiff+ome-zarr", "local:1", "local:2"} <= set(rows)
        assert set(returncodes(rows)) == {0}, "a gigaseg predict child failed: see the JSON's stderr_tail"
        assert len(rows["local:1"]["worker_peak_rss"]) == 1 and len(rows["local:2"]["worker_peak_rss"]) == 2
        assert all(peak > 0 for peak in rows["local:2"]["worker_peak_rss"])
        assert rows["local:2"]["units"] >= 1 and 0 < rows["local:2"]["busy_share"] <= 1
        assert "overhead_per_unit_s" in rows["local:1"] and "overhead_per_unit_s" in rows["local:2"]
    assert data["dask_round_trip"]["sequential_s"] > 0
    check_markdown(folder / "results" / "distributed.md", "# Distributed prediction on one machine")
    check_png(folder / "results" / "distributed.png")


def check_vectorize(folder: Path) -> None:
    data = read_json(folder / "results" / "vectorize.json")
    assert {"machine", "runs", "imports_peak_rss", "band_rows"} <= set(data)
    (run,) = data["runs"]
    assert run["side"] == 512 and run["returncode"] == 0 and run["peak_rss"] > 0 and run["polygons"] > 0
    assert run["pixels_match"] is True and run["polygons_match_regions"] is True
    assert sum(row["mask_pixels"] for row in run["per_class"].values()) == 512 * 512
    check_markdown(folder / "results" / "vectorize.md", "# Polygonising land-cover masks")
    check_png(folder / "results" / "vectorize.png")


SMOKES = {
    "compare_fine_structure": Smoke(work_and_results, check_compare_fine_structure, 20),
    "detection": Smoke(work_and_results, check_detection, 120),
    "distributed": Smoke(work_and_results, check_distributed, 100),
    "compare_methods": Smoke(
        lambda f: ["--data", str(f / "data"), "--set", "points=0.5", *work_and_results(f)], check_compare_methods, 25
    ),
    "glnet_global_view": Smoke(work_and_results, check_glnet_global_view, 50),
    "glnet_memory": Smoke(work_and_results, check_glnet_memory, 30),
    "gpu_suite": Smoke(lambda f: ["--results", str(f / "results")], check_gpu_suite, 10),
    "icnet_speed": Smoke(lambda f: ["--out", str(f / "results"), "--threads", "1"], check_icnet_speed, 20),
    "magnet_inference": Smoke(work_and_results, check_magnet_inference, 35),
    "patchgd": Smoke(work_and_results, check_patchgd, 75),
    "patchgd_frozen_probe": Smoke(work_and_results, check_patchgd_frozen_probe, 7),
    "peer_sliding_window": Smoke(work_and_results, check_peer_sliding_window, 50),
    "pillow_decode": Smoke(lambda f: ["--out", str(f / "results")], check_pillow_decode, 8),
    "predict_memory": Smoke(work_and_results, check_predict_memory, 25),
    "pretrain_digits": Smoke(lambda f: [str(f / "results" / "digits.pth")], check_pretrain_digits, 8),
    "synth_streaming": Smoke(work_and_results, check_synth_streaming, 7),
    "thin_structures": Smoke(work_and_results, check_thin_structures, 25),
    "vectorize": Smoke(work_and_results, check_vectorize, 8),
}


def run_smoke(script: str, folder: Path) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", *SMOKES[script].args(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return Outcome(-1, str(exc.stdout or ""), f"timed out after {TIMEOUT} s", time.perf_counter() - start)
    return Outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """The selected scripts' smoke runs, started at once, ``WORKERS`` at a time, longest first."""
    wanted = [
        item.callspec.params["script"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "script" in item.callspec.params
    ]
    root = tmp_path_factory.mktemp("benchmarks")
    before = snapshot(COMMITTED)
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures: dict[str, Future] = {}
    for script in sorted(set(wanted), key=lambda s: -SMOKES[s].cost if s in SMOKES else 0):
        if script in SMOKES:
            futures[script] = pool.submit(run_smoke, script, root / script)
    yield {"root": root, "futures": futures, "committed": before}
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_benchmark_script_has_a_smoke_run():
    assert set(SMOKES) == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_run(script, smoke_runs):
    if script not in SMOKES:
        pytest.fail(f"benchmarks/{script}.py has no entry in SMOKES")
    outcome = smoke_runs["futures"][script].result()
    tail = f"\n--- stdout ---\n{outcome.stdout[-3000:]}\n--- stderr ---\n{outcome.stderr[-5000:]}"
    assert outcome.returncode == 0, f"{script} --smoke exited {outcome.returncode} after {outcome.seconds:.0f} s{tail}"
    SMOKES[script].check(smoke_runs["root"] / script)
    assert snapshot(COMMITTED) == smoke_runs["committed"], "a smoke run changed benchmarks/results"


# --------------------------------------------------------------------------- the imports


def exported(init: Path) -> set[str]:
    """The keys of ``_EXPORTS`` in a package's ``__init__.py`` (read with ast, nothing imported)."""
    for node in ast.parse(init.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return {key.value for key in node.value.keys}
    raise AssertionError(f"{init}: no _EXPORTS")


TOP_LEVEL = exported(SRC / "__init__.py") | {"__version__", "bench"}
BENCH = exported(SRC / "bench" / "__init__.py")


def test_the_exports_read_here_are_the_packages_own():
    import gigaseg
    import gigaseg.bench

    assert set(gigaseg.__all__) | {"bench"} == TOP_LEVEL
    assert set(gigaseg.bench.__all__) == BENCH
    for name in gigaseg.bench.__all__:  # every name resolves (imports the modules behind them)
        assert getattr(gigaseg.bench, name) is not None, name


def api_problems(path: Path) -> list[str]:
    """Imports of ``path`` that reach past the public API, and assignments to gigaseg's objects."""
    problems: list[str] = []
    bound: dict[str, str] = {}  # local name -> "gigaseg", "gigaseg.bench" or an exported object

    def wrong(node, text):
        problems.append(f"{path.name}:{node.lineno}: {text}")

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "gigaseg" or alias.name.startswith("gigaseg."):
                    if alias.name not in ("gigaseg", "gigaseg.bench"):
                        wrong(node, f"import {alias.name} (only gigaseg and gigaseg.bench)")
                    bound[alias.asname or "gigaseg"] = alias.name if alias.asname else "gigaseg"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gigaseg":
            allowed = {"gigaseg": TOP_LEVEL, "gigaseg.bench": BENCH}.get(node.module)
            for alias in node.names:
                if allowed is None:
                    wrong(node, f"from {node.module} import {alias.name} (only from gigaseg or gigaseg.bench)")
                elif alias.name.startswith("_") or alias.name not in allowed:
                    wrong(node, f"from {node.module} import {alias.name}: not an exported name")
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = bound.get(node.value.id)
            if module == "gigaseg" and node.attr not in TOP_LEVEL:
                wrong(node, f"gigaseg.{node.attr}: not an exported name")
            elif module == "gigaseg.bench" and node.attr not in BENCH:
                wrong(node, f"gigaseg.bench.{node.attr}: not an exported name")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            inner = node.value
            if isinstance(inner.value, ast.Name) and bound.get(inner.value.id) == "gigaseg" and inner.attr == "bench":
                if node.attr not in BENCH:
                    wrong(node, f"gigaseg.bench.{node.attr}: not an exported name")
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = [ast.Attribute(value=node.args[0], attr="?", ctx=ast.Store())] if node.args else []
        for target in targets:
            root = target
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if root is not target and isinstance(root, ast.Name) and root.id in bound:
                wrong(node, f"assigns to {bound[root.id]}'s attributes (monkeypatching gigaseg)")
    return problems


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmarks_use_only_the_public_api(script):
    assert api_problems(BENCHMARKS / f"{script}.py") == []


def test_the_import_check_catches_internals(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import gigaseg\n"
        "import gigaseg.methods.glnet.model as glnet\n"
        "from gigaseg.bench.memory import measure\n"
        "from gigaseg import _EXPORTS, create_model\n"
        "from gigaseg.bench import _child, measure_call\n"
        "glnet.GLNet.whole_image_predictor = None\n"
        "create_model.x = 1\n"
        "gigaseg.api.train\n"
        "gigaseg.bench.memory\n"
    )
    found = api_problems(bad)
    assert len(found) == 8, found
    good = tmp_path / "good.py"
    good.write_text(
        "import gigaseg\nimport gigaseg.bench as bench\nfrom gigaseg import build_predictor\n"
        "from gigaseg.bench import measure\nmodel = gigaseg.create_model\nmeasure(bench.write_results)\n"
        "predictor = build_predictor(model)\npredictor.keep_trace = True\n"
    )
    assert api_problems(good) == []
