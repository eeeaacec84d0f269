"""Memory figures of GLNet's passes, shared by its training recipe and its predictor.

The estimates combine shapes (a meta-device pass of the local encoder, the FPN's map sizes)
with coefficients calibrated on measured peaks; ``benchmarks/glnet_memory.py`` measures
them again against real runs.
"""

from __future__ import annotations

import numpy as np
import torch

from ...budget import leaf_output_bytes
from ...nn.encoders import Encoder
from .model import GLNet

__all__ = ["context_bytes", "encoder_bytes", "patch_bytes", "unit_bytes"]


def context_bytes(model: GLNet) -> int:
    """Bytes of one image's global context: the global maps at the sharing points and ps3.

    Stage 3 builds the merged local maps (as large again, without ps3) next to them while it
    prepares; that phase has no block buffers, so it peaks lower than a block does.

    Args:
        model: a GLNet.

    Returns:
        The float32 bytes of the maps ``prepare`` keeps for one image.
    """
    shapes = model.context_shapes()
    return 4 * sum(int(np.prod(s)) for point in ("c", "p", "ps1", "ps2", "ps3") for s in shapes[point])


def unit_bytes(model: GLNet) -> int:
    """Bytes of one lateral-width float32 map at the local branch's finest level, for one patch.

    Args:
        model: a GLNet.

    Returns:
        ``4 * lateral_channels * ceil(size_p / stride)^2``.
    """
    size_p = model.options["size_p"]
    side = -(-size_p // model.local_branch.encoder.reductions[0])
    return 4 * model.local_branch.fpn.lateral_convs[0].out_channels * side * side


def encoder_bytes(model: GLNet, training: bool) -> int:
    """Summed leaf-module outputs of the local encoder on one patch (meta-device shapes).

    Args:
        model: a GLNet.
        training: count as in training (every leaf output autograd keeps) or inference.

    Returns:
        Bytes.
    """
    size_p = model.options["size_p"]
    with torch.device("meta"):
        encoder = Encoder(
            model.encoder_name, in_channels=model.in_channels, out_indices=model.local_branch.encoder.out_indices
        )
    total, _ = leaf_output_bytes(encoder, (torch.zeros(1, model.in_channels, size_p, size_p),), training=training)
    return total


def patch_bytes(model: GLNet, training: bool) -> int:
    """Peak memory one patch adds to GLNet's local pass (and ensemble).

    Inference (no autograd, no concatenations built): 7 level-2 lateral maps, 10% of the
    encoder's summed leaf outputs and the upsampled logits. Training (the local branch's
    graph): 62% of the encoder's summed leaf outputs and 30 level-2 lateral maps (the FPN's
    concatenations, crops and resized maps autograd keeps). The coefficients are calibrated
    on the peak resident memory of processes running 1, 2 and 4 patches.

    Args:
        model: a GLNet.
        training: the training pass (with its graph) or the inference pass.

    Returns:
        Bytes per patch.
    """
    unit = unit_bytes(model)
    if training:
        return int(0.62 * encoder_bytes(model, True) + 30 * unit)
    size_p = model.options["size_p"]
    return int(7 * unit + 0.1 * encoder_bytes(model, False) + 4 * model.num_classes * size_p * size_p)
