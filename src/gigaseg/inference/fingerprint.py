"""What a resumed prediction must share with the run it continues.

A killed ``gigaseg predict`` resumes from its finished bands. Those bands are only worth
keeping if the rerun would have produced the same ones: same architecture and options,
same weights, same normalisation, and the same block size and precision (blocks change
the seams; precision changes the numbers). The fingerprint hashes all of that; the mask
writer stores it with the bands and refuses to resume under a different one.
"""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["prediction_fingerprint"]


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
