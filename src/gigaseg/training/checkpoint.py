"""Self-describing checkpoints: everything needed to rebuild, use and resume a model.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(weights_only=True)``, and it is written atomically (a killed
save never leaves a truncated file under the final name). Weights that are not finite
(NaN or infinite: a run that diverged) are never saved.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, TrainingDiverged
from ..io.atomic import atomic_output

FORMAT = "gigaseg-checkpoint"
VERSION = 1


def data_info(dataset, normalization, class_frequencies=None) -> dict:
    """The dataset facts a model needs at prediction time (names, colours, normalisation), and what it was trained on.

    Args:
        dataset: the training dataset (``classes``, ``palette``, and the optional
            ``ignore_index`` (255 when absent), ``exclude_from_miou`` and ``category_ids``
            (a detection dataset's COCO category id of each class)).
        normalization: the ``Normalization`` the model was trained with.
        class_frequencies: each class's share of the training set's labelled pixels
            (``gigaseg.data.statistics.class_frequencies``), or None when not measured.

    Returns:
        classes, palette (nested uint8 lists), ignore_index, exclude_from_miou and
        normalization (its ``to_dict()``), all plain JSON-able values; plus
        ``category_ids`` when the dataset has them and ``class_frequencies`` (a list of floats,
        one per class) when given. Checkpoints
        without that key (older ones, or runs that did not measure it) read as unknown:
        ``data.get("class_frequencies")`` is None.

    Raises:
        ValueError: ``class_frequencies`` has not one finite, non-negative value per class.
    """
    info = {
        "classes": list(dataset.classes),
        "palette": np.asarray(dataset.palette, dtype=np.uint8).tolist(),
        "ignore_index": int(getattr(dataset, "ignore_index", 255)),  # detection datasets have none
        "exclude_from_miou": [int(c) for c in getattr(dataset, "exclude_from_miou", ())],
        "normalization": normalization.to_dict(),
    }
    if getattr(dataset, "category_ids", None) is not None:
        info["category_ids"] = [int(c) for c in dataset.category_ids]
    if class_frequencies is not None:
        frequencies = np.asarray(class_frequencies, dtype=np.float64).reshape(-1)
        if frequencies.size != len(info["classes"]) or not np.isfinite(frequencies).all() or (frequencies < 0).any():
            raise ValueError(
                f"class_frequencies must hold one finite, non-negative value per class ({len(info['classes'])}), "
                f"got {frequencies.tolist()}"
            )
        info["class_frequencies"] = [float(f) for f in frequencies]
    return info


def rng_state() -> dict:
    """The global random states of torch, numpy and Python, as checkpoint-safe values.

    Returns:
        A dict of tensors, numbers, strings and lists (loadable with ``weights_only=True``)
        for :func:`restore_rng`.
    """
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def restore_rng(state: dict) -> None:
    """Restore the global random states of torch, numpy and Python.

    Args:
        state: what :func:`rng_state` returned.
    """
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def non_finite_entry(state_dict: dict) -> str | None:
    """The first floating-point tensor of a state dict holding a NaN or an infinity.

    Args:
        state_dict: a module's ``state_dict()`` (weights and buffers).

    Returns:
        Its key, or None when every floating-point tensor is finite.
    """
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    data: dict,
    train_state: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically.

    Args:
        path: the file to write.
        model: a gigaseg network (its ``config`` rebuilds it; its state dict holds the weights).
        data: the dataset facts of :func:`data_info`.
        train_state: what resuming needs (optimiser, epoch, random states), or None.
        metrics: numbers to keep with the checkpoint (None: none).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TrainingDiverged: a weight or buffer of ``model`` is not finite; nothing is written (a
            previous file at ``path`` stays as it was).
    """
    state_dict = model.state_dict()
    key = non_finite_entry(state_dict)
    if key is not None:
        kept = "the file keeps its previous content" if Path(path).exists() else "nothing was written"
        raise TrainingDiverged(f"{path}: refusing to save non-finite weights ({key} is not finite); {kept}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"config": dict(model.config), "state_dict": state_dict},
        "data": data,
        "train": train_state,
        "metrics": metrics or {},
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file (or a run folder, taking its best, else last, checkpoint).

    Args:
        path: a ``.ckpt`` file or a run folder.

    Returns:
        The payload: format, version, model (config and state_dict), data, train, metrics, and
        path (the file actually read), all on the CPU.

    Raises:
        ConfigError: the folder has no checkpoint, the file is missing, or it is not a
            readable gigaseg checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise ConfigError(f"{path}: no best.ckpt or last.ckpt in this run folder")
    if not path.exists():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors of many kinds: all mean "not a checkpoint"
        raise ConfigError(f"{path}: not a readable gigaseg checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a gigaseg checkpoint")
    payload["path"] = str(path)
    return payload
