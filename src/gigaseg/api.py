"""The Python entry points: ``train``, ``predict`` and ``evaluate``.

The CLI commands are thin wrappers over these, so scripts and notebooks get
the same behaviour (and the same errors) as the command line.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, GigasegError, SplitNotFound
from .inference.planner import block_size_for
from .inference.stream import effective_block_size
from .io.normalize import Normalization
from .io.sources import open_image
from .memory import parse_size


def load_model(model_or_checkpoint) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A network and its dataset facts from a model, a checkpoint file or a run folder.

    Args:
        model_or_checkpoint: a network (returned as it is, with no facts), a checkpoint
            payload dict, a ``.ckpt`` file, or a run folder (its best, else last, checkpoint).

    Returns:
        ``(model, info)``: the network rebuilt from the checkpoint's configuration with its
        weights, in eval mode; ``info`` holds the class names, palette, ignore index and
        normalisation it was trained with.

    Raises:
        ConfigError: the file is missing or not a gigaseg checkpoint, names an unknown method, or
            holds non-finite weights (a diverged run's).
    """
    from .methods.registry import create_model
    from .training.checkpoint import load_checkpoint, non_finite_entry

    if isinstance(model_or_checkpoint, torch.nn.Module):
        return model_or_checkpoint, {}
    payload = model_or_checkpoint if isinstance(model_or_checkpoint, dict) else load_checkpoint(model_or_checkpoint)
    config = dict(payload["model"]["config"])
    config.pop("pretrained", None)  # the checkpoint's weights replace any: never reach for a hub at load
    model = create_model(**config)
    broken = non_finite_entry(payload["model"]["state_dict"])
    if broken is not None:
        where = payload.get("path", "checkpoint")
        raise ConfigError(
            f"{where}: weight {broken!r} holds NaN or infinite values (a diverged training run saved it); "
            f"retrain, or resume from a checkpoint of an epoch before the divergence"
        )
    model.load_state_dict(payload["model"]["state_dict"])
    return model.eval(), payload["data"]


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
    options: dict | None = None,
    vector: str | None = None,
    vector_options: dict | None = None,
    format: str = "tiff",  # noqa: A002 - the CLI's --format
    client=None,
    fast=False,
    backend: str = "torch",
    compile: bool = False,  # noqa: A002 - the CLI's --compile
):
    """Segment a whole image into a tiled label-mask TIFF at ``out`` (or an OME-Zarr store, or both).

    Memory stays bounded by ``max_memory`` whatever the image size. A killed
    run restarted with the same arguments resumes from the finished bands.

    ``image`` may also be a collection (a folder, a glob pattern, a list of paths): each image is
    predicted into the folder ``out`` and a bad image fails alone; a
    ``gigaseg.inference.distributed.CollectionResult`` is returned. With ``client`` (a
    ``dask.distributed.Client``) the rows of blocks of every image are predicted on its cluster's
    workers (``gigaseg.inference.distributed``): each worker loads the checkpoint itself (a file or
    run folder, not a model object) and opens the images by path, so both must be paths the workers
    see; the masks are the same bits as without a client.

    Args:
        model_or_checkpoint: a network, a checkpoint payload, a ``.ckpt`` file or a run
            folder (see :func:`load_model`).
        image: a path, an array or an ``ImageSource``; or a folder, glob pattern or list of paths.
        out: a ``.tif``/``.tiff`` path, or a folder that gets ``<image name>.tif``; None
            writes nothing (use ``on_band``).
        max_memory: the memory budget, bytes or a size like ``"2GB"``; None: no budget.
        device: where the network runs.
        precision: "32", "bf16-mixed" or "16-mixed".
        overlay: also write ``<stem>_overlay.png``.
        probabilities: also write the class probabilities as ``<stem>_probabilities.zarr``.
        resume: keep the finished bands of an interrupted run at ``out``; False starts afresh.
        normalization: how pixels are normalised; None takes the checkpoint's, else the
            default for the image's channels and dtype.
        info: class names, palette and normalisation; a checkpoint brings its own, so pass
            it when giving a model object.
        on_band: ``on_band(window, labels)`` sees each finished row band (to score it against
            a reference mask, say).
        progress: show a progress bar (on a terminal).
        options: changes the model's inference options for this prediction
            (``model.inference_options``: e.g. MagNet's ``fast_patches``, the patch baseline's
            ``overlap``).
        vector: also write the mask's polygons next to it, ``"gpkg"`` (``<stem>.gpkg``) or
            ``"geojson"`` (``<stem>.geojson``), streamed from the finished mask
            (:func:`gigaseg.io.vector.vectorize_mask`); needs ``out``.
        vector_options: ``simplify``, ``min_area``, ``skip_classes`` for the polygons.
        format: ``"tiff"`` (the tiled, cloud-optimized GeoTIFF at ``out``), ``"ome-zarr"`` (an
            OME-NGFF label store ``<stem>.ome.zarr`` next to it, with the probabilities inside when
            asked for: ``gigaseg.io.omezarr``) or ``"tiff,ome-zarr"``.
        client: a ``dask.distributed.Client``: predict on its cluster (see above); None: in this process.
        fast: the fast path (``gigaseg.inference.fast``): True (BatchNorm folded, channels_last, the next
            block decoded in a background thread, sub-batches full across block borders), a dict of
            ``FastOptions`` fields, or False (the plain network, unless ``backend`` or ``compile`` ask
            for the fast path).
        backend: ``"torch"`` or ``"onnxruntime"`` (the method's patch networks in ONNX Runtime on the CPU;
            needs ``pip install 'gigaseg[onnx]'``; implies ``fast``).
        compile: ``torch.compile`` the patch networks (implies ``fast``).

    A detector (``model.task == "detection"``) writes its boxes instead of a mask: ``<name>.json``
    (COCO results: image id 1, the checkpoint's category ids) and ``<name>.geojson`` (box polygons
    in the image's map coordinates when it is georeferenced, else pixel coordinates), plus
    ``<name>_overlay.png`` (boxes on the overview) with ``overlay`` (``out``: a folder or a ``.json``
    path); ``probabilities``, ``vector``, ``ome-zarr``, the fast path and clusters are for segmentation.

    Returns:
        A ``PredictionResult``: the paths written, the image size, the time and block counts; for a
        detector, a ``gigaseg.inference.detections.DetectionResult`` (the detections and the files);
        for a collection, a ``CollectionResult`` (results and failures by image).

    Raises:
        ConfigError: a bad checkpoint, size or option, an image whose channel count differs
            from the model's, or a classification model.
        ImageReadError: the image cannot be read.
        BudgetError: ``max_memory`` is too small for the method.
        GigasegError: the bands at ``out`` were made by another model or settings (resume).
    """
    from .inference.fast import bf16_supported, check_precision, fast_options
    from .inference.stream import parse_formats, predict_image
    from .io.lock import output_lock

    formats = parse_formats(format)
    if vector is not None and "tiff" not in formats:
        raise ConfigError("polygons (vector=...) are made from the TIFF mask: add it (format='tiff,ome-zarr')")
    precision = check_precision(precision)
    if precision in ("bf16-mixed", "bf16") and not bf16_supported(device):
        notice(
            f"{device} has no native bfloat16 (AVX512-BF16, AMX or a bf16 GPU): bf16-mixed precision is emulated there"
        )
    fast = fast_options(fast, backend=backend, compile=compile)
    if client is not None or _is_collection(image):
        return _predict_many(
            model_or_checkpoint,
            image,
            out,
            client=client,
            max_memory=max_memory,
            device=device,
            precision=precision,
            overlay=overlay,
            probabilities=probabilities,
            resume=resume,
            normalization=normalization,
            info=info,
            progress=progress,
            options=options,
            vector=vector,
            vector_options=vector_options,
            formats=formats,
            fast=fast,
        )
    budget = parse_size(max_memory) if max_memory is not None else None
    model, loaded_info = load_model(model_or_checkpoint)
    if options:
        model = model.with_inference_options(**options)
    info = info if info is not None else loaded_info
    source, normalization = _open_for_prediction(model, info, image, budget, normalization)
    if getattr(model, "task", None) == "detection":
        unsupported = [
            name
            for name, asked in (
                ("probabilities", probabilities),
                ("vector", vector is not None),
                ("format ome-zarr", "ome-zarr" in formats),
                ("fast", fast is not None),
                ("on_band", on_band is not None),
            )
            if asked
        ]
        if unsupported:
            raise ConfigError(
                f"{model.method_name} is a detection method: it writes boxes (COCO results json, GeoJSON, "
                f"overlay), so {', '.join(unsupported)} do not apply"
            )
        return _predict_detections(model, info, source, normalization, out, budget, device, precision, overlay, resume)
    out = None if out is None else output_path(out, source)
    if vector is not None and out is not None:  # bad polygon settings fail before anything is predicted
        from .io.vector import check_polygon_options

        vector_path(out, vector)
        check_polygon_options(**(vector_options or {}))
    setup = _prediction_setup(model, info, source, normalization, budget, device, precision, fast)
    predictor, palette, block_size = setup.predictor, setup.palette, setup.block_size

    def run(producer: str | None):
        return predict_image(
            predictor,
            source,
            out,
            block_size=block_size,
            palette=palette,
            class_names=info.get("classes"),
            probabilities=probabilities,
            overlay=overlay,
            resume=resume,
            on_band=on_band,
            progress=progress,
            producer=producer,
            formats=formats,
        )

    if out is None:
        if vector is not None:
            raise ConfigError("polygons (vector=...) are made from the mask file: give out= as well")
        return run(None)
    with output_lock(out):
        result = run(setup.producer())
        if vector is not None:
            from .io.vector import vectorize_mask

            polygons = vectorize_mask(
                result.mask_path, vector_path(out, vector), format=vector, **(vector_options or {})
            )
            result.vector_path = polygons.path
        return result


def _predict_detections(
    model, info: dict, source, normalization, out, budget, device: str, precision: str, overlay, resume: bool
):
    """:func:`predict` of a detector: its boxes as ``<name>.json`` (COCO results) and ``<name>.geojson``.

    ``out`` is a folder (the image's name is added), a ``.json`` path or a mask path (``.tif``:
    the collection paths); None writes nothing. While it runs, the output is locked against a
    second process and the finished bands of a sliced prediction are kept beside it
    (``gigaseg.inference.partial_detections``), so a rerun with ``resume`` continues from them.
    Returns a ``gigaseg.inference.detections.DetectionResult``.
    """
    from .inference.detections import detection_outputs, predict_detections
    from .inference.fingerprint import prediction_fingerprint, source_identity
    from .inference.partial_detections import PartialDetections
    from .io.lock import output_lock
    from .methods.registry import build_predictor

    stem = None
    if out is not None:
        out = Path(out)
        if out.suffix.lower() in (".json", ".tif", ".tiff"):
            stem = out
        else:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"{out}: is a file, not a folder for the detections (give a folder or a .json path)")
            stem = out / source.name
        if source.path is not None:
            for path in detection_outputs(stem):
                if same_file(path, source.path):
                    raise ConfigError(f"{path}: is the input image itself; write the detections somewhere else (--out)")
    model = model.to(device)
    predictor = build_predictor(model, normalization, device=device, max_memory=budget, precision=precision)
    palette = np.asarray(info["palette"], dtype=np.uint8) if info.get("palette") else None
    classes = info.get("classes") or [str(i) for i in range(model.num_classes)]

    def run(partial=None):
        return predict_detections(
            predictor,
            source,
            stem,
            classes=classes,
            category_ids=info.get("category_ids"),
            palette=palette,
            overlay=overlay,
            partial=partial,
        )

    if stem is None:
        return run()
    json_path = detection_outputs(stem)[0]
    with output_lock(json_path):
        producer = prediction_fingerprint(
            model,
            normalization=normalization.to_dict(),
            precision=precision,
            views_per_pass=[predictor.sub_batch, getattr(getattr(predictor, "sliced", None), "sub_batch", None)],
            fill_batch=getattr(model, "fill_batch", None),
            input=source_identity(source),
        )
        partial = PartialDetections(
            json_path, producer=producer, height=source.height, width=source.width, resume=resume
        )
        return run(partial.open())


def _open_for_prediction(model, info: dict, image, budget: int | None, normalization: Normalization | None):
    """The image opened lazily as the network's channels, and the normalisation for its dtype.

    Args:
        model: the network.
        info: the checkpoint's dataset facts (its normalisation).
        image: a path, an array or an ``ImageSource``.
        budget: the memory budget in bytes (caps what a reader may decode at once), or None.
        normalization: the normalisation given by the caller; None takes the checkpoint's, else
            the default for the image.

    Returns:
        ``(source, normalization)``.

    Raises:
        ImageReadError: the image cannot be read.
        ConfigError: its channels do not fit the model, or a float image out of [0, 1].
    """
    from .io.base import ImageSource

    source = image if isinstance(image, ImageSource) else open_image(image, max_memory=budget)
    source = _match_channels(source, model.in_channels)
    if normalization is None:
        normalization = (
            Normalization.from_dict(info["normalization"])
            if "normalization" in info
            else Normalization.for_image(source.channels, source.dtype)
        )
    return source, _normalization_for(normalization, source)


def _prediction_setup(
    model, info: dict, source, normalization: Normalization, budget, device: str, precision: str, fast=None
):
    """The predictor of ``model`` for ``source`` and what a prediction of it is written with.

    Args:
        model: the network.
        info: the checkpoint's dataset facts (class names, palette).
        source: the opened image (:func:`_open_for_prediction`).
        normalization: its normalisation.
        budget: the memory budget in bytes, or None.
        device: where the network runs.
        precision: "32", "bf16-mixed" or "16-mixed".
        fast: a ``gigaseg.inference.fast.FastOptions`` for the fast path, or None.

    Returns:
        A ``gigaseg.inference.distributed.PredictionSetup`` (its fingerprint covers the weights,
        options, normalisation, block size, precision, the fast path's options and the image's identity).

    Raises:
        ConfigError: a classification model.
        BudgetError: ``budget`` is too small for the method.
    """
    from .inference.contract import SegmentationPredictor
    from .inference.distributed import PredictionSetup
    from .inference.fingerprint import prediction_fingerprint, source_identity
    from .methods.registry import build_predictor

    model = model.to(device)
    predictor = build_predictor(model, normalization, device=device, max_memory=budget, precision=precision, fast=fast)
    if not isinstance(predictor, SegmentationPredictor):
        raise ConfigError(
            f"{model.method_name} is a {model.task} method: it gives one class per image, not a "
            f"mask (use gigaseg evaluate, or gigaseg.build_predictor(...).predict(image))"
        )
    palette = np.asarray(info["palette"], dtype=np.uint8) if info.get("palette") else None
    block_size = effective_block_size(predictor, block_size_for(budget))

    def fingerprint() -> str:
        extra = {} if fast is None else {"fast": fast.to_dict()}  # the plain path's fingerprint as before
        return prediction_fingerprint(
            model,
            normalization=normalization.to_dict(),
            block_size=block_size,
            precision=precision,
            input=source_identity(source),
            **extra,
        )

    return PredictionSetup(predictor, source, block_size, palette, info.get("classes"), fingerprint)


@dataclass(frozen=True)
class CheckpointJob:
    """How a Dask worker sets up the prediction of an image (``gigaseg.inference.distributed.PredictionJob``).

    Picklable and hashable: the workers receive it with every task and key their caches on it.

    Attributes:
        checkpoint: the checkpoint file (a run folder's best, else last, as resolved by the client).
        stamp: the file's ``(size, mtime_ns)`` when the prediction started: a worker refuses a file
            that changed since (another model would write into the same masks).
        options: the inference options, as JSON (sorted keys).
        max_memory: the memory budget of each worker, in bytes, or None.
        device: where the network runs.
        precision: "32", "bf16-mixed" or "16-mixed".
        normalization: the normalisation given to :func:`predict`, as JSON; None for the checkpoint's.
        fast: the fast path's options (``gigaseg.inference.fast.FastOptions``) as JSON; None: the plain path.
    """

    checkpoint: str
    stamp: tuple[int, int]
    options: str = "{}"
    max_memory: int | None = None
    device: str = "cpu"
    precision: str = "32"
    normalization: str | None = None
    fast: str | None = None

    def setup(self, image: str):
        """Open ``image`` and build its predictor, with the model this process loaded once.

        Args:
            image: the image's path.

        Returns:
            Its ``PredictionSetup``.
        """
        import json

        model, info = _worker_model(self.checkpoint, self.stamp, self.options, self.device)
        given = None if self.normalization is None else Normalization.from_dict(json.loads(self.normalization))
        source, normalization = _open_for_prediction(model, info, image, self.max_memory, given)
        fast = None
        if self.fast is not None:
            from .inference.fast import FastOptions

            fast = FastOptions(**json.loads(self.fast))
        return _prediction_setup(model, info, source, normalization, self.max_memory, self.device, self.precision, fast)


@functools.lru_cache(maxsize=2)
def _worker_model(checkpoint: str, stamp: tuple[int, int], options: str, device: str):
    """The network of ``checkpoint`` with ``options``, loaded once per process (and ``stamp``)."""
    import json

    stat = os.stat(checkpoint)
    if (stat.st_size, stat.st_mtime_ns) != tuple(stamp):
        raise ConfigError(f"{checkpoint}: the checkpoint changed after the prediction started; rerun it")
    model, info = load_model(checkpoint)
    if json.loads(options):
        model = model.with_inference_options(**json.loads(options))
    return model.to(device), info


def _checkpoint_file(model_or_checkpoint) -> Path:
    """The checkpoint file workers load: a ``.ckpt`` as it is, a run folder's best, else last."""
    if not isinstance(model_or_checkpoint, (str, os.PathLike)):
        raise ConfigError(
            "distributed prediction (client=...) needs a checkpoint file or run folder, which every worker "
            "loads itself; save the model with gigaseg.save_checkpoint first"
        )
    path = Path(model_or_checkpoint)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / name).is_file():
                return (path / name).resolve()
    return path.resolve()


def _is_collection(image) -> bool:
    """Whether ``image`` names several images: a list, a folder of images, or a glob pattern."""
    import glob

    if isinstance(image, (list, tuple)):
        return True
    if not isinstance(image, (str, os.PathLike)):
        return False
    text = os.fspath(image)
    if os.path.isdir(text):
        return not _has_image_suffix(text)  # a folder named like an image is refused as one
    return not os.path.lexists(text) and glob.has_magic(text)


def _has_image_suffix(path: str) -> bool:
    from .io.pillow import PILLOW_SUFFIXES
    from .io.tiff import TIFF_SUFFIXES

    return path.lower().rstrip("/").endswith(TIFF_SUFFIXES + PILLOW_SUFFIXES)


def image_inputs(inputs) -> list[str]:
    """The image files that prediction inputs name, in order.

    Args:
        inputs: a path, or a list of them; each is an image file (kept as it is, even when missing:
            it then fails alone), a folder (its image files, sorted; a folder whose own name has an
            image suffix is taken as an image, and refused as one) or a glob pattern (its matches, sorted).

    Returns:
        The image paths.

    Raises:
        ConfigError: a folder without images, or a pattern that matches nothing.
    """
    import glob

    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    images: list[str] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isdir(text) and not _has_image_suffix(text):
            found = sorted(
                str(p) for p in Path(text).iterdir() if not p.name.startswith(".") and _has_image_suffix(p.name)
            )
            if not found:
                raise ConfigError(f"{text}: a folder with no images (.tif, .tiff, .png, .jpg, ...)")
            images += found
        elif not os.path.lexists(text) and glob.has_magic(text):
            found = sorted(glob.glob(text))
            if not found:
                raise ConfigError(f"{text}: no file matches this pattern")
            images += found
        else:
            images.append(text)
    return images


def planned_outputs(images: list[str], out_dir: Path) -> list[Path]:
    """The mask each input image gets in ``out_dir``, checked before anything is predicted.

    Args:
        images: the input image paths, in order.
        out_dir: the output folder.

    Returns:
        ``out_dir / "<stem>.tif"`` per image (``gigaseg.io.base.output_stem``: the whole file name
        minus its image extension); its OME-Zarr store is ``<stem>.ome.zarr``.

    Raises:
        ConfigError: ``out_dir`` is a file; two inputs would write one mask; or a mask (or store)
            would be written over one of the inputs.
    """
    from .io.base import output_stem
    from .io.omezarr import ome_zarr_path

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: --out must be a folder, and this is a file")
    outputs: list[Path] = []
    first: dict[str, str] = {}
    for image in images:
        out = out_dir / f"{output_stem(image)}.tif"
        key = os.path.realpath(out)  # stops at a loop of links (Path.resolve raises before Python 3.13)
        if key in first:
            raise ConfigError(
                f"{image} and {first[key]}: would both be written to {out}; predict them into different folders"
            )
        first[key] = image
        outputs.append(out)
    for out in outputs:
        for image in images:
            for path in (out, ome_zarr_path(out)):
                if same_file(path, image):
                    raise ConfigError(f"{path}: is the input image {image} itself; choose another --out")
    return outputs


def _predict_many(model_or_checkpoint, image, out, *, client, formats, vector, vector_options, **settings):
    """:func:`predict` of a collection, or of anything on a Dask cluster (``client``); see there."""
    import json

    from .inference.distributed import CollectionResult, ImageTask, predict_collection
    from .io.lock import output_lock

    if out is None:
        raise ConfigError("predicting a collection, or on a cluster, needs out=: the folder of the masks")
    images = image_inputs(image)
    if not _is_collection(image) and Path(out).suffix.lower() in (".tif", ".tiff"):
        masks = [Path(out)]
        planned_outputs(images, Path(out).parent)  # the same checks against the input
    else:
        masks = planned_outputs(images, Path(out))
    if vector is not None:
        from .io.vector import check_polygon_options

        check_polygon_options(**(vector_options or {}))
    if client is None:
        outcome = CollectionResult()
        model, info = load_model(model_or_checkpoint)  # once; a bad checkpoint fails before any image
        settings["info"] = settings["info"] if settings["info"] is not None else info
        for path, mask in zip(images, masks, strict=True):
            try:
                outcome.results[path] = predict(
                    model,
                    path,
                    mask,
                    format=",".join(formats),
                    vector=vector,
                    vector_options=vector_options,
                    **settings,
                )
            except (GigasegError, OSError) as error:
                outcome.failures[path] = error
        return outcome
    checkpoint = _checkpoint_file(model_or_checkpoint)
    model, _ = load_model(checkpoint)  # a bad checkpoint or option fails here, before any worker starts
    if getattr(model, "task", None) == "detection":
        raise ConfigError(f"{model.method_name} is a detection method: detect in one process (no cluster)")
    options = settings["options"] or {}
    model.with_inference_options(**options)
    del model
    stat = checkpoint.stat()
    normalization = settings["normalization"]
    job = CheckpointJob(
        str(checkpoint),
        (stat.st_size, stat.st_mtime_ns),
        json.dumps(options, sort_keys=True, default=str),
        parse_size(settings["max_memory"]) if settings["max_memory"] is not None else None,
        settings["device"],
        settings["precision"],
        None if normalization is None else json.dumps(normalization.to_dict(), sort_keys=True),
        None if settings["fast"] is None else json.dumps(settings["fast"].to_dict(), sort_keys=True),
    )
    tasks = [
        ImageTask(
            str(Path(path).resolve()) if os.path.exists(path) else path,
            str(mask.resolve()),
            formats,
            settings["probabilities"],
            settings["overlay"],
            settings["resume"],
            None
            if vector is None
            else (vector, str(vector_path(mask, vector).resolve()), tuple(sorted((vector_options or {}).items()))),
        )
        for path, mask in zip(images, masks, strict=True)
    ]
    outcome = predict_collection(
        client, job, tasks, progress=settings["progress"], lock=output_lock, on_notice=lambda m: notice(m)
    )
    # keyed by the paths as given
    names = {task.image: path for task, path in zip(tasks, images, strict=True)}
    outcome.results = {names[k]: v for k, v in outcome.results.items()}
    outcome.failures = {names[k]: v for k, v in outcome.failures.items()}
    if not _is_collection(image):  # one image on a cluster: its result, or its error
        if outcome.failures:
            raise next(iter(outcome.failures.values()))
        return next(iter(outcome.results.values()))
    return outcome


def output_path(out: str | os.PathLike, source) -> Path:
    """The mask file a prediction of ``source`` writes for ``out``, checked against the input.

    Args:
        out: a ``.tif``/``.tiff`` path, or a folder (made if missing) that gets ``<image name>.tif``.
        source: the image (an ``ImageSource``).

    Returns:
        The mask's path.

    Raises:
        ConfigError: the mask, its overlay or its probabilities would be written over the input
            image itself, or ``out`` names an existing file that is not a TIFF mask's place (a folder
            was meant but a file is there).
    """
    out = Path(out)
    if out.suffix.lower() in (".tif", ".tiff"):
        mask = out
    else:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out}: is a file, not a folder for the masks (give a folder or a .tif path)")
        mask = out / f"{source.name}.tif"
    if mask.parent.exists() and not mask.parent.is_dir():
        raise ConfigError(f"{mask.parent}: is a file, not a folder for the masks")
    if source.path is not None:
        outputs = (
            mask,
            mask.with_name(f"{mask.stem}_overlay.png"),
            mask.with_name(f"{mask.stem}_probabilities.zarr"),
            vector_path(mask, "gpkg"),
            vector_path(mask, "geojson"),
        )
        for path in outputs:
            if same_file(path, source.path):
                raise ConfigError(f"{path}: is the input image itself; write the mask somewhere else (--out)")
    return mask


def vector_path(mask: str | os.PathLike, fmt: str) -> Path:
    """Where ``predict(..., vector=fmt)`` writes the polygons of ``mask``.

    Args:
        mask: the mask's path.
        fmt: ``"gpkg"`` or ``"geojson"``.

    Returns:
        ``<stem>.gpkg`` or ``<stem>.geojson`` next to the mask.

    Raises:
        ConfigError: an unknown format.
    """
    from .io.vector import VECTOR_FORMATS

    if fmt not in VECTOR_FORMATS:
        raise ConfigError(f"unknown vector format {fmt!r}; use one of {', '.join(VECTOR_FORMATS)}")
    mask = Path(mask)
    return mask.with_name(f"{mask.stem}{VECTOR_FORMATS[fmt][1]}")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file, following links.

    Args:
        a: a path (it need not exist yet).
        b: another path.

    Returns:
        ``os.path.samefile`` when both exist; otherwise whether their resolved paths are equal
        (``os.path.realpath``, which stops at a loop of links instead of raising).
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _match_channels(source, channels: int, notify: bool = True):
    """``source`` as the network's channels: a grey image is repeated for a multi-band network.

    Args:
        source: the image.
        channels: the network's input channels.
        notify: emit the one-line notice when the channel is repeated.

    Returns:
        ``source``, or a ``RepeatedChannels`` view of a one-channel image (with a notice).

    Raises:
        ConfigError: any other mismatch of channel counts.
    """
    from .io.channels import RepeatedChannels

    if source.channels == channels:
        return source
    if source.channels == 1:
        if notify:
            notice(
                f"{source.path or 'image'}: a grey image; its channel is repeated for the model's {channels} channels"
            )
        return RepeatedChannels(source, channels)
    raise ConfigError(f"{source.path or 'image'}: has {source.channels} channels, the model expects {channels}")


def _normalization_for(normalization: Normalization, source) -> Normalization:
    """``normalization`` with the scale of ``source``'s dtype, refusing floats out of [0, 1].

    Integer images are divided by their dtype's maximum whatever dtype the model was trained
    on. Float images pass as they are; a model trained on integer images expects them in
    [0, 1], so a float image whose first pixels lie outside (e.g. 0..255) is refused rather
    than segmented wrongly.

    Args:
        normalization: the checkpoint's (or given) normalisation.
        source: the image.

    Returns:
        The normalisation for ``source``'s dtype.

    Raises:
        ConfigError: a float image with values outside [0, 1] for a model trained on integers.
    """
    adapted = normalization.for_dtype(source.dtype)
    if np.issubdtype(source.dtype, np.floating) and normalization.scale != 1.0:
        side = min(512, source.height), min(512, source.width)
        top, left = (source.height - side[0]) // 2, (source.width - side[1]) // 2
        from .geometry import Window

        sample = source.read(Window(top, left, *side))
        low, high = float(np.nanmin(sample)), float(np.nanmax(sample))
        if low < -1e-3 or high > 1 + 1e-3:
            raise ConfigError(
                f"{source.path or 'image'}: a float image with values in [{low:g}, {high:g}], but the model was "
                f"trained on integer images and reads float pixels as values in [0, 1]; divide the image by "
                f"its maximum (e.g. 255) or save it as an integer type"
            )
    return adapted


def notice(message: str) -> None:
    """Tell the user something gigaseg decided for them (one line on stderr through the CLI).

    Args:
        message: the notice, naming the file it is about.
    """
    import warnings

    from .errors import GigasegNotice

    warnings.warn(message, GigasegNotice, stacklevel=3)


def evaluate(
    model_or_checkpoint,
    data,
    *,
    split: str = "val",
    max_memory: str | int | None = None,
    device: str = "cpu",
    progress: bool = True,
    options: dict[str, Any] | None = None,
    detail: bool = True,
) -> dict[str, Any]:
    """Stream every image of ``data``'s split through the predictor and score it.

    Args:
        model_or_checkpoint: a network, a checkpoint payload, a ``.ckpt`` file or a run folder.
        data: a dataset folder, or an opened dataset.
        split: the split to score.
        max_memory: the memory budget, bytes or a size like ``"2GB"``; None: no budget.
        device: where the network runs.
        progress: show a progress bar (on a terminal).
        options: changes inference options as in :func:`predict` (e.g. MagNet's ``refine="never"``).
        detail: also score segmentations for detail: boundary F1 and thin-structure recall
            (``gigaseg.metrics.DetailMetrics``), under ``detail``.

    Returns:
        ``ConfusionMatrix.summary``: per-class IoU, F1, precision and recall, mIoU, mean F1,
        pixel and balanced accuracy (the dataset's ``exclude_from_miou`` classes left out
        of the means); with ``detail``, ``detail``: ``DetailMetrics.summary`` (per-class and mean
        boundary F1 at a 2-px tolerance, thin-structure recall). Two-class models also get
        ``binary``: the positive class's (class 1) F1, IoU, sensitivity, specificity, balanced
        accuracy and likelihood ratios LR+ / LR- (``ConfusionMatrix.binary_metrics``; NaN as
        None, infinity as "inf"). Image
        classifiers (classification datasets) are scored per image: ``task``, ``accuracy``,
        ``balanced_accuracy``, per-class F1, the confusion matrix and ``predictions``
        (image name -> class index), with ``binary`` too for two classes. Detectors (detection
        datasets) are scored by COCO's evaluator: ``task``, ``AP`` (AP@[.50:.95]), ``AP50``,
        ``AP75``, ``AP_small`` / ``AP_medium`` / ``AP_large``, ``AR100`` and the other recalls, the
        counts, and ``per_class`` (AP and objects); None where COCO has nothing to score.

    Raises:
        GigasegError: the split has no images.
        ConfigError: a bad checkpoint or option, or a model whose task, class count or input
            channels differ from the dataset's (checked before any image is predicted).
        DatasetError: the dataset is malformed (or, for classifiers, has no labels).
        BudgetError: ``max_memory`` is too small for the method.
    """
    from .data.loader import load_dataset
    from .inference.stream import predict_image
    from .methods.registry import build_predictor
    from .metrics import ConfusionMatrix, DetailMetrics
    from .progress import progress_bar

    budget = parse_size(max_memory) if max_memory is not None else None
    model, info = load_model(model_or_checkpoint)
    if options:
        model = model.with_inference_options(**options)
    dataset = load_dataset(data, split=split) if not hasattr(data, "classes") else data
    if len(dataset) == 0:
        raise GigasegError(f"{data}: the {split!r} split has no images")
    normalization = Normalization.from_dict(info["normalization"]) if "normalization" in info else None
    model = model.to(device)
    _check_task(model, dataset, data)
    if model.task == "classification":
        return _evaluate_classification(model, dataset, normalization, split, device, budget, progress)
    if model.task == "detection":
        return _evaluate_detection(model, dataset, normalization, split, device, budget, progress)
    matrix = ConfusionMatrix(model.num_classes, ignore_index=dataset.ignore_index)
    details = DetailMetrics(model.num_classes, ignore_index=dataset.ignore_index) if detail else None
    with progress_bar(f"evaluate {split}", len(dataset), enabled=progress) as advance:
        for index in range(len(dataset)):
            sample = dataset[index]
            image = _match_channels(sample.image, model.in_channels, notify=index == 0)
            norm = _normalization_for(normalization or Normalization.for_source(image), image)
            predictor = build_predictor(model, norm, device=device, max_memory=budget)

            def update(window, labels, sample=sample, height=image.height):
                target = sample.mask.read(window)[..., 0]
                matrix.update(labels, target)
                if details is not None:
                    details.update(window, labels, target, image_height=height)

            predict_image(predictor, image, None, block_size=block_size_for(budget), on_band=update, progress=False)
            advance(1)
    exclude = getattr(dataset, "exclude_from_miou", ())
    summary = matrix.summary(class_names=list(dataset.classes), exclude=exclude)
    if details is not None:
        summary["detail"] = details.summary(class_names=list(dataset.classes), exclude=exclude)
    if model.num_classes == 2:
        summary["binary"] = _json_binary(matrix.binary_metrics(positive=1))
    return summary


def _json_binary(metrics: dict) -> dict:
    """binary_metrics as strict JSON: NaN -> None, infinity -> "inf"."""

    def clean(value):
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value

    return {key: clean(value) for key, value in metrics.items()}


def _check_task(model, dataset, data) -> None:
    """Check, before any image is predicted, that ``dataset`` suits ``model``.

    A classifier needs a classification dataset, a detector a detection one and a segmenter a
    segmentation one; the class counts must be equal and the images (the first one's header: a
    dataset checks that its images agree) must have the model's channels. Raises a one-line ``ConfigError`` naming the
    dataset and both values.
    """
    from .data.base import image_layout
    from .data.classification import ClassificationDataset
    from .data.detection import DetectionDataset

    where = getattr(dataset, "root", data)
    data_task = (
        "classification"
        if isinstance(dataset, ClassificationDataset)
        else "detection"
        if isinstance(dataset, DetectionDataset)
        else "segmentation"
    )
    if model.task != data_task:
        raise ConfigError(f"{where}: is a {data_task} dataset but {model.method_name} is a {model.task} method")
    classes = len(dataset.classes)
    if classes != model.num_classes:
        raise ConfigError(
            f"{where}: the dataset has {classes} classes but the model has {model.num_classes}; "
            f"a model scores only data with its own classes"
        )
    if len(dataset) > 0:
        with dataset[0] as sample:
            channels, dtype, name = sample.image.channels, sample.image.dtype, sample.name
        if channels != model.in_channels and channels != 1:  # a grey image is repeated (as in predict)
            raise ConfigError(
                f"{where}: its images have {image_layout(channels, dtype)} ({name}) but the model expects "
                f"{model.in_channels} channel{'' if model.in_channels == 1 else 's'}"
            )


def _evaluate_detection(model, dataset, normalization, split, device, budget, progress) -> dict[str, Any]:
    """Score a detector with COCO's evaluator: every image of the split detected whole, as ``predict`` does.

    Detections per image are scored up to COCO's 100, or up to the most objects an image of the
    split holds when that is more (``max_detections``). NaN scores (nothing of a size range) are None.
    """
    from .detection_metrics import DetectionEvaluator, max_detections_for
    from .methods.registry import build_predictor
    from .progress import progress_bar

    cap = max_detections_for([len(sample.labels) for sample in dataset.samples])
    evaluator = DetectionEvaluator(list(dataset.classes), max_detections=cap)
    with progress_bar(f"evaluate {split}", len(dataset), enabled=progress) as advance:
        for index in range(len(dataset)):
            sample = dataset[index]
            with sample.open() as opened:
                image = _match_channels(opened, model.in_channels, notify=index == 0)
                norm = _normalization_for(normalization or Normalization.for_source(image), image)
                detector = build_predictor(model, norm, device=device, max_memory=budget)
                found = detector.predict(image)
            evaluator.add(sample.name, sample.width, sample.height, sample.boxes, sample.labels, found, sample.iscrowd)
            advance(1)
    scores = evaluator.compute()

    def plain(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    counts = np.bincount(
        np.concatenate([sample.labels for sample in dataset.samples] + [np.zeros(0, np.int64)]),
        minlength=len(dataset.classes),
    )
    summary = {"task": "detection", "split": split}
    summary.update({key: plain(value) for key, value in scores.items() if key != "AP_per_class"})
    summary["per_class"] = {
        name: {"AP": plain(scores["AP_per_class"][name]), "objects": int(counts[i])}
        for i, name in enumerate(dataset.classes)
    }
    return summary


def _evaluate_classification(model, dataset, normalization, split, device, budget, progress) -> dict[str, Any]:
    """Score an image classifier: one prediction per image of the split."""
    from .methods.registry import build_predictor
    from .metrics import ConfusionMatrix
    from .progress import progress_bar

    dataset.require_labels("evaluation")
    matrix = ConfusionMatrix(model.num_classes, ignore_index=None)
    predictions = {}
    with progress_bar(f"evaluate {split}", len(dataset), enabled=progress) as advance:
        for index in range(len(dataset)):
            with dataset[index] as sample:
                image = _match_channels(sample.image, model.in_channels, notify=index == 0)
                norm = _normalization_for(normalization or Normalization.for_source(image), image)
                classifier = build_predictor(model, norm, device=device, max_memory=budget)
                predicted = int(classifier.predict(image).argmax())
                matrix.update(np.array([predicted]), np.array([sample.label]))
                predictions[sample.name] = predicted
            advance(1)
    summary = matrix.summary(class_names=list(dataset.classes))
    summary.update({"task": "classification", "accuracy": summary["pixel_accuracy"], "predictions": predictions})
    if model.num_classes == 2:
        summary["binary"] = _json_binary(matrix.binary_metrics(positive=1))
    return summary


def train(
    method: str,
    data,
    out: str | os.PathLike,
    *,
    encoder: str | None = None,
    pretrained=False,
    options: dict | None = None,
    settings=None,
    stage: str = "all",
    resume: bool = False,
    init: str | os.PathLike | None = None,
    val_split: str = "val",
    force: bool = False,
) -> dict:
    """Train ``method`` on the dataset at ``data``; checkpoints and metrics go to ``out``.

    The normalisation is the default for the first training image's channels and dtype.
    Without a ``val_split`` split the run trains without validation. A folder that already
    holds a run (``last.ckpt``, ``best.ckpt`` or ``config.yaml``) is refused before anything
    else unless ``resume`` or ``force`` says what to do with it.

    Args:
        method: a registered method name ("glnet", "magnet", ...).
        data: the dataset folder (its "train" split is trained on).
        out: the run folder.
        encoder: the backbone; None: the method's default.
        pretrained: encoder weights: False, True (timm's from the hub) or a local weights file.
        options: method options for ``create_model``.
        settings: a ``TrainSettings``; None: the defaults.
        stage: one of the method's stages by name; ``"all"`` runs them in order.
        resume: continue this run exactly from ``out/last.ckpt``.
        init: start from another run's checkpoint (how GLNet's stages hand over); its
            architecture must equal this run's (inference options may differ). Ignored with ``resume``.
        val_split: the split validated on after every epoch.
        force: train over the run already in ``out`` (its files are overwritten as the new run
            writes its own).

    Returns:
        ``Trainer.fit``'s ``{"history": [...], "out_dir": ...}``.

    Raises:
        ConfigError: ``out`` already holds a run (without ``resume`` or ``force``), an unknown
            method, stage or option, a task mismatch, an ``init`` checkpoint of another
            architecture, or a resume that does not match.
        DatasetError: the training split is missing, empty or malformed, or the validation
            images' channels or dtype differ from the training images'.
        BudgetError: ``settings.max_memory`` is too small for a stage.
        TrainingDiverged: the loss, gradients or weights became non-finite; the checkpoints
            keep the last good epoch.
    """
    from .data.base import image_layout
    from .data.loader import load_dataset
    from .errors import DatasetError
    from .methods.registry import build_predictor, create_model, training_stages
    from .training.checkpoint import load_checkpoint
    from .training.loop import Trainer, check_run_folder
    from .training.recipe import TrainSettings

    # before anything is read or written (every process of a DDP run checks before they connect)
    check_run_folder(out, resume=resume, force=force)
    settings = settings or TrainSettings()
    train_data = load_dataset(data, split="train")
    if len(train_data) == 0:
        raise DatasetError(getattr(train_data, "root", data), "the 'train' split has no images")
    try:
        val_data = load_dataset(data, split=val_split)
    except SplitNotFound:
        val_data = None  # no validation split: train without validation (a broken one is an error)
    with train_data[0] as sample:
        channels, dtype = sample.image.channels, sample.image.dtype
    if val_data is not None and len(val_data) > 0:
        with val_data[0] as sample:  # the split itself checked that its images agree
            if (sample.image.channels, sample.image.dtype) != (channels, dtype):
                raise DatasetError(
                    sample.image.path or sample.name,
                    f"has {image_layout(sample.image.channels, sample.image.dtype)} but the 'train' split's "
                    f"images have {image_layout(channels, dtype)}; the {val_split!r} split needs the same",
                )
    normalization = Normalization.for_image(channels, dtype)
    torch.manual_seed(settings.seed)  # the same seed gives the same initial weights
    model = create_model(
        method,
        encoder=encoder,
        num_classes=len(train_data.classes),
        in_channels=channels,
        pretrained=pretrained,
        **(options or {}),
    )
    _check_task(model, train_data, data)
    if init is not None and not resume:
        payload = load_checkpoint(init)
        # inference options (GLNet's context_tile, say) do not shape the weights: this run keeps its own
        trained, wanted = model.architecture(payload["model"]["config"]), model.architecture()
        if trained != wanted:
            raise ConfigError(f"{payload['path']}: was trained as {trained}, which differs from this run's {wanted}")
        model.load_state_dict(payload["model"]["state_dict"])
    stages = training_stages(model)
    if stage != "all":
        names = [s.name for s in stages]
        if stage not in names:
            raise ConfigError(f"{method} has no stage {stage!r}; its stages are {', '.join(names)} (or 'all')")
        stages = [s for s in stages if s.name == stage]
    run_config = {"data": str(data), "stage": stage, "init": None if init is None else str(init)}
    trainer = Trainer(
        model,
        stages,
        train_data,
        val_data,
        out,
        settings,
        normalization,
        functools.partial(build_predictor, model),
        run_config,
    )
    return trainer.fit(resume=resume)
