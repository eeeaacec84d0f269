"""Streaming whole-image prediction: blocks equal the in-memory result, and runs resume."""

import numpy as np
import pytest
import tifffile
import torch

from gigaseg.geometry import Window
from gigaseg.inference.stream import block_grid, predict_image
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.baselines.predictor import GlobalPredictor, PatchPredictor
from gigaseg.methods.registry import create_model


def scene(height, width, seed=0):
    """A smooth random RGB image (so that predictions vary across it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((32, 32, 1)))[:height, :width]
    return (big * 0.7 + rng.integers(0, 77, (height, width, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def patch_model():
    torch.manual_seed(0)
    return create_model(
        "patch", encoder="test_resnet", num_classes=4, patch_size=128, overlap=32, fpn_channels=32
    ).eval()


def test_block_grid_covers_image_in_writer_tiles():
    rows = block_grid(1300, 1100, 1000)  # rounded down to a multiple of the 512-px writer tile
    assert [len(r) for r in rows] == [3, 3, 3]
    assert rows[0][0] == Window(0, 0, 512, 512)
    assert rows[-1][-1] == Window(1024, 1024, 276, 76)
    covered = np.zeros((1300, 1100), int)
    for row in rows:
        for block in row:
            covered[block.slices] += 1
    assert (covered == 1).all()


def test_streamed_patch_prediction_equals_in_memory(patch_model, tmp_path):
    image = scene(2048, 2048)
    source = open_image(image)
    predictor = PatchPredictor(patch_model, Normalization.for_image(3, np.uint8), sub_batch=8)
    whole = predictor.predict_block(source, predictor.prepare(source), source.bounds)  # one block, in memory
    streamed = predict_image(predictor, source, tmp_path / "mask.tif", block_size=512, progress=False)
    assert streamed.blocks_predicted == 4 * 4
    labels = tifffile.imread(tmp_path / "mask.tif")
    agree = (labels == whole.argmax(0)).mean()
    assert agree >= 0.999, agree


def test_global_prediction_blocks_are_exact_crops(tmp_path):
    torch.manual_seed(0)
    model = create_model("global", encoder="test_resnet", num_classes=3, input_size=64).eval()
    source = open_image(scene(700, 530))
    predictor = GlobalPredictor(model, Normalization.for_image(3, np.uint8))
    context = predictor.prepare(source)
    full = torch.nn.functional.interpolate(context, (700, 530), mode="bilinear", align_corners=False)[0].numpy()
    block = Window(512, 0, 188, 512)
    np.testing.assert_allclose(
        predictor.predict_block(source, context, block), full[(slice(None), *block.slices)], atol=1e-5
    )


class Interrupt(Exception):
    pass


def test_interrupted_prediction_resumes_to_identical_result(patch_model, tmp_path):
    source = open_image(scene(1100, 700, seed=3))
    predictor = PatchPredictor(patch_model, Normalization.for_image(3, np.uint8), sub_batch=8)
    reference = tmp_path / "reference.tif"
    predict_image(predictor, source, reference, block_size=512, progress=False)

    calls = {"n": 0}
    original = predictor.predict_block

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # dies in the second row of blocks
            raise Interrupt
        return original(*args)

    predictor.predict_block = dying
    out = tmp_path / "mask.tif"
    with pytest.raises(Interrupt):
        predict_image(predictor, source, out, block_size=512, progress=False)
    assert not out.exists()  # nothing under the final name

    predictor.predict_block = original
    resumed = predict_image(predictor, source, out, block_size=512, progress=False)
    assert resumed.blocks_resumed == 2 and resumed.blocks_predicted == 4  # first row kept, rows 2-3 redone
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(reference))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # scratch area cleaned up


def test_patches_shared_with_the_next_block_are_computed_once(patch_model):
    from gigaseg.inference.stitch import patches_touching, stitch_block

    source = open_image(scene(512, 1536, seed=5))
    predictor = PatchPredictor(patch_model, Normalization.for_image(3, np.uint8), sub_batch=8)
    grid = predictor.prepare(source)["grid"]
    blocks = [Window(0, left, 512, 512) for left in (0, 512, 1024)]
    evaluated = []

    def logits(batch, windows):
        evaluated.extend(windows)
        with torch.inference_mode():
            return patch_model(batch)

    def run(cache):
        evaluated.clear()
        out = [
            stitch_block(source, grid, b, logits, predictor.to_tensor, 4, 8, blend="gaussian", cache=cache)
            for b in blocks
        ]
        return np.concatenate(out, axis=2), list(evaluated)

    with torch.inference_mode():
        plain, plain_calls = run(None)
        cached, cached_calls = run({})
    touching = sum(len(patches_touching(grid, b)) for b in blocks)
    assert len(plain_calls) == touching
    assert len(cached_calls) == len(set(plain_calls)) == len(grid)  # every grid patch exactly once
    np.testing.assert_allclose(plain, cached, rtol=0, atol=1e-6)  # same sums, other order
    top2 = np.sort(plain, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-5  # labels may differ only where two classes tie
    np.testing.assert_array_equal(plain.argmax(0)[decided], cached.argmax(0)[decided])


def test_prediction_fingerprint_follows_weights_options_and_settings(patch_model):
    from gigaseg.inference.fingerprint import prediction_fingerprint

    base = prediction_fingerprint(patch_model, block_size=2048, precision="32")
    assert base == prediction_fingerprint(patch_model, block_size=2048, precision="32")
    assert base != prediction_fingerprint(patch_model, block_size=1024, precision="32")
    assert base != prediction_fingerprint(
        patch_model.with_inference_options(overlap=8), block_size=2048, precision="32"
    )
    changed = patch_model.with_options()
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert base != prediction_fingerprint(changed, block_size=2048, precision="32")
