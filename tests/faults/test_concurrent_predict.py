"""Two real ``gigaseg predict`` processes writing one mask: one is refused at once, the other completes."""

from __future__ import annotations

import os
import time

import tifffile

import gigaseg

from .helpers import CHILD_TIMEOUT, Child, one_line_error, scene


def test_two_predicts_to_one_output_one_is_refused_naming_it_the_other_completes(tmp_path, tiny_checkpoint):
    image, out, logs = tmp_path / "scene.tif", tmp_path / "out", tmp_path / "logs"
    tifffile.imwrite(image, scene(1100, 128), photometric="rgb", tile=(128, 128))
    command = ("predict", image, "--checkpoint", tiny_checkpoint, "--out", out)
    # both stop after their first stored band: whichever holds the output's lock then keeps holding it, so the
    # other meets the lock whatever the order in which they get there
    children = [Child(logs, *command, stop="band:1"), Child(logs, *command, stop="band:1")]
    reference = gigaseg.predict(tiny_checkpoint, image, tmp_path / "reference" / "scene.tif", progress=False)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not all([child.poll() for child in children]):
        assert time.monotonic() < deadline, [child.stderr for child in children]
        time.sleep(0.01)
    holders = [child for child in children if child.stopped]
    refused = [child for child in children if not child.stopped]
    assert len(holders) == 1 and len(refused) == 1, [(child.code, child.stderr) for child in children]
    holder, refused = holders[0], refused[0]

    assert refused.code == 2
    one_line_error(refused.stderr, "predict", str(out / "scene.tif"), "another gigaseg process is writing this output")
    assert not (out / "scene.tif").exists()

    holder.resume()
    assert holder.wait() == 0, holder.stderr
    assert (out / "scene.tif").read_bytes() == reference.mask_path.read_bytes()
    assert sorted(os.listdir(out)) == ["scene.tif"], "lock or scratch files were left behind"
