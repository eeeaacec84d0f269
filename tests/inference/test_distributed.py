"""Prediction on a Dask LocalCluster of 2 worker processes (gigaseg.inference.distributed).

Every distributed mask is compared bit for bit with the single-process prediction of the same
image (both with one torch thread per process: thread counts change the last bits of a float sum).
Faults are real: a worker process is SIGKILLed while it predicts a row of blocks, and a
``gigaseg predict --scheduler ADDRESS`` child (the client) is SIGKILLed while the workers predict
for it, and the prediction is run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

import gigaseg
from gigaseg.errors import ConfigError, ImageReadError
from gigaseg.inference.distributed import CollectionResult, local_cluster
from gigaseg.inference.stream import PredictionResult
from gigaseg.io.normalize import Normalization

#: 1024-px blocks (block_size_for(1.5 GB)): a 4096-row image is 4 rows of blocks, each 2 bands of 512 rows
BUDGET = "1.5GB"


def scene(height, width, seed=0):
    """A random RGB image of 32-px cells with a little noise (so that predictions vary across it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 180, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    big = small.repeat(32, axis=0).repeat(32, axis=1)[:height, :width]
    return big + rng.integers(0, 64, (height, width, 1), dtype=np.uint8)


def write_scene(path, height, width, seed=0):
    tifffile.imwrite(path, scene(height, width, seed), photometric="rgb", tile=(256, 256))
    return path


def store_labels(path):
    return zarr.open_array(str(Path(path) / "0"), mode="r")[:]


def done_bands(out, stem="scene"):
    folder = Path(out) / f".{stem}.ome.zarr.partial" / ".gigaseg" / "done"
    return sorted(int(name) for name in os.listdir(folder)) if folder.is_dir() else []


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes, one torch thread each, as ``--cluster local:2`` makes it."""
    from distributed import Client

    environment = dict(os.environ)  # Dask's nannies set MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS... in this process
    try:
        with (
            local_cluster(2, threads=1, dashboard=False, preload=("gigaseg.api", "gigaseg.methods", "zarr")) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:  # the later tests' children (tests/inference/test_heap.py's glibc probe) get the environment they had
        os.environ.clear()
        os.environ.update(environment)


@pytest.fixture(scope="module")
def global_checkpoint(sharpened_checkpoint):
    """The downsampled global baseline: its context (the thumbnail's probabilities) is computed once and shared."""
    return sharpened_checkpoint("global", "global", input_size=128)


@pytest.fixture(scope="module")
def tall(tmp_path_factory, tiny_checkpoint):
    """A 4096x512 scene for the patch model, and its single-process mask (4 rows of 1024-px blocks)."""
    folder = tmp_path_factory.mktemp("tall")
    image = write_scene(folder / "scene.tif", 4096, 512, seed=5)
    reference = gigaseg.predict(tiny_checkpoint, image, folder / "single", max_memory=BUDGET, progress=False)
    return image, tifffile.imread(reference.mask_path)


def test_a_4096_px_image_on_two_workers_is_the_single_process_mask(client, global_checkpoint, tmp_path):
    image = write_scene(tmp_path / "scene.tif", 4096, 4096, seed=1)
    single = gigaseg.predict(global_checkpoint, image, tmp_path / "single", progress=False)
    result = gigaseg.predict(
        global_checkpoint, image, tmp_path / "dist", client=client, format="tiff,ome-zarr", progress=False
    )
    assert isinstance(result, PredictionResult) and result.blocks_predicted == 4  # 2 rows of 2048-px blocks
    assert result.mask_path.read_bytes() == single.mask_path.read_bytes()
    mask = tifffile.imread(single.mask_path)
    assert set(np.unique(mask)) == {0, 1, 2}
    np.testing.assert_array_equal(store_labels(result.ome_zarr_path), mask)
    assert sorted(os.listdir(tmp_path / "dist")) == ["scene.ome.zarr", "scene.tif"]


def test_a_folder_on_two_workers_is_the_single_process_masks_and_a_bad_image_fails_alone(
    client, tiny_checkpoint, tmp_path
):
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(600, 500), (1100, 300), (512, 512), (300, 900), (700, 650)]
    images = [write_scene(folder / f"img{i}.tif", h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    broken = folder / "img2b.tif"
    broken.write_text("not an image\n")
    outcome = gigaseg.predict(
        tiny_checkpoint, folder, tmp_path / "dist", client=client, format="tiff,ome-zarr", progress=False
    )
    assert isinstance(outcome, CollectionResult)
    assert list(outcome.failures) == [str(broken)]
    error = outcome.failures[str(broken)]
    assert isinstance(error, ImageReadError) and "img2b.tif: not a TIFF file" in str(error)
    assert list(outcome.results) == [str(p) for p in images]
    classes = set()
    for image in images:
        single = gigaseg.predict(tiny_checkpoint, image, tmp_path / "single", progress=False)
        result = outcome.results[str(image)]
        assert result.mask_path.read_bytes() == single.mask_path.read_bytes(), image.name
        mask = tifffile.imread(single.mask_path)
        np.testing.assert_array_equal(store_labels(result.ome_zarr_path), mask)
        classes |= set(np.unique(mask).tolist())
    assert classes == {0, 1, 2}
    names = sorted(f"img{i}{suffix}" for i in range(5) for suffix in (".tif", ".ome.zarr"))
    assert sorted(os.listdir(tmp_path / "dist")) == names  # no lock, scratch or partial store left


def test_a_worker_killed_mid_unit_is_replaced_and_the_mask_is_identical(client, tiny_checkpoint, tall, tmp_path):
    image, reference = tall
    pids = client.run(os.getpid)
    results, errors = [], []

    def executing_unit(dask_worker):  # on a worker (sent by value): is it predicting a row of blocks now?
        return any(str(task.key).startswith("predict_unit") for task in dask_worker.state.executing)

    def run():
        try:
            results.append(
                gigaseg.predict(
                    tiny_checkpoint, image, tmp_path / "out", client=client, max_memory=BUDGET, progress=False
                )
            )
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        busy = [address for address, executing in client.run(executing_unit).items() if executing]
        victim = busy[0] if busy else None
        time.sleep(0.02)
    assert victim is not None, "no worker was seen predicting a row of blocks"
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(180)
    assert not thread.is_alive() and not errors, errors
    np.testing.assert_array_equal(tifffile.imread(results[0].mask_path), reference)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the nanny starts a new worker in place of the killed one
        workers = client.run(os.getpid)
        if len(workers) == 2 and pids[victim] not in workers.values():
            break
        time.sleep(0.1)
    assert len(workers) == 2 and victim not in workers and pids[victim] not in workers.values()


def test_a_rerun_after_the_client_is_killed_resumes_without_recomputing_finished_chunks(
    client, tiny_checkpoint, tall, tmp_path
):
    image, reference = tall
    out = tmp_path / "out"
    address = client.scheduler.address
    argv = [sys.executable, "-m", "gigaseg", "predict", str(image), "--checkpoint", str(tiny_checkpoint)]
    argv += ["--out", str(out), "--format", "ome-zarr", "--max-memory", BUDGET, "--scheduler", address]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(done_bands(out)) < 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.kill()  # the client only: the workers finish the rows they are predicting, for nobody
    finally:
        _, stderr = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        client.run(lambda dask_worker: bool(dask_worker.state.executing)).values()
    ):
        time.sleep(0.05)
    done = done_bands(out)
    assert 2 <= len(done) < 8, f"killed too late or too early: bands {done} of 8 were done"
    assert not (out / "scene.ome.zarr").exists()
    partial = out / ".scene.ome.zarr.partial"
    chunks = {
        p.relative_to(partial): p.stat() for top in done for p in (partial / "0" / "c" / str(top // 512)).iterdir()
    }
    assert chunks, "the finished bands left no chunk files"
    rows_done = sum(1 for row in range(4) if {1024 * row, 1024 * row + 512} <= set(done))

    outcome = gigaseg.predict(
        tiny_checkpoint, [image], out, client=client, format="ome-zarr", max_memory=BUDGET, progress=False
    )
    assert outcome.ok and (outcome.units_resumed, outcome.units) == (rows_done, 4 - rows_done)
    result = outcome.results[str(image)]
    assert (result.blocks_resumed, result.blocks_predicted) == (rows_done, 4 - rows_done)
    final = out / "scene.ome.zarr"
    for name, before in chunks.items():  # a finished band's chunk files are the very files the killed run wrote
        after = (final / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    np.testing.assert_array_equal(store_labels(final), reference)
    assert sorted(os.listdir(out)) == ["scene.ome.zarr"]


def _glnet(stage):
    model = gigaseg.create_model(
        "glnet", encoder="test_resnet", num_classes=3, size_g=64, size_p=128, min_overlap=16, fpn_channels=16
    )
    model.set_stage(stage)
    return model


METHODS = {
    "patch": lambda: gigaseg.create_model("patch", encoder="test_resnet", num_classes=3, patch_size=64, overlap=16),
    "global": lambda: gigaseg.create_model("global", encoder="test_resnet", num_classes=3, input_size=64),
    "glnet-1": lambda: _glnet(1),
    "glnet-2": lambda: _glnet(2),
    "glnet-3": lambda: _glnet(3),
    "magnet": lambda: gigaseg.create_model(
        "magnet",
        encoder="test_resnet",
        num_classes=3,
        scales=[[24, 24], [48, 48], [96, 96]],
        input_size=[32, 32],
        median_kernel=3,
    ),
    "icnet": lambda: gigaseg.create_model("icnet", encoder="test_resnet", num_classes=3, width=0.25),
    "patchgd": lambda: gigaseg.create_model("patchgd_segmenter", encoder="test_resnet", num_classes=3, patch_size=32),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_context_survives_the_trip_to_another_worker(method):
    """What Dask does to a context made on one worker: pickle it; rows predicted from the copy, in any order, match."""
    import pickle

    from gigaseg.inference.stream import block_grid, predict_band

    torch.manual_seed(0)
    predictor = gigaseg.build_predictor(METHODS[method]().eval(), Normalization.for_image(3, np.uint8))
    source = gigaseg.open_image(scene(1100, 300, seed=3))
    context = predictor.prepare(source)
    copy = pickle.loads(pickle.dumps((context, predictor.sub_batch)))[0]
    rows = block_grid(source.height, source.width, 512)
    assert len(rows) == 3

    def predict(rows, context):
        found = {}
        for row in rows:
            probs = []
            labels = predict_band(
                predictor, source, context, row, on_block=lambda b, p, kept=probs: kept.append(p.copy())
            )
            found[row[0].top] = labels, probs
        return found

    in_order, shipped_reversed = predict(rows, context), predict(rows[::-1], copy)
    for top, (labels, probs) in in_order.items():
        np.testing.assert_array_equal(labels, shipped_reversed[top][0])
        for a, b in zip(probs, shipped_reversed[top][1], strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_cluster_needs_a_checkpoint_path_and_image_paths(tiny_checkpoint, tmp_path):
    model = gigaseg.load_model(tiny_checkpoint)[0]
    with pytest.raises(ConfigError, match="needs a checkpoint file or run folder"):
        gigaseg.predict(model, tmp_path / "a.tif", tmp_path / "out", client=object(), progress=False)
    with pytest.raises(ConfigError, match="polygons .* TIFF mask"):
        gigaseg.predict(tiny_checkpoint, tmp_path / "a.tif", tmp_path / "out", format="ome-zarr", vector="gpkg")
    with pytest.raises(ConfigError, match="a folder with no images"):
        gigaseg.predict(tiny_checkpoint, tmp_path, tmp_path / "out", progress=False)
