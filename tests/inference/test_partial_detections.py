"""An interrupted sliced detection resumes from its finished bands, and never from another run's."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gigaseg
from gigaseg.errors import ConfigError, GigasegError
from gigaseg.inference.detections import predict_detections
from gigaseg.inference.partial_detections import PartialDetections
from gigaseg.inference.sliced import SlicedDetectionPredictor, tile_starts
from gigaseg.io.array import ArraySource
from gigaseg.io.lock import output_lock

from .test_sliced import NORM, SquareFinder, scene

SQUARES = [(10, 20, 30, 0), (100, 240, 30, 0), (230, 90, 20, 1), (300, 20, 12, 1), (390, 400, 40, 0)]


class Reads(ArraySource):
    """An in-memory image that records the rows it reads and fails once ``fail_at_row`` is reached."""

    def __init__(self, array, fail_at_row=None):
        super().__init__(array, name="scene")
        self.tops: list[int] = []
        self.fail_at_row = fail_at_row

    def read(self, window=None):
        if window is not None:
            if self.fail_at_row is not None and window.top >= self.fail_at_row:
                raise KeyboardInterrupt("killed")
            self.tops.append(window.top)
        return super().read(window)


def predictor(model=None):
    return SlicedDetectionPredictor(model or SquareFinder(), NORM, tile_size=128, overlap=28, sub_batch=3)


def store(folder, producer="a", resume=True, side=460):
    return PartialDetections(folder / "scene.json", producer=producer, height=side, width=side, resume=resume)


def as_rows(found):
    return sorted(zip(found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True))


def test_bands_are_saved_and_a_rerun_reads_only_the_unfinished_ones(tmp_path):
    image = scene(460, 460, SQUARES)
    tops = tile_starts(460, 128, 28)  # [0, 100, 200, 300, 332]: five bands
    whole = predictor().predict(ArraySource(image))
    assert len(whole) >= len(SQUARES)

    killed = Reads(image, fail_at_row=tops[3])  # killed when the fourth band is read
    with pytest.raises(KeyboardInterrupt):
        predictor().predict(killed, partial=store(tmp_path).open())
    saved = sorted(p.name for p in (tmp_path / ".scene.json.bands").glob("band_*.npz"))
    assert saved == ["band_000000.npz", "band_000001.npz", "band_000002.npz"]

    again = Reads(image)
    model = SquareFinder()
    resumed = store(tmp_path).open()
    assert sorted(resumed.finished) == [0, 1, 2]
    found = predictor(model).predict(again, partial=resumed)
    assert set(again.tops) == {tops[3], tops[4]}  # the finished bands' pixels are not read again
    assert len(model.views) == 2 * len(tile_starts(460, 128, 28))  # two bands of five tiles detected
    assert as_rows(found) == as_rows(whole)


def test_predict_detections_removes_the_store_once_the_outputs_are_written(tmp_path):
    image = scene(460, 460, SQUARES)
    partial = store(tmp_path).open()
    assert (partial.folder / "meta.json").is_file()
    result = predict_detections(
        predictor(), ArraySource(image, name="scene"), tmp_path / "scene", classes=["a", "b"], partial=partial
    )
    assert not partial.folder.exists()
    assert len(json.loads(result.json_path.read_text())) == len(predictor().predict(ArraySource(image))) >= 5


def test_a_store_of_another_producer_or_size_is_refused_and_restart_clears_it(tmp_path):
    first = store(tmp_path, producer="a").open()
    first.save(0, predictor().predict(ArraySource(scene(460, 460, SQUARES))))
    with pytest.raises(GigasegError, match="made from another input image, by another model.*--restart"):
        store(tmp_path, producer="b").open()
    with pytest.raises(GigasegError, match="bands of a 460x460 image, not 500x500"):
        store(tmp_path, producer="a", side=500).open()
    fresh = store(tmp_path, producer="b", resume=False).open()
    assert fresh.finished == {} and not list(fresh.folder.glob("band_*.npz"))
    assert json.loads((fresh.folder / "meta.json").read_text())["producer"] == "b"


def test_a_damaged_band_file_is_named(tmp_path):
    partial = store(tmp_path).open()
    (partial.folder / "band_000000.npz").write_bytes(b"not a zip")
    with pytest.raises(GigasegError, match=r"band_000000\.npz is unreadable.*--restart"):
        store(tmp_path).open()


def test_gigaseg_predict_of_a_detector_resumes_and_refuses_another_image(tmp_path, monkeypatch):
    """The API: a killed prediction leaves its bands; the same call resumes; another image is refused."""
    import tifffile

    torch_model = gigaseg.create_model(
        "fcos",
        encoder="test_resnet",
        num_classes=2,
        fpn_channels=16,
        head_convs=1,
        mode="sliced",
        tile_size=64,
        overlap_ratio=0.25,
        score_threshold=0.0,
    )
    info = {"classes": ["a", "b"], "palette": [[255, 0, 0], [0, 255, 0]]}
    checkpoint = gigaseg.save_checkpoint(tmp_path / "fcos.ckpt", torch_model, info)
    rng = np.random.default_rng(0)
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, rng.integers(0, 255, (200, 200, 3), np.uint8), photometric="rgb")
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, rng.integers(0, 255, (200, 200, 3), np.uint8), photometric="rgb")
    expected = gigaseg.predict(checkpoint, image, None, progress=False).detections

    saves = []
    original = PartialDetections.save

    def killed_after_two(self, band, found):
        if len(saves) == 2:
            raise KeyboardInterrupt("killed")
        saves.append(band)
        original(self, band, found)

    monkeypatch.setattr(PartialDetections, "save", killed_after_two)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        gigaseg.predict(checkpoint, image, out, progress=False)
    assert not (out / "scene.json").exists() and len(list((out / ".scene.json.bands").glob("band_*"))) == 2
    monkeypatch.setattr(PartialDetections, "save", original)

    with pytest.raises(GigasegError, match="another input image"):  # same output name, other pixels
        gigaseg.predict(checkpoint, other, out / "scene.json", progress=False)
    with output_lock(out / "scene.json"), pytest.raises(ConfigError, match="another gigaseg process is writing"):
        gigaseg.predict(checkpoint, image, out, progress=False)
    result = gigaseg.predict(checkpoint, image, out, progress=False)
    assert as_rows(result.detections) == as_rows(expected)
    assert (out / "scene.json").is_file() and not (out / ".scene.json.bands").exists()
