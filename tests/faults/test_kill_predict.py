"""``gigaseg predict`` killed (SIGKILL) at chosen points, then rerun with the same command.

Each kill is a real ``python -m gigaseg predict`` child. The points are chosen deterministically: the
first by polling the scratch folder's ``progress.json`` for the first row of blocks, the others by fault
points where the child stops itself (``SIGSTOP``, see hook/sitecustomize.py) before the test kills it.
After every kill nothing is under the mask's name; the rerun finishes a mask byte-identical to an
uninterrupted run's and leaves no scratch, lock or partial file.
"""

from __future__ import annotations

import os

import tifffile

import gigaseg

from .helpers import Child, done_bands, run_child, scene

#: 7000 rows: 4 rows of 2048-px blocks, 14 bands of 512 rows in the mask writer
HEIGHT, WIDTH = 7000, 256
BANDS = 14


def test_predict_killed_at_three_points_resumes_to_the_uninterrupted_mask(tmp_path, tiny_checkpoint):
    image = tmp_path / "scene.tif"
    tifffile.imwrite(image, scene(HEIGHT, WIDTH), photometric="rgb", tile=(256, 256))
    out, logs = tmp_path / "out", tmp_path / "logs"
    mask, scratch, partial = out / "scene.tif", out / ".scene.tif.scratch", out / ".scene.tif.partial"
    command = ("predict", image, "--checkpoint", tiny_checkpoint, "--out", out)

    # 1. a plain SIGKILL as soon as the first row of blocks (4 bands) is on disk
    child = Child(logs, *command)
    reference = gigaseg.predict(tiny_checkpoint, image, tmp_path / "reference" / "scene.tif", progress=False)
    child.kill_when(lambda: len(done_bands(scratch)) >= 4)
    first = done_bands(scratch)
    assert not mask.exists() and not partial.exists() and 4 <= len(first) < BANDS, first

    # 2. killed in the middle of storing a band: its labels are written, progress.json does not list it yet
    child = Child(logs, *command, stop="torn-band:2")
    child.wait_stopped()
    child.kill()
    second = done_bands(scratch)
    assert not mask.exists() and set(first) < set(second) and len(second) < BANDS, (first, second)

    # 3. killed while the finished mask is written under its temporary name
    child = Child(logs, *command, stop="assemble:3")
    child.wait_stopped()
    assert partial.exists() and (out / ".scene.tif.pyramid").is_dir() and not mask.exists()
    child.kill()
    assert not mask.exists() and sorted(done_bands(scratch)) == list(range(0, HEIGHT, 512))

    # 4. the same command again: it finishes from the stored bands
    child = run_child(logs, *command)
    assert child.code == 0, child.stderr
    assert mask.read_bytes() == reference.mask_path.read_bytes()
    assert sorted(os.listdir(out)) == ["scene.tif"], "scratch, lock or partial files were left behind"
