"""The fcos predictor factory: whole or sliced by ``mode``, the model's tiling and merging options, the budget."""

import numpy as np
import pytest
import torch

from gigaseg.errors import BudgetError
from gigaseg.geometry import Detections
from gigaseg.inference.merge import MergeSettings
from gigaseg.inference.sliced import SlicedDetectionPredictor, WholeImageDetectionPredictor
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import Normalization
from gigaseg.methods.registry import build_predictor, create_model

NORM = Normalization.for_image(3, np.uint8)
TINY = {"fpn_channels": 32, "head_convs": 1, "input_size": 64, "crop_size": 64}


def tiny(**options):
    torch.manual_seed(0)
    return create_model("fcos", encoder="test_resnet", num_classes=2, **{**TINY, **options})


def test_whole_mode_builds_the_whole_image_predictor():
    predictor = build_predictor(tiny(score_threshold=0.0, image_max_detections=20), NORM)
    assert isinstance(predictor, WholeImageDetectionPredictor)
    assert predictor.size == 64 and predictor.score_threshold == 0.0 and predictor.max_detections == 20
    found = predictor.predict(ArraySource(np.random.default_rng(0).integers(0, 255, (150, 300, 3), np.uint8)))
    assert isinstance(found, Detections) and len(found) == 20
    assert found.boxes[:, 2].max() <= 300 and found.boxes[:, 3].max() <= 150
    assert found.boxes[:, 2].max() > 64  # scaled back from the 64 x 32 view


def test_sliced_mode_takes_the_tiling_and_merging_options():
    model = tiny(
        mode="sliced",
        tile_size=48,
        overlap_ratio=0.25,
        merge="nmm",
        merge_metric="ios",
        merge_threshold=0.4,
        class_agnostic=True,
        full_image_size=96,
    )
    predictor = build_predictor(model, NORM)
    assert isinstance(predictor, SlicedDetectionPredictor)
    assert (predictor.tile_size, predictor.overlap, predictor.full_image_size) == (48, 12, 96)
    assert predictor.merge == MergeSettings(method="nmm", metric="ios", threshold=0.4, class_agnostic=True)
    assert predictor.sub_batch == 4
    found = predictor.predict(ArraySource(np.zeros((100, 130, 3), np.uint8)))
    assert isinstance(found, Detections)


def test_the_budget_sizes_the_tiles_per_pass():
    model = tiny(mode="sliced", crop_size=512)
    # the process's own memory counts (more than 1 GB late in a full test run): find the smallest budget
    low, high = 1, 8192  # MB: the smallest budget that fits, by bisection
    while high - low > 4:
        middle = (low + high) // 2
        low, high = (low, middle) if _fits(model, middle * 2**20) else (middle, high)
    fixed = high
    small = build_predictor(model, NORM, max_memory=(fixed + 8) * 2**20)
    large = build_predictor(model, NORM, max_memory=(fixed + 64) * 2**20)
    assert 1 <= small.sub_batch < large.sub_batch <= 32 and large.block_size is not None
    with pytest.raises(BudgetError, match="too small for fcos prediction with 512-px tiles"):
        build_predictor(model, NORM, max_memory=2**20)
    with pytest.raises(BudgetError, match="too small for fcos prediction at 64 px"):
        build_predictor(tiny(), NORM, max_memory=2**20)


def _fits(model, budget):
    try:
        build_predictor(model, NORM, max_memory=budget)
    except BudgetError:
        return False
    return True
