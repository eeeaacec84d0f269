"""gigaseg: memory-efficient perception of ultra-high-resolution images.

    import gigaseg
    model = gigaseg.create_model("glnet", encoder="resnet50", num_classes=7)
    image = gigaseg.open_image("scene.tif")      # lazy: nothing decoded yet
    gigaseg.predict("runs/glnet", image, out="scene_mask.tif", max_memory="2GB")

The names below are the public API (``__all__``); everything else is internal and may move.

- Models: ``create_model``, ``available_methods``, ``load_model``; a method's parts from the
  registry: ``build_predictor`` (its whole-image predictor), ``training_stages`` (its recipe),
  ``method_spec`` (network class, recipe and predictor factory) and ``register`` (add a method,
  or re-register a method's class with another recipe or predictor).
- Whole-image work: ``train``, ``predict``, ``evaluate``; ``predict_image`` drives any
  predictor (``build_predictor``'s, or a wrapper of it) over an image, block by block;
  ``vectorize_mask`` streams a mask's polygons into a GeoPackage or GeoJSON file; ``view`` shows
  an image and its masks in the browser (a local tile server) and returns the page's URL.
- Data and checkpoints: ``open_image``, ``load_dataset``, ``Normalization``, ``Window``,
  ``save_checkpoint`` / ``load_checkpoint`` and ``data_info`` (the dataset facts a checkpoint keeps).
- Settings, scores, deployment, errors: ``TrainSettings``, ``ConfusionMatrix``,
  ``optimize_for_inference``, ``fold_batchnorm``, ``GigasegError``.

Measurement tools for the benchmarks live in :mod:`gigaseg.bench`.

Exports are resolved on first use, so ``import gigaseg`` does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first use)
_EXPORTS = {
    "open_image": "gigaseg.io.sources",
    "Normalization": "gigaseg.io.normalize",
    "create_model": "gigaseg.methods.registry",
    "available_methods": "gigaseg.methods.registry",
    "build_predictor": "gigaseg.methods.registry",
    "training_stages": "gigaseg.methods.registry",
    "method_spec": "gigaseg.methods.registry",
    "register": "gigaseg.methods.registry",
    "train": "gigaseg.api",
    "predict": "gigaseg.api",
    "evaluate": "gigaseg.api",
    "load_model": "gigaseg.api",
    "predict_image": "gigaseg.inference.stream",
    "vectorize_mask": "gigaseg.io.vector",
    "view": "gigaseg.viewer",
    "load_dataset": "gigaseg.data.loader",
    "save_checkpoint": "gigaseg.training.checkpoint",
    "load_checkpoint": "gigaseg.training.checkpoint",
    "data_info": "gigaseg.training.checkpoint",
    "TrainSettings": "gigaseg.training.recipe",
    "ConfusionMatrix": "gigaseg.metrics",
    "Window": "gigaseg.geometry",
    "optimize_for_inference": "gigaseg.export",
    "fold_batchnorm": "gigaseg.export",
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
