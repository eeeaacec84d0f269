"""GLNet's "tile" global-context policy: the core/tile layout and its predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaseg.api import predict
from gigaseg.errors import ConfigError
from gigaseg.geometry import Window
from gigaseg.inference.stream import WRITER_TILE
from gigaseg.io.crop import CroppedSource
from gigaseg.io.normalize import Normalization
from gigaseg.io.sources import open_image
from gigaseg.methods.glnet.predictor import GLNetPredictor, GLNetTilePredictor, axis_tiles, context_tiles, core_size
from gigaseg.methods.registry import build_predictor, create_model

FLOAT = Normalization.for_image(3, np.float32)
#: what a checkpoint would carry, for predict() on a model object and a uint8 image
INFO = {
    "classes": ["a", "b", "c"],
    "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
    "normalization": Normalization.for_image(3, np.uint8).to_dict(),
}


def tiny(stage, **options):
    torch.manual_seed(0)
    model = create_model(
        "glnet",
        encoder="test_resnet",
        num_classes=3,
        **{"size_g": 64, "size_p": 128, "min_overlap": 16, "fpn_channels": 16, **options},
    )
    model.set_stage(stage)
    return model.eval()


def scene(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.random((height // 16 + 1, width // 16 + 1, 3))
    image = np.kron(small, np.ones((16, 16, 1)))[:height, :width] * 0.7 + rng.random((height, width, 3)) * 0.3
    return image.astype(np.float32)


def test_core_size_leaves_half_a_patch_each_side_in_writer_tiles():
    assert WRITER_TILE == 512
    assert core_size(2448, 508) == 1536  # 2448 - 508 = 1940 -> 3 writer tiles
    assert core_size(1536, 256) == 1024  # the comparison benchmark's scenes and patches
    assert core_size(2448, 508, block_limit=1024) == 1024
    assert core_size(600, 256) == 512  # never below one writer tile


@pytest.mark.parametrize(
    "length, core, side",
    [(5000, 1536, 2448), (1000, 512, 2448), (1100, 512, 700), (512, 512, 1536), (1537, 1024, 1536)],
)
def test_cores_cover_the_axis_once_and_tiles_hold_their_core(length, core, side):
    tiles = axis_tiles(length, core, side)
    covered = np.zeros(length, dtype=int)
    for c0, c1, t0, t1 in tiles:
        covered[c0:c1] += 1
        assert c0 % core == 0 and t0 <= c0 < c1 <= t1
        assert 0 <= t0 and t1 <= length
        assert t1 - t0 == min(max(side, c1 - c0), length)  # the training side unless the axis is shorter
    assert (covered == 1).all()


def test_tiles_are_centred_on_their_core_away_from_the_borders():
    (_, _, a0, a1), (c0, c1, t0, t1), *_ = axis_tiles(5000, 1536, 2448)
    assert (a0, a1) == (0, 2448)  # shifted inside the image
    assert (c0, c1) == (1536, 3072) and (t0, t1) == (1536 - 456, 3072 + 456)
    layout = context_tiles(3000, 2000, 1536, 2448)
    assert [t.core for t in layout] == [
        Window(0, 0, 1536, 1536),
        Window(0, 1536, 1536, 464),
        Window(1536, 0, 1464, 1536),
        Window(1536, 1536, 1464, 464),
    ]
    assert all(t.tile.width == 2000 and t.tile.height == 2448 for t in layout)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_tile_as_large_as_the_image_is_the_image_policy(stage):
    image = scene(600, 560)
    source = open_image(image)
    model = tiny(stage)
    reference = GLNetPredictor(model, FLOAT, sub_batch=4)
    tiled = build_predictor(tiny(stage, global_context="tile", context_tile=1024), FLOAT)
    assert isinstance(tiled, GLNetTilePredictor) and tiled.block_size == 512
    whole = reference.predict_block(source, reference.prepare(source), source.bounds)
    state = tiled.prepare(source)
    for tile in state.tiles:
        assert tile.tile == source.bounds
        got = tiled.predict_block(source, state, tile.core)
        np.testing.assert_allclose(got, whole[(slice(None), *tile.core.slices)], atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_core_is_glnet_on_its_tile(stage):
    image = scene(1100, 700, seed=1)
    source = open_image(image)
    model = tiny(stage, global_context="tile", context_tile=700)
    predictor = build_predictor(model, FLOAT)
    assert predictor.block_size == 512
    state = predictor.prepare(source)
    assert len(state.tiles) == 3 * 2
    plain = GLNetPredictor(model, FLOAT, sub_batch=4)
    for tile in state.tiles:
        got = predictor.predict_block(source, state, tile.core).copy()
        crop = CroppedSource(source, tile.tile)
        expected = plain.predict_block(crop, plain.prepare(crop), tile.core.relative_to(tile.tile))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert got.shape == (3, *tile.core.shape) and np.allclose(got.sum(0), 1, atol=1e-5)
    assert state.contexts_computed == len(state.tiles)  # one context per core, in the driver's order


def test_a_block_across_cores_is_assembled_from_each_tile():
    image = scene(1100, 700, seed=2)
    source = open_image(image)
    predictor = build_predictor(tiny(2, global_context="tile", context_tile=700), FLOAT)
    state = predictor.prepare(source)
    block = Window(300, 200, 500, 400)  # crosses the cores' borders at 512 on both axes
    got = predictor.predict_block(source, state, block)
    for tile in state.tiles:
        part = tile.core.intersection(block)
        if part is None:
            continue
        alone = predictor.predict_block(source, predictor.prepare(source), part)
        np.testing.assert_allclose(got[(slice(None), *part.relative_to(block).slices)], alone, atol=1e-5)


def test_predict_with_the_tile_policy_writes_the_whole_mask(tmp_path):
    import tifffile

    image = (scene(1100, 700, seed=3) * 255).astype(np.uint8)
    model = tiny(2)
    tiled = predict(
        model,
        image,
        tmp_path / "tiled.tif",
        info=INFO,
        progress=False,
        options={"global_context": "tile", "context_tile": 700},
    )
    plain = predict(model, image, tmp_path / "image.tif", info=INFO, progress=False)
    a, b = tifffile.imread(tiled.mask_path), tifffile.imread(plain.mask_path)
    assert a.shape == b.shape == (1100, 700)
    assert 0 < (a != b).mean() < 1  # the policies differ, but not everywhere


def test_tiles_must_hold_whole_patches():
    with pytest.raises(ConfigError, match="context_tile must be larger than size_p=128 .*or 0"):
        tiny(2, global_context="tile", context_tile=128)


def test_the_tile_side_defaults_to_the_recorded_training_scenes_then_the_paper():
    model = tiny(2, global_context="tile")
    assert model.options["context_tile"] == 0
    assert GLNetTilePredictor(model, FLOAT).context_tile == 2448  # nothing recorded: the paper's scenes
    model.scene_side.fill_(700)
    assert GLNetTilePredictor(model, FLOAT).context_tile == 700
    assert GLNetTilePredictor(model.with_inference_options(context_tile=900), FLOAT).context_tile == 900
    model.scene_side.fill_(100)  # scenes smaller than a patch still give tiles that hold one
    assert GLNetTilePredictor(model, FLOAT).context_tile == 129


def test_checkpoints_from_before_the_scene_side_load_with_it_unknown():
    model = tiny(2)
    model.scene_side.fill_(1536)
    state = model.state_dict()
    del state["scene_side"]
    fresh = tiny(1)
    fresh.load_state_dict(state)  # strict: the pre-hook supplies the missing buffer
    assert int(fresh.scene_side) == 0 and fresh.stage == 2


def test_predict_with_the_recorded_scene_side_is_predict_with_that_tile(tmp_path):
    import tifffile

    image = (scene(1100, 700, seed=4) * 255).astype(np.uint8)
    model = tiny(2)
    explicit = predict(
        model,
        image,
        tmp_path / "explicit.tif",
        info=INFO,
        progress=False,
        options={"global_context": "tile", "context_tile": 700},
    )
    model.scene_side.fill_(700)
    recorded = predict(
        model, image, tmp_path / "recorded.tif", info=INFO, progress=False, options={"global_context": "tile"}
    )
    assert np.array_equal(tifffile.imread(explicit.mask_path), tifffile.imread(recorded.mask_path))
