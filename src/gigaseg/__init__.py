"""gigaseg: memory-efficient perception of ultra-high-resolution images.

    import gigaseg
    model = gigaseg.create_model("glnet", encoder="resnet50", num_classes=7)
    image = gigaseg.open_image("scene.tif")      # lazy: nothing decoded yet
    gigaseg.predict("runs/glnet", image, out="scene_mask.tif", max_memory="2GB")

Exports are resolved on first use, so ``import gigaseg`` does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "open_image": "gigaseg.io.sources",
    "Normalization": "gigaseg.io.normalize",
    "create_model": "gigaseg.methods.registry",
    "available_methods": "gigaseg.methods.registry",
    "build_predictor": "gigaseg.methods.registry",
    "train": "gigaseg.api",
    "predict": "gigaseg.api",
    "evaluate": "gigaseg.api",
    "load_model": "gigaseg.api",
    "load_dataset": "gigaseg.data.loader",
    "TrainSettings": "gigaseg.training.recipe",
    "ConfusionMatrix": "gigaseg.metrics",
    "Window": "gigaseg.geometry",
    "GigasegError": "gigaseg.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gigaseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
