"""OME-Zarr label masks (gigaseg.io.omezarr, ``predict --format ome-zarr``), read back with ome-zarr-py's Reader.

The store is also validated with ome-zarr-models (NGFF 0.5 ``ImageLabel`` and ``Image``), and its
level 0 is compared with the TIFF mask the same prediction writes.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import gigaseg
from gigaseg.errors import GigasegError
from gigaseg.geometry import Window
from gigaseg.io.omezarr import OmeZarrMaskWriter, mode_downsample2, read_label_metadata

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
NAMES = ["a", "b", "c"]


def scene(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((32, 32, 1)))[:height, :width]
    return (big * 0.7 + rng.integers(0, 77, (height, width, 3))).astype(np.uint8)


def read_store(path):
    """The store's one node as ome-zarr-py's Reader sees it."""
    nodes = list(Reader(parse_url(str(path)))())
    assert len(nodes) == 1, nodes
    return nodes[0]


def test_mode_downsample_takes_the_majority_and_ties_to_the_top_left():
    blocks = np.array(
        [
            [1, 2, 3, 3, 4, 5, 6, 7, 9],
            [2, 2, 4, 4, 5, 4, 8, 9, 9],
        ],
        dtype=np.uint8,
    )
    # 2x2 blocks: [1 2 / 2 2] -> 2 (majority); [3 3 / 4 4] -> 3 (tie, top-left); [4 5 / 5 4] -> 4 (tie);
    # [6 7 / 8 9] -> 6 (all differ: the top-left, as nearest neighbour); odd last column [9 / 9] -> 9
    assert mode_downsample2(blocks).tolist() == [[2, 3, 4, 6, 9]]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (37, 51)).astype(np.uint8)
    down = mode_downsample2(labels)
    assert down.shape == (19, 26)
    padded = np.pad(labels, ((0, 1), (0, 1)), mode="edge")
    for r, c in [(0, 0), (5, 7), (18, 25), (10, 3)]:
        block = padded[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].ravel()
        counts = np.bincount(block, minlength=2)
        expected = block[0] if counts.max() == counts[block[0]] else np.argmax(counts)
        assert down[r, c] == expected


def test_store_round_trip_through_ome_zarr_reader(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (1300, 1100)).astype(np.uint8)
    probs = rng.random((3, 1300, 1100)).astype(np.float32)
    path = tmp_path / "scene.ome.zarr"
    writer = OmeZarrMaskWriter(path, 1300, 1100, palette=PALETTE, class_names=NAMES, num_classes=3, producer="p")
    for top in reversed(writer.band_tops):  # any order
        band = writer.band_window(top)
        for left in range(0, 1100, 512):
            block = Window(top, left, band.height, min(512, 1100 - left))
            writer.write_probabilities(block, probs[(slice(None), *block.slices)])
        writer.write_band(top, labels[band.slices])
    assert not path.exists() and writer.partial.is_dir()
    assert writer.close() == path and not writer.partial.exists()

    node = read_store(path)
    assert {type(spec) for spec in node.specs} == {Label, Multiscales}
    assert [tuple(level.shape) for level in node.data] == [(1300, 1100), (650, 550)]  # stops below one chunk
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(node.data[1]), mode_downsample2(labels))
    assert node.metadata["color"] == {0: [0, 0, 0, 1], 1: [1, 0, 0, 1], 2: [0, 1, 0, 1]}
    assert node.metadata["properties"] == {0: {"class": "a"}, 1: {"class": "b"}, 2: {"class": "c"}}
    assert [a["name"] for a in node.metadata["axes"]] == ["y", "x"]
    assert node.metadata["coordinateTransformations"][1] == [{"type": "scale", "scale": [2.0, 2.0]}]
    assert read_label_metadata(path)["version"] == "0.5"

    group = zarr.open_group(str(path), mode="r")
    label = ImageLabel.from_zarr(group)  # the NGFF 0.5 schema, validated
    assert [c.label_value for c in label.attributes.ome.image_label.colors] == [0, 1, 2]
    stored = Image.from_zarr(group["probabilities"])
    assert [a.name for a in stored.attributes.ome.multiscales[0].axes] == ["c", "y", "x"]
    np.testing.assert_array_equal(group["probabilities/0"][:], probs.astype(np.float16))


def test_resume_keeps_the_bands_of_the_same_producer_only(tmp_path):
    path = tmp_path / "m.ome.zarr"
    labels = np.arange(1000 * 300, dtype=np.uint32).reshape(1000, 300).astype(np.uint8)
    first = OmeZarrMaskWriter(path, 1000, 300, chunk=256, producer="run-1")
    first.write_band(256, labels[256:512])
    first.write_band(768, labels[768:])

    again = OmeZarrMaskWriter(path, 1000, 300, chunk=256, producer="run-1", resume=True)
    assert again.done_bands == [256, 768] and again.missing_bands == [0, 512]
    attached = OmeZarrMaskWriter.attach(path)  # what a worker opens
    attached.write_band(0, labels[:256])
    with pytest.raises(GigasegError, match="mask incomplete, 1 of 4 bands missing: rows 512-767"):
        again.close()
    assert again.partial.is_dir() and not path.exists()

    with pytest.raises(GigasegError, match="another input image, by another model"):
        OmeZarrMaskWriter(path, 1000, 300, chunk=256, producer="run-2", resume=True)
    with pytest.raises(GigasegError, match="1000x300 mask in 256-row bands"):
        OmeZarrMaskWriter(path, 1000, 301, chunk=256, producer="run-1", resume=True)
    fresh = OmeZarrMaskWriter(path, 1000, 300, chunk=256, producer="run-2", resume=False)
    assert fresh.done_bands == []


def _fill_bands(path, tops, seed):
    """In another process: open the store as a worker does and write some bands."""
    writer = OmeZarrMaskWriter.attach(path)
    labels = np.random.default_rng(seed).integers(0, 5, (writer.height, writer.width)).astype(np.uint8)
    for top in tops:
        writer.write_band(top, labels[writer.band_window(top).slices])


def test_processes_fill_disjoint_bands_at_once_without_locks(tmp_path):
    path = tmp_path / "m.ome.zarr"
    writer = OmeZarrMaskWriter(path, 2000, 700, chunk=128, producer="p")
    tops = writer.band_tops
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")  # zarr resets its loop on fork
    workers = [context.Process(target=_fill_bands, args=(str(path), tops[i::3], 7)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    expected = np.random.default_rng(7).integers(0, 5, (2000, 700)).astype(np.uint8)
    assert writer.missing_bands == []
    writer.close()
    np.testing.assert_array_equal(np.asarray(read_store(path).data[0]), expected)


def test_predict_writes_an_ome_zarr_equal_to_the_tiff_mask(tmp_path, tiny_checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, scene(1100, 700), photometric="rgb", tile=(256, 256))
    out = tmp_path / "out"
    result = gigaseg.predict(
        tiny_checkpoint, image, out, format="tiff,ome-zarr", probabilities=True, overlay=True, progress=False
    )
    assert result.mask_path == out / "scene.tif" and result.ome_zarr_path == out / "scene.ome.zarr"
    assert result.probabilities_path == out / "scene.ome.zarr" / "probabilities"
    assert sorted(os.listdir(out)) == ["scene.ome.zarr", "scene.tif", "scene_overlay.png"]  # nothing partial left
    mask = tifffile.imread(result.mask_path)
    node = read_store(result.ome_zarr_path)
    np.testing.assert_array_equal(np.asarray(node.data[0]), mask)
    assert len(np.unique(mask)) == 3  # the test means something: every class occurs
    assert node.metadata["properties"] == {0: {"class": "a"}, 1: {"class": "b"}, 2: {"class": "c"}}
    assert node.metadata["color"][1] == [1, 0, 0, 1]
    probs = zarr.open_array(str(result.probabilities_path / "0"), mode="r")[:]
    assert probs.shape == (3, 1100, 700) and probs.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=5e-3)

    alone = gigaseg.predict(tiny_checkpoint, image, tmp_path / "zarr-only", format="ome-zarr", progress=False)
    assert alone.mask_path is None and sorted(os.listdir(tmp_path / "zarr-only")) == ["scene.ome.zarr"]
    np.testing.assert_array_equal(np.asarray(read_store(alone.ome_zarr_path).data[0]), mask)


def test_an_interrupted_ome_zarr_prediction_resumes_to_the_same_store(tmp_path, tiny_checkpoint, monkeypatch):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, scene(2600, 300, seed=2), photometric="rgb", tile=(256, 256))
    reference = gigaseg.predict(
        tiny_checkpoint, image, tmp_path / "ref", format="ome-zarr", max_memory="1.5GB", progress=False
    )
    out = tmp_path / "out"
    original = OmeZarrMaskWriter.write_band
    calls = []

    def dies_after_two_bands(self, top, labels):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(top)
        original(self, top, labels)

    monkeypatch.setattr(OmeZarrMaskWriter, "write_band", dies_after_two_bands)
    # 1.5 GB: 1024-px blocks, so 3 rows of blocks of 2 bands each
    with pytest.raises(KeyboardInterrupt):
        gigaseg.predict(tiny_checkpoint, image, out, format="ome-zarr", max_memory="1.5GB", progress=False)
    monkeypatch.setattr(OmeZarrMaskWriter, "write_band", original)
    assert not (out / "scene.ome.zarr").exists() and (out / ".scene.ome.zarr.partial").is_dir()
    assert sorted(int(n) for n in os.listdir(out / ".scene.ome.zarr.partial" / ".gigaseg" / "done")) == [0, 512]

    resumed = gigaseg.predict(tiny_checkpoint, image, out, format="ome-zarr", max_memory="1.5GB", progress=False)
    assert (resumed.blocks_resumed, resumed.blocks_predicted) == (1, 2)  # one 1024-row block of 3 was kept
    np.testing.assert_array_equal(
        np.asarray(read_store(resumed.ome_zarr_path).data[0]), np.asarray(read_store(reference.ome_zarr_path).data[0])
    )
    with pytest.raises(GigasegError, match="unknown mask format 'zarr'"):
        gigaseg.predict(tiny_checkpoint, image, out, format="zarr", progress=False)
