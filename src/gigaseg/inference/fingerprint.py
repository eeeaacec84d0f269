"""What a resumed prediction must share with the run it continues.

A killed ``gigaseg predict`` resumes from its finished bands. Those bands are only worth
keeping if the rerun would have produced the same ones: the same input image, the same
architecture and options, the same weights, the same normalisation, and the same block size
and precision (blocks change the seams; precision changes the numbers). The fingerprint
hashes all of that; the mask writer stores it with the bands and refuses to resume under a
different one. The input is identified by :func:`source_identity`.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

__all__ = ["HEAD_BYTES", "prediction_fingerprint", "source_identity"]

#: bytes at the start of an image file hashed into its identity (its header and first pixels)
HEAD_BYTES = 1 << 20
#: in-memory images up to this size are hashed whole; larger ones by a sample of rows
WHOLE_ARRAY_BYTES = 256 << 20


def source_identity(source) -> dict:
    """What identifies the image a prediction reads, so a resume never mixes two images.

    A file is identified by its resolved path, size, modification time and a hash of its first
    ``HEAD_BYTES`` bytes (header and first pixels); an in-memory array by its shape, dtype and
    a hash of its pixels (all of them up to ``WHOLE_ARRAY_BYTES``, else every k-th row); a view
    of another image (a crop, repeated channels) by its parent's identity and its own geometry.

    Args:
        source: an ``ImageSource``.

    Returns:
        A JSON-able dict.
    """
    parent = getattr(source, "parent", None)
    if parent is not None:
        window = getattr(source, "window", None)
        return {
            "view": type(source).__name__,
            "parent": source_identity(parent),
            "window": None if window is None else [window.top, window.left, window.height, window.width],
            "channels": source.channels,
        }
    path = getattr(source, "path", None)
    if path is not None and os.path.isfile(path):
        stat = os.stat(path)
        with open(path, "rb") as handle:
            head = hashlib.blake2b(handle.read(HEAD_BYTES), digest_size=16).hexdigest()
        return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head": head}
    array = np.ascontiguousarray(source.read()) if getattr(source, "array", None) is None else source.array
    digest = hashlib.blake2b(digest_size=16)
    step = max(1, -(-array.nbytes // WHOLE_ARRAY_BYTES))
    for row in range(0, array.shape[0], step):
        digest.update(np.ascontiguousarray(array[row]).tobytes())
    return {"shape": list(array.shape), "dtype": str(array.dtype), "pixels": digest.hexdigest(), "row_step": step}


def prediction_fingerprint(model: torch.nn.Module, **settings) -> str:
    """A hex digest of ``model``'s config and weights and the JSON-able ``settings``.

    Args:
        model: the network; its ``config`` attribute (else its class name) and every tensor of
            its state dict are hashed (meta tensors by shape only).
        **settings: what else shapes the prediction (normalisation, block size, precision);
            values JSON cannot encode are hashed as ``str(value)``.

    Returns:
        A 32-character hex string (BLAKE2b, 16 bytes).
    """
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", {"class": type(model).__qualname__})
    digest.update(json.dumps({"config": config, "settings": settings}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if tensor.is_meta:  # a placeholder without data (e.g. GLNet's stage-3 copy before stage 3)
            digest.update(str(tuple(tensor.shape)).encode())
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        # raw bytes whatever the dtype (bf16 has no numpy equivalent)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()
