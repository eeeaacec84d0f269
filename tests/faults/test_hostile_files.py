"""The hostile-file corpus (corpus.py) through ``gigaseg predict``, ``gigaseg evaluate`` and ``open_image``.

For every hostile input each command exits with code 2 and one line on stderr naming the file (never a
traceback), leaves nothing under the output's name (and, when refused before predicting, no scratch or
lock file at all), and stays under ``PEAK_RSS_CAP``: nothing a header promises is decoded.

The commands run as children of a fork server (forkserver.py) that imported gigaseg and torch once, so
the corpus costs seconds rather than minutes; ``test_a_fresh_process_refuses_as_the_fork_server_children``
checks two cases in real ``python -m gigaseg`` processes against them.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

import numpy as np
import pytest
import tifffile
import yaml

from gigaseg.bench.memory import measure_command
from gigaseg.errors import ImageReadError
from gigaseg.geometry import Window
from gigaseg.io.sources import open_image

from .corpus import NAMES, write_corpus
from .helpers import PEAK_RSS_CAP, child_env, one_line_error

PREDICT_CASES = NAMES


@pytest.fixture(autouse=True)
def no_decode_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv("GIGASEG_MAX_DECODE", raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return {case.name: case for case in write_corpus(tmp_path_factory.mktemp("hostile") / "corpus")}


@pytest.fixture(scope="module")
def fresh_processes(corpus, tiny_checkpoint, tmp_path_factory):
    """Two cases in real ``python -m gigaseg predict`` processes, run in a thread alongside the other tests."""
    out = tmp_path_factory.mktemp("fresh")
    reports: dict = {}

    def run():
        for name in ("png-bomb", "cut-tiled-tiff"):
            case = corpus[name]
            argv = [sys.executable, "-m", "gigaseg", "predict", case.path, "--checkpoint", tiny_checkpoint]
            argv += ["--out", out / name]
            try:
                reports[name] = measure_command(argv, capture_output=True, env=child_env(**case.env), timeout=300)
            except Exception as error:  # noqa: BLE001 - reported by the test that reads them
                reports[name] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, reports, out


def test_the_corpus_holds_every_case(corpus, fresh_processes, fork_server):  # starts both early
    assert tuple(corpus) == NAMES
    assert all(case.path.is_symlink() or case.path.exists() for case in corpus.values())


# --------------------------------------------------------------------------- gigaseg predict


@pytest.mark.parametrize("name", PREDICT_CASES)
def test_predict_refuses_in_one_line_with_no_output_and_bounded_memory(
    name, corpus, fork_server, tiny_checkpoint, tmp_path
):
    case = corpus[name]
    out = tmp_path / "out"
    result = fork_server.run("predict", case.path, "--checkpoint", tiny_checkpoint, "--out", out, env=case.env)
    assert result.code == 2, result.stderr
    one_line_error(result.stderr, "predict", str(case.path), case.words)
    assert result.peak_rss < PEAK_RSS_CAP, f"peak RSS {result.peak_rss / 1e9:.2f} GB"
    assert not (out / f"{case.path.stem}.tif").exists()
    if case.stage in ("open", "model"):
        assert not out.exists(), "refused before predicting, yet the output folder was made"
    else:  # refused while predicting, before any band was finished: no scratch, lock or partial file
        assert sorted(p.name for p in out.iterdir()) == []


def test_predict_onto_a_symlink_loop_at_the_masks_name_is_one_line_or_replaces_it(
    fork_server, tiny_checkpoint, tmp_path
):
    image, out = tmp_path / "scene.tif", tmp_path / "out"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    out.mkdir()
    os.symlink("other.tif", out / "scene.tif")  # the mask's name: scene.tif -> other.tif -> scene.tif
    os.symlink("scene.tif", out / "other.tif")
    result = fork_server.run("predict", image, "--checkpoint", tiny_checkpoint, "--out", out)
    assert "Traceback" not in result.stderr and result.code in (0, 2), result.stderr
    if result.code == 2:
        one_line_error(result.stderr, "predict", str(out / "scene.tif"))
    else:  # or the link is replaced by the mask, as a file is
        assert (out / "scene.tif").is_file() and not (out / "scene.tif").is_symlink()


# --------------------------------------------------------------------------- gigaseg evaluate


def dataset_holding(root, case):
    """A dataset folder whose only image is (a copy of) the hostile file, with a mask of its size."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    copy = root / "images" / case.path.name
    if case.path.is_symlink():
        for link in {case.path, case.path.parent / os.readlink(case.path)}:  # both links of a loop
            if link.is_symlink():
                os.symlink(os.readlink(link), root / "images" / link.name)
    elif case.path.is_dir():
        copy.mkdir()
    else:
        shutil.copyfile(case.path, copy)
    try:
        with open_image(case.path) as image:
            size = image.shape[:2] if image.height * image.width <= 10**7 else (96, 96)
    except ImageReadError:
        size = (96, 96)
    tifffile.imwrite(root / "masks" / f"{case.path.stem}.tif", np.zeros(size, np.uint8))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": ["a", "b", "c"]}))
    return root, copy


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_refuses_a_dataset_holding_the_file_in_one_line(name, corpus, fork_server, tiny_checkpoint, tmp_path):
    case = corpus[name]
    root, copy = dataset_holding(tmp_path / "data", case)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    result = fork_server.run(
        "evaluate", "--checkpoint", tiny_checkpoint, "--data", root, "--split", "train", env=case.env
    )
    assert result.code == 2, result.stderr
    # the file by its path, or (the model's channel check) the dataset and the image's name
    line = one_line_error(result.stderr, "evaluate", copy.stem)
    assert str(copy) in line or str(root) in line, line
    assert result.peak_rss < PEAK_RSS_CAP, f"peak RSS {result.peak_rss / 1e9:.2f} GB"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before, "evaluate wrote into the dataset"


# --------------------------------------------------------------------------- open_image


@pytest.mark.parametrize("name", NAMES)
def test_open_image_raises_image_read_error_naming_the_file(name, corpus, monkeypatch):
    case = corpus[name]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.stage == "open":
        with pytest.raises(ImageReadError) as caught:
            open_image(case.path)
    elif case.stage == "read":
        with open_image(case.path) as image, pytest.raises(ImageReadError) as caught:
            for top in range(0, image.height, 64):
                image.read(Window(top, 0, min(64, image.height - top), image.width))
    else:  # a sound file: what refuses it is the model
        with open_image(case.path) as image:
            assert image.read().shape == image.shape
        return
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{case.path}: ") and case.words in message, message


# --------------------------------------------------------------------------- fresh processes


def test_a_fresh_process_refuses_as_the_fork_server_children(corpus, fresh_processes, fork_server, tiny_checkpoint):
    thread, reports, out = fresh_processes
    thread.join(300)
    assert not thread.is_alive(), "the fresh gigaseg processes did not finish"
    for name, report in reports.items():
        assert not isinstance(report, Exception), f"{name}: {report!r}"
        case = corpus[name]
        assert report.returncode == 2, report.stderr
        line = one_line_error(report.stderr, "predict", str(case.path), case.words)
        assert report.peak_rss < PEAK_RSS_CAP, f"{name}: peak RSS {report.peak_rss / 1e9:.2f} GB"
        forked = fork_server.run("predict", case.path, "--checkpoint", tiny_checkpoint, "--out", out / f"{name}-forked")
        assert forked.stderr.strip() == line.replace(str(out / name), str(out / f"{name}-forked"))
        assert not (out / name / f"{case.path.stem}.tif").exists()
