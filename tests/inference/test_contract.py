"""The predictor contracts of each task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaseg.inference.contract import (
    ClassificationPredictor,
    DetectionPredictor,
    Detections,
    Predictor,
    SegmentationPredictor,
)
from gigaseg.io.array import ArraySource
from gigaseg.io.normalize import Normalization

NORM = Normalization.for_image(3, np.uint8)


def test_detections_are_checked_and_typed():
    found = Detections(boxes=[[10, 20, 30, 60], [0, 0, 5, 5]], scores=[0.9, 0.2], labels=[1, 0])
    assert len(found) == 2
    assert found.boxes.dtype == np.float32 and found.boxes.shape == (2, 4)
    assert found.scores.dtype == np.float32 and found.labels.dtype == np.int64
    assert len(Detections(boxes=np.zeros((0, 4)), scores=[], labels=[])) == 0
    with pytest.raises(ValueError, match="one each per object"):
        Detections(boxes=[[0, 0, 1, 1]], scores=[0.5, 0.6], labels=[0])
    with pytest.raises(ValueError, match="x0 <= x1"):
        Detections(boxes=[[5, 0, 1, 1]], scores=[0.5], labels=[0])


def test_each_task_contract_must_be_implemented():
    model = torch.nn.Conv2d(3, 2, 1)
    for contract in (SegmentationPredictor, ClassificationPredictor, DetectionPredictor):
        with pytest.raises(TypeError, match="abstract"):
            contract(model, NORM)


def test_shared_helpers_normalise_and_switch_to_eval():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Dropout())
    model.num_classes = 2
    predictor = Predictor(model.train(), NORM, sub_batch=0)
    assert not model.training and predictor.sub_batch == 1 and predictor.num_classes == 2
    pixels = np.full((4, 5, 3), 255, np.uint8)
    tensor = predictor.to_tensor(pixels)
    assert tensor.shape == (1, 3, 4, 5) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[0, :, 0, 0].numpy(), NORM.apply(pixels)[:, 0, 0])
    with Predictor(model, NORM, precision="bf16-mixed").autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_minimal_classifier_implements_its_contract():
    class Brightness(ClassificationPredictor):
        def predict(self, source):
            bright = float(source.read()[..., 0].mean() > 127)
            return np.array([1 - bright, bright], np.float32)

    model = torch.nn.Identity()
    model.num_classes = 2
    assert Brightness(model, NORM).predict(ArraySource(np.full((8, 8, 3), 200, np.uint8))).argmax() == 1
