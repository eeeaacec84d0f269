"""The Python entry points: ``train``, ``predict`` and ``evaluate``.

The CLI commands are thin wrappers over these, so scripts and notebooks get
the same behaviour (and the same errors) as the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, GigasegError
from .io.normalize import Normalization
from .io.sources import open_image
from .inference.stream import block_size_for
from .memory import parse_size

def load_model(model_or_checkpoint) -> tuple[torch.nn.Module, dict]:
    """(model, data info) from a model, a checkpoint file or a run folder."""
    from .train.checkpoint import model_from_checkpoint

    if isinstance(model_or_checkpoint, torch.nn.Module):
        return model_or_checkpoint, {}
    return model_from_checkpoint(model_or_checkpoint)


def predict(
    model_or_checkpoint,
    image,
    out: str | os.PathLike | None = None,
    *,
    max_memory: str | int | None = None,
    device: str = "cpu",
    precision: str = "32",
    overlay: bool = False,
    probabilities: bool = False,
    resume: bool = True,
    normalization: Normalization | None = None,
    info: dict | None = None,
    on_band=None,
    progress: bool = True,
):
    """Segment a whole image (path, array or ImageSource) into a tiled label-mask TIFF at ``out``.

    Memory stays bounded by ``max_memory`` whatever the image size. A killed
    run restarted with the same arguments resumes from the finished bands.
    ``info`` (class names, palette, normalisation) comes with a checkpoint; pass it
    when giving a model object. ``on_band(window, labels)`` sees each finished
    row band (to score it against a reference mask, say).
    """
    from .inference.stream import predict_image
    from .io.base import ImageSource

    budget = parse_size(max_memory) if max_memory is not None else None
    model, loaded_info = load_model(model_or_checkpoint)
    info = info if info is not None else loaded_info
    source = image if isinstance(image, ImageSource) else open_image(image, max_memory=budget)
    if normalization is None:
        normalization = (Normalization.from_dict(info["normalization"]) if "normalization" in info
                         else Normalization.for_image(source.channels, source.dtype))
    if source.channels != model.in_channels:
        raise ConfigError(f"{source.path or 'image'}: has {source.channels} channels, the model expects {model.in_channels}")
    model = model.to(device)
    predictor = model.whole_image_predictor(normalization, device=device, max_memory=budget, precision=precision)
    palette = np.asarray(info["palette"], dtype=np.uint8) if info.get("palette") else None
    if out is not None and Path(out).suffix.lower() not in (".tif", ".tiff"):
        out = Path(out) / f"{source.name}.tif"
    return predict_image(predictor, source, out, block_size=block_size_for(budget), palette=palette,
                         class_names=info.get("classes"), probabilities=probabilities, overlay=overlay,
                         resume=resume, on_band=on_band, progress=progress)


def evaluate(model_or_checkpoint, data, *, split: str = "val", max_memory: str | int | None = None,
             device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Stream every image of ``data``'s split through the predictor; per-class IoU, mIoU, F1, accuracy."""
    from .data.datasets import load_dataset
    from .inference.stream import predict_image
    from .metrics import ConfusionMatrix
    from .progress import progress_bar

    budget = parse_size(max_memory) if max_memory is not None else None
    model, info = load_model(model_or_checkpoint)
    dataset = load_dataset(data, split=split) if not hasattr(data, "classes") else data
    if len(dataset) == 0:
        raise GigasegError(f"{data}: the {split!r} split has no images")
    normalization = Normalization.from_dict(info["normalization"]) if "normalization" in info else None
    model = model.to(device)
    matrix = ConfusionMatrix(model.num_classes, ignore_index=dataset.ignore_index)
    with progress_bar(f"evaluate {split}", len(dataset), enabled=progress) as advance:
        for index in range(len(dataset)):
            sample = dataset[index]
            norm = normalization or Normalization.for_image(sample.image.channels, sample.image.dtype)
            predictor = model.whole_image_predictor(norm, device=device, max_memory=budget)

            def update(window, labels, sample=sample):
                matrix.update(labels, sample.mask.read(window)[..., 0])

            predict_image(predictor, sample.image, None, block_size=block_size_for(budget), on_band=update, progress=False)
            advance(1)
    exclude = getattr(dataset, "exclude_from_miou", ())
    return matrix.summary(class_names=list(dataset.classes), exclude=exclude)


def train(method: str, data, out: str | os.PathLike, *, encoder: str = "resnet50", pretrained=False,
          options: dict | None = None, settings=None, stage: str = "all", resume: bool = False,
          init: str | os.PathLike | None = None, val_split: str = "val") -> dict:
    """Train ``method`` on the dataset at ``data``; checkpoints and metrics go to ``out``.

    ``stage`` picks one of the method's stages by name (``"all"`` runs them in
    order); ``init`` starts from another run's checkpoint (how GLNet's stages
    hand over); ``resume`` continues this run exactly from ``out/last.ckpt``.
    """
    from .data.datasets import load_dataset
    from .models.registry import create_model
    from .train.checkpoint import load_checkpoint
    from .train.loop import Trainer
    from .train.recipe import TrainSettings

    settings = settings or TrainSettings()
    train_data = load_dataset(data, split="train")
    try:
        val_data = load_dataset(data, split=val_split)
    except GigasegError:
        val_data = None  # no validation split: train without validation
    first = train_data[0].image
    normalization = Normalization.for_image(first.channels, first.dtype)
    torch.manual_seed(settings.seed)  # the same seed gives the same initial weights
    model = create_model(method, encoder=encoder, num_classes=len(train_data.classes), in_channels=first.channels,
                         pretrained=pretrained, **(options or {}))
    if init is not None and not resume:
        payload = load_checkpoint(init)
        if payload["model"]["config"] != dict(model.config):
            raise ConfigError(f"{payload['path']}: was trained as {payload['model']['config']}, "
                              f"which differs from this run's {dict(model.config)}")
        model.load_state_dict(payload["model"]["state_dict"])
    stages = model.training_stages()
    if stage != "all":
        names = [s.name for s in stages]
        if stage not in names:
            raise ConfigError(f"{method} has no stage {stage!r}; its stages are {', '.join(names)} (or 'all')")
        stages = [s for s in stages if s.name == stage]
    run_config = {"data": str(data), "stage": stage, "init": None if init is None else str(init)}
    trainer = Trainer(model, stages, train_data, val_data, out, settings, normalization, run_config)
    return trainer.fit(resume=resume)
