"""PatchGD with a global patch: the framework's networks for classification and segmentation,
and the downsampled-image classifier it is compared with.

The framework (PatchGD, and "Resource Efficient Perception for Vision Systems", arXiv
2405.07166) never holds a full-resolution activation map:

- ``theta1`` encodes each ``patch_size`` x ``patch_size`` patch of the image on its own;
- the encodings are assembled into a grid ``Z`` (an image cut into ``m x n`` patches, the
  last row/column zero-padded when a side is not a multiple of ``patch_size``);
- the *global patch*, the whole image downsampled to one patch (area averaging), is encoded
  by the same ``theta1`` for context;
- ``theta2`` predicts from ``Z`` fused with the global encoding.

Training fills ``Z`` for every patch without gradients, then for each of ``inner_iterations``
iterations re-encodes ``k`` sampled patches per image *with* gradients, writes them into
``Z`` and back-propagates theta2's loss; ``gigaseg.methods.patchgd.recipe`` runs these inner
iterations and sizes ``k`` and the no-grad sub-batch to a memory budget.

Networks:

``"patchgd_classifier"`` (:class:`PatchGDClassifier`)
    theta1 (:class:`PatchEncoder`): a timm encoder (``Encoder``, last feature level) + global
    average pooling + ``Linear(C, latent_dim)``: a patch -> a ``latent_dim`` vector. ``Z`` is
    ``(B, latent_dim, m, n)``. It is fused with the global latent ``g`` by ``fusion``. theta2
    (:class:`GridHead`): ``head_layers`` blocks of 3x3 conv (stride 2 while the grid is at
    least 4 wide, so a small grid is not reduced to nothing), BatchNorm, ReLU, dropout;
    global average pooling; linear -> class logits.

``"patchgd_segmenter"`` (:class:`PatchGDSegmenter`)
    theta1: segmentation_models_pytorch's U-Net (``theta1="unet"``) or DeepLabV3 on the
    timm encoder (``tu-<encoder>``) whose head outputs ``latent_channels`` channels at full
    patch resolution. ``Z`` is the patch outputs stitched to ``(B, latent_channels, H, W)``.
    The global patch's output is upsampled bilinearly to ``H x W`` and concatenated
    (``2 * latent_channels`` channels). theta2: one 1x1 conv -> class logits. For two
    classes with a single logit (``loss``), theta2 outputs ``l`` and the logits returned are
    ``(0, l)``, so softmax gives ``(1 - sigmoid(l), sigmoid(l))``; otherwise one logit per
    class. Because theta2 is 1x1, a block of the image is predicted exactly from the patches
    touching it plus the global patch.

``"downsampled_classifier"`` (:class:`DownsampledClassifier`)
    The same theta1 network on the whole image resized to ``input_size`` x ``input_size``,
    then ReLU, dropout and a linear layer: the baseline that must shrink its input to fit
    memory.

Options of both framework networks (defaults in brackets):

- ``patch_size`` (classifier 256, segmenter 128): the side of the patches and of the global
  patch, in pixels.
- ``global_patch`` (True): False drops the global patch, giving the framework without it
  (the other baseline).
- ``sampling_fraction`` (0.25): ``k = round(sampling_fraction x patches)`` (at least 1)
  patches per image re-encoded with gradients per inner iteration; a memory budget may cap
  ``k`` further.
- ``inner_iterations`` (4): inner iterations per mini-batch; their gradients accumulate
  into one optimiser step.
- ``global_norm`` (``"batch"``): the BatchNorm statistics theta1 uses on the global patch.
  Patches are always encoded in training mode (batch statistics, in the fill as in the
  inner iterations); the global patch gets a forward of its own, so it never shifts the
  patches' batch statistics. ``"batch"``: the global patches' own batch statistics (which
  also update the running ones); a single global patch (batch 1, where a small patch's
  deepest map would give BatchNorm one value per channel) uses the running statistics.
  ``"running"``: always the running statistics (:func:`running_statistics`), as at
  inference; the gradient then passes through normalisation statistics that lag the
  weights. ``"separate"``: as ``"batch"``, but the global patches keep running statistics
  of their own (:class:`GlobalStatistics`), which inference uses for the global patch while
  the patches use theirs; with ``"batch"`` both kinds update one set, and inference
  normalises each with a mix of the two.
- ``global_gradient`` (classifier ``"full"``, segmenter ``"balanced"``): how much of the
  loss's gradient reaches theta1 through the global patch. The loss depends on the global
  patch at every pixel (segmenter) or grid cell (classifier), while only the ``k``
  recomputed patches (a ``k / patches`` share) pass gradient to theta1 through ``Z``. With
  ``"full"`` (the paper's graph) theta1 therefore learns mostly from the downsampled image
  (``patches / k`` times more than from the full-resolution patches: 64x at 1024^2 with
  128-px patches and k = 1); ``"balanced"`` scales the global path's gradient by
  ``k / patches``; ``"none"`` detaches it. theta2 learns from the global features the same
  way in all three. The segmenter, whose loss reads the global features at every pixel,
  defaults to ``"balanced"``; the classifier keeps the paper's ``"full"``.
- ``global_dropout`` (0): in training, each image's global features are zeroed with this
  probability (per forward, so per inner iteration), without rescaling the kept ones.
  theta2 then has to predict from ``Z`` alone part of the time: on a small training set the
  global latent alone can identify the training images, and theta2 can learn to lean on it
  instead of the patches.

Options of the classifier: ``latent_dim`` (256, theta1's output and theta2's width),
``fusion`` (``"add"``: ``Z + g`` broadcast, the paper's choice for classification;
``"concat"``: ``2 * latent_dim`` channels), ``head_layers`` (2) and ``dropout`` (0.2) of
theta2. Options of the segmenter: ``latent_channels`` (8), ``theta1`` (``"unet"`` or
``"deeplabv3"``), ``encoder_depth`` (5, 1..5; ``patch_size`` must be a multiple of
``2 ** encoder_depth`` when theta1 needs divisible inputs), ``decoder_channels`` (the U-Net
decoder's widths, one per depth level; ``[]``: smp's default 256, 128, 64, 32, 16) and
``loss`` (``"auto"``: BCE + Dice on a single logit for two classes, CE + Dice otherwise;
``"bce_dice"``: two classes only; ``"ce_dice"``: one logit per class). Options of the
downsampled classifier: ``input_size`` (512), ``latent_dim`` (256), ``dropout`` (0.2).

Forward modes (all take normalised images ``x``, ``(B, C, H, W)``; ``global_view`` is the
whole image resized to ``patch_size`` — computed with ``F.interpolate(mode="area")``
when not given):

- ``model(x)``: every patch encoded in one pass (with gradients in training: the
  memory-hungry reference the training loop avoids); returns logits.
- ``model(x, global_view, latents=Z, indices=idx)``: the training step's inner
  iteration: the patches ``idx`` (``(B, k)`` row-major grid indices) are re-encoded with
  gradients and written into (a copy of) ``Z``; the classifier returns
  ``(logits, Z_updated)``, the segmenter ``logits``.
- ``model.fill(x, sub_batch)``: ``Z`` for every patch, ``sub_batch`` patches per pass,
  without gradients.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...nn.base import ClassificationModel, SegmentationModel
from ...nn.encoders import Encoder, PretrainedSpec
from ...nn.segmenters import smp_network

__all__ = [
    "DownsampledClassifier",
    "GlobalStatistics",
    "GridHead",
    "PatchEncoder",
    "PatchGDClassifier",
    "PatchGDSegmenter",
    "even_chunks",
    "grid_shape",
    "patch_at",
    "patch_windows",
    "running_statistics",
]

FUSIONS = ("add", "concat")
#: BatchNorm statistics theta1 uses on the global patch in training: its running statistics
#: ("running"), the global patches' own batch (``"batch"``, a forward of their own), or their own
#: batch with running statistics of their own for inference (``"separate"``)
GLOBAL_NORMS = ("running", "batch", "separate")
#: how much of the loss's gradient reaches theta1 through the global patch
GLOBAL_GRADIENTS = ("full", "balanced", "none")

THETA1_ARCHS = ("unet", "deeplabv3")
#: patches per no-grad theta1 pass (filling Z) without a memory budget, and at most
DEFAULT_FILL_BATCH = 16
MAX_FILL_BATCH = 64
SEG_LOSSES = ("auto", "bce_dice", "ce_dice")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` whose gradient is multiplied by ``factor`` on its way back.

    Args:
        x: any tensor.
        factor: the factor on the gradient; 1 returns ``x`` itself, 0 ``x.detach()``.

    Returns:
        A tensor equal to ``x``.
    """
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    return _ScaleGradient.apply(x, factor)


# ------------------------------------------------------------------------------- geometry


def grid_shape(height: int, width: int, patch: int) -> tuple[int, int]:
    """The patch grid covering an image.

    Args:
        height: the image's height in pixels.
        width: the image's width in pixels.
        patch: the patch side in pixels.

    Returns:
        (rows, cols) of ``patch``-px patches covering ``height x width`` (the last row and
        column padded past the border).
    """
    return math.ceil(height / patch), math.ceil(width / patch)


def patch_windows(indices: torch.Tensor | list[int], cols: int, patch: int) -> list[tuple[int, int]]:
    """Pixel corners of patches given by their row-major grid indices.

    Args:
        indices: grid indices (``row * cols + col``).
        cols: the grid's columns.
        patch: the patch side in pixels.

    Returns:
        One (top, left) pixel corner per index.
    """
    return [(int(i) // cols * patch, int(i) % cols * patch) for i in indices]


def patch_at(image: torch.Tensor, top: int, left: int, patch: int) -> torch.Tensor:
    """One patch of an image, zero-padded past the border.

    Args:
        image: ``(C, H, W)``.
        top: the patch's top row in pixels.
        left: the patch's left column in pixels.
        patch: the patch side in pixels.

    Returns:
        The ``(C, patch, patch)`` crop at (top, left).
    """
    crop = image[:, top : top + patch, left : left + patch]
    pad_h, pad_w = patch - crop.shape[-2], patch - crop.shape[-1]
    if pad_h or pad_w:
        crop = F.pad(crop, (0, pad_w, 0, pad_h))
    return crop


def gather_patches(x: torch.Tensor, indices: torch.Tensor, cols: int, patch: int) -> torch.Tensor:
    """The patches ``indices[b]`` of each image ``x[b]``, stacked.

    Args:
        x: images ``(B, C, H, W)``.
        indices: ``(B, k)`` row-major grid indices.
        cols: the grid's columns.
        patch: the patch side in pixels.

    Returns:
        ``(B * k, C, patch, patch)``, image by image, in the order of ``indices``.
    """
    return torch.stack(
        [
            patch_at(x[b], top, left, patch)
            for b in range(x.shape[0])
            for top, left in patch_windows(indices[b], cols, patch)
        ]
    )


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a module.

    Args:
        module: any module.

    Returns:
        Every BatchNorm layer of ``module`` (itself included), in ``modules()`` order.
    """
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def running_statistics(module: nn.Module):
    """Inside, ``module``'s BatchNorm layers normalise with (and leave alone) their running statistics.

    theta1 encodes the global patch this way with ``global_norm="running"``, and a single
    global patch (batch 1) with any ``global_norm``, in training as at inference.

    Args:
        module: the module whose BatchNorm layers in training mode are switched to eval mode
            inside (and back on exit).

    Yields:
        Nothing.
    """
    norms = [m for m in batch_norms(module) if m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


class GlobalStatistics(nn.Module):
    """Running BatchNorm statistics of theta1 for the global patch alone (``global_norm="separate"``).

    A downsampled whole image has other feature statistics than a full-resolution patch (a
    large digit filling the view against a patch of background). With one set of running
    statistics, the global patches' training forwards pull it towards theirs, so at
    inference the patches and the global patch are both normalised with a mix neither was
    trained with; here each kind is normalised by statistics of its own.
    Buffers ``mean_i`` / ``var_i`` for theta1's i-th BatchNorm, starting from its statistics
    (pretrained ones included), saved in the checkpoint with the model.

    Args:
        theta1: the network whose BatchNorm layers' running statistics are copied.
    """

    def __init__(self, theta1: nn.Module):
        super().__init__()
        for i, norm in enumerate(batch_norms(theta1)):
            self.register_buffer(f"mean_{i}", norm.running_mean.detach().clone())
            self.register_buffer(f"var_{i}", norm.running_var.detach().clone())

    @contextlib.contextmanager
    def swapped_into(self, theta1: nn.Module):
        """Inside, theta1's BatchNorm layers read (and in training update) these statistics.

        Args:
            theta1: the network these statistics were made for; its own running statistics
                are put back on exit.

        Yields:
            Nothing.
        """
        norms = batch_norms(theta1)
        own = [(norm.running_mean, norm.running_var) for norm in norms]
        for i, norm in enumerate(norms):
            norm.running_mean, norm.running_var = getattr(self, f"mean_{i}"), getattr(self, f"var_{i}")
        try:
            yield
        finally:
            for norm, (mean, var) in zip(norms, own):
                norm.running_mean, norm.running_var = mean, var


@contextlib.contextmanager
def global_normalisation(model: nn.Module, batch: int):
    """Inside, theta1 normalises global patches as the model's ``global_norm`` option says.

    Batch statistics need more than one patch: a batch of one uses the running statistics.

    Args:
        model: a framework network (``options["global_norm"]``, ``theta1`` and, with
            ``"separate"``, ``global_statistics``).
        batch: the number of global patches encoded inside.

    Yields:
        Nothing.
    """
    mode = model.options["global_norm"]
    with contextlib.ExitStack() as stack:
        if mode == "separate":
            stack.enter_context(model.global_statistics.swapped_into(model.theta1))
        if mode == "running" or batch <= 1:
            stack.enter_context(running_statistics(model.theta1))
        yield


def even_chunks(items: list, size: int) -> list[list]:
    """Consecutive chunks of at most ``size`` items, as equal as possible.

    So no chunk of one patch trails a full one: BatchNorm in training mode needs more than
    one value.

    Args:
        items: the items to split.
        size: the largest chunk (values below 1 count as 1).

    Returns:
        The chunks, in order (none for no items).
    """
    size = max(1, int(size))
    if not items:
        return []
    count = max(1, math.ceil(len(items) / size))
    step = math.ceil(len(items) / count)
    return [items[i : i + step] for i in range(0, len(items), step)]


def global_view_of(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The global patch: the whole image resized to ``patch x patch`` by area averaging.

    Args:
        x: images ``(B, C, H, W)``.
        patch: the global patch's side in pixels.

    Returns:
        ``(B, C, patch, patch)`` (``x`` itself when it already has that size).
    """
    if tuple(x.shape[-2:]) == (patch, patch):
        return x
    return F.interpolate(x, size=(patch, patch), mode="area")


class _FrameworkMixin:
    """Shared option checks and patch bookkeeping of the two framework networks."""

    options: dict

    @property
    def patch_size(self) -> int:
        """The patch side in pixels (the ``patch_size`` option)."""
        return int(self.options["patch_size"])

    def grid(self, x_or_shape) -> tuple[int, int]:
        """(rows, cols) of the patch grid of images ``(..., H, W)`` or of a ``(H, W)`` shape."""
        shape = x_or_shape.shape[-2:] if isinstance(x_or_shape, torch.Tensor) else x_or_shape
        return grid_shape(int(shape[-2]), int(shape[-1]), self.patch_size)

    def num_sampled(self, num_patches: int) -> int:
        """k: patches re-encoded with gradients per inner iteration (before any memory cap).

        Args:
            num_patches: patches per image.

        Returns:
            ``round(sampling_fraction x num_patches)``, at least 1 and at most ``num_patches``.
        """
        return max(1, min(num_patches, int(round(self.options["sampling_fraction"] * num_patches))))

    def global_gradient_factor(self, k: int, num_patches: int) -> float:
        """The factor on the gradient theta1 gets through the global patch (``global_gradient``).

        The loss depends on the global patch everywhere, but on theta1 through Z only at the
        ``k`` recomputed patches (a ``k / num_patches`` share).
        ``"full"`` keeps that imbalance (the paper's graph); ``"balanced"`` scales the
        global path by ``k / num_patches`` so it weighs as much as the ``k`` patches together;
        ``"none"`` detaches it (theta2 still learns to use the global features).

        Args:
            k: patches re-encoded with gradients per image.
            num_patches: patches per image.

        Returns:
            1 (``"full"``), ``k / num_patches`` (``"balanced"``) or 0 (``"none"``).
        """
        mode = self.options["global_gradient"]
        return {"full": 1.0, "balanced": k / max(1, num_patches), "none": 0.0}[mode]

    def drop_global(self, g: torch.Tensor) -> torch.Tensor:
        """Global dropout: each image's global features zeroed with probability ``global_dropout``.

        Only in training: theta2 must also predict from Z alone, so it cannot lean on the
        global latent only (which, on a small training set, identifies the images). No
        rescaling: kept features are what inference sees.

        Args:
            g: global features, image by image along the first dimension.

        Returns:
            ``g`` with the dropped images zeroed (``g`` itself in eval mode or at rate 0).
        """
        rate = self.options["global_dropout"]
        if not self.training or rate == 0:
            return g
        keep = torch.rand(g.shape[0], device=g.device) >= rate
        return g * keep.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))

    def _add_global_statistics(self) -> None:
        """With ``global_norm="separate"`` (and the global patch), theta1's statistics for the global patch."""
        if self.options["global_patch"] and self.options["global_norm"] == "separate":
            self.global_statistics = GlobalStatistics(self.theta1)

    def _check_framework_options(self) -> None:
        self._require_positive("patch_size", "inner_iterations")
        if not 0 < self.options["sampling_fraction"] <= 1:
            raise ConfigError(
                f"{self.method_name}: option sampling_fraction must be in (0, 1], "
                f"got {self.options['sampling_fraction']}"
            )
        if not 0 <= self.options["global_dropout"] < 1:
            raise ConfigError(
                f"{self.method_name}: option global_dropout must be in [0, 1), got {self.options['global_dropout']}"
            )


# ------------------------------------------------------------------------------- classification


class PatchEncoder(nn.Module):
    """theta1 for classification: timm encoder (last level) -> average pool -> ``Linear(C, latent_dim)``.

    Args:
        encoder: a timm model name.
        in_channels: input bands.
        latent_dim: the output vector's length.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
    """

    def __init__(self, encoder: str, in_channels: int, latent_dim: int, pretrained: PretrainedSpec = False):
        super().__init__()
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained)
        self.fc = nn.Linear(self.encoder.out_channels[-1], latent_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Encode patches.

        Args:
            patches: ``(N, C, p, p)``.

        Returns:
            ``(N, latent_dim)``.
        """
        features = self.encoder(patches)[-1]
        return self.fc(features.mean(dim=(-2, -1)))


class GridHead(nn.Module):
    """theta2 for classification: 3x3 conv blocks over the latent grid, pooled, then linear.

    Each block is a 3x3 conv without bias (stride 2 while the grid is at least 4 wide, else
    1), BatchNorm (running statistics when a training batch has one value per channel), ReLU
    and dropout; dropout is applied again after the global average pooling.

    Args:
        in_channels: channels of the fused grid.
        width: channels of every conv block.
        num_classes: output logits.
        layers: conv blocks.
        dropout: dropout probability.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels = in_channels
        for _ in range(layers):
            self.convs.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            self.norms.append(nn.BatchNorm2d(width))
            channels = width
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Classify a fused latent grid.

        Args:
            z: ``(B, in_channels, m, n)``.

        Returns:
            Logits ``(B, num_classes)``.
        """
        for conv, norm in zip(self.convs, self.norms):
            stride = 2 if min(z.shape[-2:]) >= 4 else 1
            z = F.conv2d(z, conv.weight, None, stride=stride, padding=1)
            z = self.dropout(F.relu(_batch_norm(norm, z)))
        return self.fc(self.dropout(z.mean(dim=(-2, -1))))


def _batch_norm(norm: nn.BatchNorm2d, z: torch.Tensor) -> torch.Tensor:
    """BatchNorm, using the running statistics when a training batch has one value per channel."""
    if norm.training and z.shape[0] * z.shape[-2] * z.shape[-1] == 1:
        return F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return norm(z)


class PatchGDClassifier(_FrameworkMixin, ClassificationModel):
    """PatchGD with a global patch for image classification (see the module docstring).

    Args:
        encoder: theta1's timm encoder.
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **options: ``patch_size``, ``latent_dim``, ``global_patch``, ``fusion``,
            ``sampling_fraction``, ``inner_iterations``, ``head_layers``, ``dropout``,
            ``global_norm``, ``global_gradient``, ``global_dropout`` (see the module docstring).

    Raises:
        ConfigError: an unknown option or a value out of range.
    """

    default_options = {
        "patch_size": 256,
        "latent_dim": 256,
        "global_patch": True,
        "fusion": "add",
        "sampling_fraction": 0.25,
        "inner_iterations": 4,
        "head_layers": 2,
        "dropout": 0.2,
        "global_norm": "batch",
        "global_gradient": "full",
        "global_dropout": 0.0,
    }
    option_choices = {"fusion": FUSIONS, "global_norm": GLOBAL_NORMS, "global_gradient": GLOBAL_GRADIENTS}

    def __init__(
        self,
        encoder: str = "resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        latent = self.options["latent_dim"]
        self.theta1 = PatchEncoder(encoder, in_channels, latent, pretrained)
        self._add_global_statistics()
        fused = 2 * latent if self.options["global_patch"] and self.options["fusion"] == "concat" else latent
        self.theta2 = GridHead(fused, latent, num_classes, self.options["head_layers"], self.options["dropout"])

    def check_options(self) -> None:
        """Checks the framework's options, ``latent_dim``, ``head_layers`` and ``dropout``."""
        self._check_framework_options()
        self._require_positive("latent_dim", "head_layers")
        if not 0 <= self.options["dropout"] < 1:
            raise ConfigError(f"{self.method_name}: option dropout must be in [0, 1), got {self.options['dropout']}")

    @property
    def latent_channels(self) -> int:
        """Channels of ``Z``: ``latent_dim``."""
        return int(self.options["latent_dim"])

    # ---- pieces
    def fill(self, x: torch.Tensor, sub_batch: int = 16) -> torch.Tensor:
        """``Z``: every patch encoded, without gradients.

        Args:
            x: normalised images ``(B, C, H, W)``.
            sub_batch: patches per theta1 pass (at least 2 in training, for BatchNorm).

        Returns:
            ``Z`` ``(B, latent_dim, m, n)``.
        """
        rows, cols = self.grid(x)
        batch = x.shape[0]
        z = x.new_empty((batch, self.latent_channels, rows * cols))
        jobs = [(b, i) for b in range(batch) for i in range(rows * cols)]
        with torch.no_grad():
            for chunk in even_chunks(jobs, max(sub_batch, 2 if self.training else 1)):
                patches = torch.stack(
                    [
                        patch_at(x[b], i // cols * self.patch_size, i % cols * self.patch_size, self.patch_size)
                        for b, i in chunk
                    ]
                )
                encoded = self.theta1(patches).to(z.dtype)
                for (b, i), vector in zip(chunk, encoded):
                    z[b, :, i] = vector
        return z.view(batch, self.latent_channels, rows, cols)

    def encode_global(self, global_view: torch.Tensor) -> torch.Tensor:
        """theta1 on the global patch, BatchNorm per ``global_norm``.

        Args:
            global_view: the global patches ``(B, C, p, p)``.

        Returns:
            The global latents ``(B, latent_dim)``.
        """
        with global_normalisation(self, global_view.shape[0]):
            return self.theta1(global_view)

    def fuse(self, z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Z fused with the global latent by ``fusion``.

        Args:
            z: ``(B, latent_dim, m, n)``.
            g: the global latents ``(B, latent_dim)``, or None (no global patch).

        Returns:
            ``z + g`` broadcast (``"add"``), ``(B, 2 * latent_dim, m, n)`` (``"concat"``), or
            ``z`` when ``g`` is None.
        """
        if g is None:
            return z
        g = g[:, :, None, None].to(z.dtype)
        if self.options["fusion"] == "add":
            return z + g
        return torch.cat([z, g.expand(-1, -1, *z.shape[-2:])], dim=1)

    def classify(self, z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """theta2 on Z fused with the global latent.

        Args:
            z: ``(B, latent_dim, m, n)``.
            g: the global latents ``(B, latent_dim)``, or None (no global patch).

        Returns:
            Logits ``(B, num_classes)``.
        """
        return self.theta2(self.fuse(z, g))

    # ---- forward
    def forward(
        self,
        x: torch.Tensor,
        global_view: torch.Tensor | None = None,
        *,
        latents: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ):
        """Logits of ``x`` (see "Forward modes" in the module docstring).

        Args:
            x: normalised images ``(B, C, H, W)``.
            global_view: the global patches ``(B, C, p, p)``; None: computed from ``x`` by area
                averaging (unused without the global patch).
            latents: ``Z`` ``(B, latent_dim, m, n)`` from :meth:`fill`; None encodes every
                patch in one pass.
            indices: with ``latents``, the ``(B, k)`` row-major grid indices to re-encode.

        Returns:
            Logits ``(B, num_classes)``; with ``latents``, ``(logits, Z_updated)``, where the
            ``k`` patches are written into a copy of the detached ``latents`` and the global
            path's gradient is scaled by ``global_gradient``.

        Raises:
            ValueError: ``latents`` without ``indices``.
        """
        use_global = self.options["global_patch"]
        rows, cols = self.grid(x)
        batch, p = x.shape[0], self.patch_size
        if use_global and global_view is None:
            global_view = global_view_of(x, p)
        if latents is None:
            everything = torch.arange(rows * cols, device=x.device).expand(batch, -1)
            patches = gather_patches(x, everything, cols, p)
            z = self.theta1(patches).view(batch, rows, cols, -1).permute(0, 3, 1, 2)
            return self.classify(z, self.drop_global(self.encode_global(global_view)) if use_global else None)
        if indices is None:
            raise ValueError("indices (B, k) are needed with latents")
        k = indices.shape[1]
        patches = gather_patches(x, indices, cols, p)
        fresh = self.theta1(patches).view(batch, k, -1).transpose(1, 2).to(latents.dtype)  # (B, d, k)
        g = self.encode_global(global_view) if use_global else None
        if g is not None:
            g = self.drop_global(scale_gradient(g, self.global_gradient_factor(k, rows * cols)))
        flat = latents.detach().flatten(2)
        index = indices.to(flat.device)[:, None, :].expand(-1, flat.shape[1], -1)
        z = flat.scatter(2, index, fresh).view_as(latents)
        return self.classify(z, g), z


class DownsampledClassifier(ClassificationModel):
    """Baseline: theta1 (encoder + pool + linear to ``latent_dim``) on the whole image at ``input_size``.

    Args:
        encoder: theta1's timm encoder.
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **options: ``input_size`` (the side images are resized to), ``latent_dim`` and
            ``dropout``.

    Raises:
        ConfigError: an unknown option or a value out of range.
    """

    default_options = {"input_size": 512, "latent_dim": 256, "dropout": 0.2}

    def __init__(
        self,
        encoder: str = "resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        self.theta1 = PatchEncoder(encoder, in_channels, self.options["latent_dim"], pretrained)
        self.dropout = nn.Dropout(self.options["dropout"])
        self.fc = nn.Linear(self.options["latent_dim"], num_classes)

    def check_options(self) -> None:
        """Checks ``input_size``, ``latent_dim`` and ``dropout``."""
        self._require_positive("input_size", "latent_dim")
        if not 0 <= self.options["dropout"] < 1:
            raise ConfigError(f"{self.method_name}: option dropout must be in [0, 1), got {self.options['dropout']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify whole images.

        Args:
            x: normalised images ``(B, C, H, W)``, resized to ``input_size`` (area averaging)
                first when they have another size.

        Returns:
            Logits ``(B, num_classes)``.
        """
        size = self.options["input_size"]
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        return self.fc(self.dropout(F.relu(self.theta1(x))))


# ------------------------------------------------------------------------------- segmentation


def smp_theta1(
    arch: str,
    encoder: str,
    in_channels: int,
    channels: int,
    depth: int,
    pretrained: PretrainedSpec,
    decoder_channels: list[int] | None = None,
) -> nn.Module:
    """theta1 of the segmenter: smp's U-Net or DeepLabV3 on timm encoder ``encoder`` with a ``channels`` head.

    Args:
        arch: "unet" or "deeplabv3".
        encoder: a timm model name.
        in_channels: input bands.
        channels: the head's output channels (the latent channels of Z).
        depth: the encoder's depth (1..5).
        pretrained: False, True or a local weights file for the encoder.
        decoder_channels: the U-Net decoder's widths, one per depth level (empty/None: smp's defaults).

    Returns:
        The smp network (``gigaseg.nn.segmenters.smp_network``).
    """
    kwargs: dict[str, Any] = {"encoder_depth": depth}
    if arch == "unet":
        kwargs["decoder_channels"] = tuple(decoder_channels) if decoder_channels else (256, 128, 64, 32, 16)[:depth]
    return smp_network(arch, encoder, in_channels, channels, pretrained, **kwargs)


class PatchGDSegmenter(_FrameworkMixin, SegmentationModel):
    """The framework for segmentation: U-Net/DeepLabV3 theta1 with a ``latent_channels`` head, 1x1 conv theta2.

    Args:
        encoder: theta1's timm encoder.
        num_classes: output classes.
        in_channels: input bands.
        pretrained: False, True (timm's weights) or a local weights file for the encoder.
        **options: ``patch_size``, ``latent_channels``, ``global_patch``, ``theta1``,
            ``encoder_depth``, ``decoder_channels``, ``sampling_fraction``,
            ``inner_iterations``, ``loss``, ``global_norm``, ``global_gradient``,
            ``global_dropout`` (see the module docstring).

    Raises:
        ConfigError: an unknown option, a value out of range, or a ``patch_size`` that is not
            a multiple of ``2 ** encoder_depth`` for a theta1 that needs divisible inputs.
    """

    default_options = {
        "patch_size": 128,
        "latent_channels": 8,
        "global_patch": True,
        "theta1": "unet",
        "encoder_depth": 5,
        "decoder_channels": [],
        "sampling_fraction": 0.25,
        "inner_iterations": 4,
        "loss": "auto",
        "global_norm": "batch",
        "global_gradient": "balanced",
        "global_dropout": 0.0,
    }
    option_choices = {
        "theta1": THETA1_ARCHS,
        "loss": SEG_LOSSES,
        "global_norm": GLOBAL_NORMS,
        "global_gradient": GLOBAL_GRADIENTS,
    }

    def __init__(
        self,
        encoder: str = "resnet50",
        *,
        num_classes: int,
        in_channels: int = 3,
        pretrained: PretrainedSpec = False,
        **options: Any,
    ):
        super().__init__(encoder=encoder, num_classes=num_classes, in_channels=in_channels, **options)
        channels = self.options["latent_channels"]
        self.theta1 = smp_theta1(
            self.options["theta1"],
            encoder,
            in_channels,
            channels,
            self.options["encoder_depth"],
            pretrained,
            self.options["decoder_channels"],
        )
        self._add_global_statistics()
        divisible = getattr(self.theta1, "requires_divisible_input_shape", True)
        stride = 2 ** self.options["encoder_depth"] if divisible else 1
        if self.patch_size % stride:
            raise ConfigError(
                f"patchgd_segmenter: patch_size must be a multiple of {stride} (2 ** encoder_depth) "
                f"for this theta1, got {self.patch_size}"
            )
        fused = 2 * channels if self.options["global_patch"] else channels
        self.theta2 = nn.Conv2d(fused, 1 if self.binary else num_classes, 1)

    def check_options(self) -> None:
        """Checks the framework's options, ``latent_channels``, ``encoder_depth``, ``decoder_channels``, ``loss``."""
        self._check_framework_options()
        self._require_positive("latent_channels")
        if not 1 <= self.options["encoder_depth"] <= 5:
            raise ConfigError(
                f"patchgd_segmenter: option encoder_depth must be 1..5, got {self.options['encoder_depth']}"
            )
        decoder = self.options["decoder_channels"]
        if decoder and (
            not isinstance(decoder, list)
            or len(decoder) != self.options["encoder_depth"]
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in decoder)
        ):
            raise ConfigError(
                f"patchgd_segmenter: option decoder_channels must be [] (smp's default) or "
                f"{self.options['encoder_depth']} positive integers (one per encoder_depth), "
                f"got {decoder!r}"
            )
        if self.options["loss"] == "bce_dice" and self.num_classes != 2:
            raise ConfigError(f"patchgd_segmenter: loss 'bce_dice' is for two classes, got {self.num_classes}")

    @property
    def binary(self) -> bool:
        """Two classes with a single logit (BCE + Dice); set by ``loss`` ("auto": two classes)."""
        return self.num_classes == 2 and self.options["loss"] in ("auto", "bce_dice")

    @property
    def latent_channels(self) -> int:
        """Channels of ``Z`` and of the global features: ``latent_channels``."""
        return int(self.options["latent_channels"])

    # ---- pieces
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """theta1 on patches.

        Args:
            patches: ``(N, C, p, p)``.

        Returns:
            ``(N, latent_channels, p, p)``.
        """
        return self.theta1(patches)

    def fill(self, x: torch.Tensor, sub_batch: int = 16) -> torch.Tensor:
        """``Z``: every patch's output, stitched, without gradients.

        Args:
            x: normalised images ``(B, C, H, W)``.
            sub_batch: patches per theta1 pass (at least 2 in training, for BatchNorm).

        Returns:
            ``Z`` ``(B, latent_channels, m*p, n*p)`` (the padded grid).
        """
        rows, cols = self.grid(x)
        batch, p = x.shape[0], self.patch_size
        z = x.new_empty((batch, self.latent_channels, rows * p, cols * p))
        jobs = [(b, i) for b in range(batch) for i in range(rows * cols)]
        with torch.no_grad():
            for chunk in even_chunks(jobs, max(sub_batch, 2 if self.training else 1)):
                corners = [(b, i // cols * p, i % cols * p) for b, i in chunk]
                encoded = self.encode(torch.stack([patch_at(x[b], top, left, p) for b, top, left in corners]))
                for (b, top, left), out in zip(corners, encoded.to(z.dtype)):
                    z[b, :, top : top + p, left : left + p] = out
        return z

    def global_features(self, global_view: torch.Tensor) -> torch.Tensor:
        """theta1's output on the global patch, BatchNorm per ``global_norm``.

        Args:
            global_view: the global patches ``(B, C, p, p)``.

        Returns:
            ``(B, latent_channels, p, p)``.
        """
        with global_normalisation(self, global_view.shape[0]):
            return self.encode(global_view)

    def head(self, z: torch.Tensor, g_up: torch.Tensor | None) -> torch.Tensor:
        """theta2 on ``Z`` and the upsampled global features.

        Args:
            z: ``Z`` cropped to the output size, ``(B, latent_channels, h, w)``.
            g_up: the global features upsampled to ``(B, latent_channels, h, w)``, or None
                (no global patch).

        Returns:
            Logits ``(B, num_classes, h, w)``; with a single binary logit ``l``, ``(0, l)``.
        """
        fused = z if g_up is None else torch.cat([z, g_up.to(z.dtype)], dim=1)
        out = self.theta2(fused)
        if self.binary:
            return torch.cat([torch.zeros_like(out), out], dim=1)
        return out

    def forward(
        self,
        x: torch.Tensor,
        global_view: torch.Tensor | None = None,
        *,
        latents: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of ``x`` (see "Forward modes" in the module docstring).

        Args:
            x: normalised images ``(B, C, H, W)``.
            global_view: the global patches ``(B, C, p, p)``; None: computed from ``x`` by area
                averaging (unused without the global patch).
            latents: ``Z0`` ``(B, latent_channels, m*p, n*p)`` from :meth:`fill`; None encodes
                every patch in one pass.
            indices: with ``latents``, the ``(B, k)`` row-major grid indices to re-encode into
                a copy of the detached ``latents``.

        Returns:
            Logits ``(B, num_classes, H, W)``.

        Raises:
            ValueError: ``latents`` of another size than the padded grid, or without ``indices``.
        """
        use_global = self.options["global_patch"]
        rows, cols = self.grid(x)
        batch, p = x.shape[0], self.patch_size
        height, width = x.shape[-2:]
        if use_global and global_view is None:
            global_view = global_view_of(x, p)
        if latents is None:
            indices = torch.arange(rows * cols, device=x.device).expand(batch, -1)
            base = x.new_zeros((batch, self.latent_channels, rows * p, cols * p))
        else:
            if tuple(latents.shape[-2:]) != (rows * p, cols * p):
                raise ValueError(f"latents must be {rows * p}x{cols * p} (the padded grid), got {tuple(latents.shape)}")
            if indices is None:
                raise ValueError("indices (B, k) are needed with latents")
            base = latents.detach()
        k = indices.shape[1]
        patches = gather_patches(x, indices, cols, p)
        fresh = self.encode(patches).to(base.dtype)
        # Z (a copy of the filled one) with the recomputed patches written in; autograd records
        # the slice copies, so the loss reaches theta1 through exactly these k patches
        z = base.clone()
        corners = [(b, top, left) for b in range(batch) for top, left in patch_windows(indices[b], cols, p)]
        for (b, top, left), out in zip(corners, fresh):
            z[b, :, top : top + p, left : left + p] = out
        z = z[..., :height, :width]
        g_up = None
        if use_global:
            g = self.global_features(global_view)
            if latents is not None:
                g = scale_gradient(g, self.global_gradient_factor(k, rows * cols))
            g = self.drop_global(g)
            g_up = F.interpolate(g.float(), size=(height, width), mode="bilinear", align_corners=False)
        return self.head(z, g_up)
