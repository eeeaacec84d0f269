"""Memory figures of GLNet's passes, shared by its training recipe and its predictor.

The estimates combine shapes (a meta-device pass of the local encoder, the FPN's map sizes)
with coefficients calibrated on measured peaks; ``benchmarks/glnet_memory.py`` measures
them again against real runs.

At output stride 1 or 2 the full-resolution heads add terms taken from their own shapes
(:func:`head_bytes`, meta-device passes of the heads at one patch): without autograd the
peak of the tensors alive at once in the ensemble head (``gigaseg.budget.peak_live_bytes``,
times ``gigaseg.budget.INFERENCE_WORKSPACE_FACTOR``) and the patch's stride-2 map, which stays
alive through the local pass; with autograd the heads' graphs (their leaf-module outputs,
``gigaseg.budget.leaf_output_bytes``, plus 20% as ``gigaseg.budget.training_estimate`` counts,
the concatenations their convolutions keep, and the focal loss's maps at the logits'
resolution). At output stride 4 every term is 0, so the paper's figures are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...budget import INFERENCE_WORKSPACE_FACTOR, leaf_output_bytes, peak_live_bytes
from ...nn.decoders import FullResolutionHead
from ...nn.encoders import Encoder
from .model import GLNet, head_logits

__all__ = ["context_bytes", "encoder_bytes", "head_bytes", "patch_bytes", "skip_bytes", "unit_bytes"]

#: float32 maps of ``num_classes`` channels a focal loss keeps per logit pixel (log-softmax and its gradient)
LOSS_MAPS = 2
#: autograd's bookkeeping on top of the leaf-module outputs (as ``gigaseg.budget.training_estimate``)
AUTOGRAD_FACTOR = 1.2


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


def _local_shapes(model: GLNet) -> tuple[tuple[int, int], tuple[int, ...] | None]:
    """The local encoder's c2 size ``(h, w)`` and stride-2 map shape ``(C, h2, w2)`` (None without one) at one patch."""
    size_p = model.options["size_p"]
    encoder = model.local_branch.encoder
    with torch.device("meta"):
        probe = Encoder(
            model.encoder_name,
            in_channels=model.in_channels,
            out_indices=encoder.out_indices,
            stride2=encoder.stride2_channels is not None,
        ).eval()
        with torch.no_grad():
            skip, c = probe.forward_with_stride2(torch.zeros(1, model.in_channels, size_p, size_p))
    return tuple(c[0].shape[-2:]), (None if skip is None else tuple(skip.shape[1:]))


def skip_bytes(model: GLNet) -> int:
    """Bytes of one patch's stride-2 encoder map, which a full-resolution ensemble head keeps through the local pass.

    Args:
        model: a GLNet.

    Returns:
        The float32 bytes of the map; 0 at output stride 4 or when the encoder has no
        stride-2 level (the head makes its own from the pixels).
    """
    if not isinstance(model.ensemble, FullResolutionHead):
        return 0
    _, skip = _local_shapes(model)
    return 0 if skip is None else 4 * int(np.prod(skip))


class _HeadPass(nn.Module):
    """A head's pass on concatenated 1/4 maps the way GLNet runs it (:func:`head_logits`), for meta-device estimates."""

    def __init__(self, head: FullResolutionHead):
        super().__init__()
        self.head = head

    def forward(self, image: torch.Tensor, skip: torch.Tensor | None, *features: torch.Tensor) -> torch.Tensor:
        return head_logits(self.head, list(features), image, skip)


def head_bytes(model: GLNet, head: str, training: bool) -> int:
    """Memory one patch adds for one of GLNet's full-resolution heads (0 at output stride 4).

    Taken from the head's shapes at one ``size_p`` patch on the meta device (see the module
    docstring). Inference: the peak of the tensors the head's pass (without concatenations,
    :func:`~gigaseg.methods.glnet.model.head_logits`) keeps alive at once, logits included,
    times ``INFERENCE_WORKSPACE_FACTOR``, plus the patch's stride-2 map (:func:`skip_bytes`).
    Training: its leaf-module outputs plus 20%, the concatenations its convolutions keep for
    the backward pass (the 1/4 input of the ensemble's, the stride-2 and full-resolution
    fusions), and ``LOSS_MAPS`` float32 maps of the logits' shape for its focal loss.

    Args:
        model: a GLNet.
        head: ``"ensemble"`` (its input is ``concat(ps3_local, crop of ps3_global)``) or
            ``"local"`` (the local branch's own head, on the local ps3).
        training: the head's graph (training) or its inference pass.

    Returns:
        Bytes per patch.

    Raises:
        ValueError: ``head`` is neither ``"ensemble"`` nor ``"local"``.
    """
    modules = {"ensemble": model.ensemble, "local": model.local_branch.head}
    if head not in modules:
        raise ValueError(f"head must be 'ensemble' or 'local', got {head!r}")
    module = modules[head]
    if not isinstance(module, FullResolutionHead):
        return 0
    size_p = model.options["size_p"]
    c2, skip = _local_shapes(model)
    merged = model.local_branch.fpn.merged_channels
    parts = 2 if head == "ensemble" else 1
    features = [torch.zeros(1, merged, *c2, device="meta") for _ in range(parts)]
    image = torch.zeros(1, model.in_channels, size_p, size_p, device="meta")
    skip_map = None if skip is None else torch.zeros(1, *skip, device="meta")
    inputs = (image, skip_map, *features)
    skip_side = skip[1:] if skip is not None else (-(-size_p // 2),) * 2
    logits = size_p * size_p if module.output_stride == 1 else int(np.prod(skip_side))
    if not training:
        live = peak_live_bytes(_HeadPass(module), inputs)
        return int(INFERENCE_WORKSPACE_FACTOR * live) + skip_bytes(model)
    leaves, _ = leaf_output_bytes(_HeadPass(module), inputs, training=True)
    cats = module.fuse2[0].in_channels * int(np.prod(skip_side))
    if parts > 1:
        cats += module.reduce[0].in_channels * int(np.prod(c2))
    if module.fuse1 is not None:
        cats += module.fuse1[0].in_channels * size_p * size_p
    return int(AUTOGRAD_FACTOR * leaves) + 4 * cats + 4 * LOSS_MAPS * model.num_classes * logits


def patch_bytes(model: GLNet, training: bool) -> int:
    """Peak memory one patch adds to GLNet's local pass (and ensemble).

    Inference (no autograd, no concatenations built): 7 level-2 lateral maps, 10% of the
    encoder's summed leaf outputs and the upsampled logits. Training (the local branch's
    graph): 62% of the encoder's summed leaf outputs and 30 level-2 lateral maps (the FPN's
    concatenations, crops and resized maps autograd keeps). The coefficients are calibrated
    on the peak resident memory of processes running 1, 2 and 4 patches with the paper's
    heads. At output stride 1 or 2 the full-resolution heads' terms are added
    (:func:`head_bytes`): in inference the ensemble head's, in training the graphs of the
    local branch's head and the ensemble head.

    Args:
        model: a GLNet.
        training: the training pass (with its graph) or the inference pass.

    Returns:
        Bytes per patch.
    """
    unit = unit_bytes(model)
    if training:
        heads = head_bytes(model, "local", True) + head_bytes(model, "ensemble", True)
        return int(0.62 * encoder_bytes(model, True) + 30 * unit) + heads
    size_p = model.options["size_p"]
    base = int(7 * unit + 0.1 * encoder_bytes(model, False) + 4 * model.num_classes * size_p * size_p)
    return base + head_bytes(model, "ensemble", False)
