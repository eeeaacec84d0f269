"""The patch-based global-context framework: PatchGD with a global patch (classification and
segmentation), and the downsampled-image classifier it is compared with.

Idea (PatchGD, and "Resource Efficient Perception for Vision Systems", arXiv 2405.07166):
never hold a full-resolution activation map. ``theta1`` encodes each patch of the image
on its own; the encodings are assembled into a grid ``Z``; the whole image downsampled
to one patch (the *global patch*) is encoded by the same ``theta1`` for context; ``theta2``
predicts from ``Z`` fused with the global encoding. Training refreshes only ``k`` sampled
patches with gradients per inner iteration (see ``gigaseg.methods.patchgd``).

``"patchgd_classifier"`` (:class:`PatchGDClassifier`)
    theta1: a timm encoder (``Encoder``, last feature level) + global average pooling +
    ``Linear(C, latent_dim)``: a patch -> a ``latent_dim`` vector. ``Z`` is
    ``(B, latent_dim, m, n)`` for an image cut into ``m x n`` patches of ``patch_size``
    (the last row/column zero-padded when the side is not a multiple). Fusion with the
    global latent ``g``: ``"add"`` (``Z + g`` broadcast; better for classification in the
    paper) or ``"concat"`` (``2 * latent_dim`` channels). theta2 (:class:`GridHead`):
    ``head_layers`` blocks of 3x3 conv (stride 2 while the grid is at least 4 wide, so a
    small grid is not reduced to nothing), BatchNorm, ReLU, dropout; global average
    pooling; linear -> class logits.

``"patchgd_segmenter"`` (:class:`PatchGDSegmenter`)
    theta1: segmentation_models_pytorch's U-Net (``theta1="unet"``) or DeepLabV3 on the
    timm encoder (``tu-<encoder>``) whose head outputs ``latent_channels`` (8) channels at
    full patch resolution. ``Z`` is the patch outputs stitched to ``(B, 8, H, W)``. The
    global patch's 8-channel output is upsampled bilinearly to ``H x W`` and concatenated
    (16 channels). theta2: one 1x1 conv -> class logits. ``decoder_channels`` sets the U-Net
    decoder's widths (``[]``: smp's default 256, 128, 64, 32, 16). For two classes theta2 has a
    single output ``l`` (BCE + Dice) and the logits returned are ``(0, l)``, so softmax
    gives ``(1 - sigmoid(l), sigmoid(l))``; otherwise one logit per class (CE + Dice).
    Because theta2 is 1x1, a block of the image is predicted exactly from the patches
    touching it plus the global patch.

``"downsampled_classifier"`` (:class:`DownsampledClassifier`)
    The same theta1 network on the whole image resized to ``input_size`` x
    ``input_size``, then dropout + linear: the baseline that must shrink its input to fit
    memory.

``global_patch=False`` gives the framework without the global patch (the other baseline).

BatchNorm: patches are encoded in training mode (batch statistics, in the fill as in the
inner iterations). The global patch gets a forward of its own, so it never shifts the
patches' batch statistics. With ``global_norm="batch"`` (the default) theta1 normalises it
with the global patches' own batch statistics (which also update the running ones); a
single global patch (batch 1, where a small patch's deepest map would give BatchNorm one
value per channel) uses the running statistics. With ``"running"`` it always uses the
running statistics (:func:`running_statistics`), as at inference. With ``"separate"`` it
is normalised as with ``"batch"``, but the global patches keep running statistics of
their own (:class:`GlobalStatistics`), which inference uses for the global patch while the
patches use theirs: with ``"batch"`` both kinds update one set, and inference normalises
each with a mix of the two. Measured on the
land-cover fine-structure task (1024^2, k=2, 3 epochs): with running statistics the
training loss rose every epoch (1.16, 1.36, 1.54), with batch statistics it fell (1.67,
1.49, 1.29): gradients through normalisation statistics that lag the weights.

Gradient through the global patch (``global_gradient``): the loss depends on the global
patch at every pixel (segmenter) or grid cell (classifier), while only the ``k`` recomputed
patches (a ``k / patches`` share) pass gradient to theta1 through ``Z``. With
``"full"`` (the paper's graph) theta1 therefore learns mostly from the downsampled image
(``patches / k`` times more than from the full-resolution patches: 64x at 1024^2 with
128-px patches and k = 1); ``"balanced"`` scales the global path's gradient by
``k / patches``; ``"none"`` detaches it. theta2 learns from the global features the same way
in all three. Measured on the land-cover fine-structure task (1024^2, k = 1, 6 epochs,
benchmarks/results/patchgd.md): with ``"full"`` the segmenter collapsed to all-negative
(F1 0.0004); ``"balanced"`` F1 0.485, ``"none"`` 0.483. So the segmenter defaults to
``"balanced"``. The classifier keeps the paper's ``"full"`` with additive fusion, but on
UltraMNIST 512 from a digit-pretrained theta1 (6 epochs, 1.4 GB, ``global_norm="separate"``)
the setting that made the global patch help was ``global_gradient="none"`` with
``fusion="concat"``: validation accuracy 0.927 / 0.900 (two seeds) against 0.870 mean
without the global patch; with ``"full"`` theta1 learned from the downsampled view, which
shows only the large digit (0.610, additive). Detached with additive fusion it varied too
much across seeds (0.843 / 0.660) to recommend. That gain was a weak theta1's: from one
that also reads printed digits (``benchmarks/pretrain_digits.py --fonts``) the framework
without the global patch scores 0.945 (two seeds) against 0.913 for the same setting, since
the patch grid itself then reads the large digit.

Global dropout (``global_dropout``, default 0): in training, each image's global features are
zeroed with this probability (per forward, so per inner iteration), without rescaling the
kept ones. theta2 then has to predict from Z alone part of the time: on a small training set
the global latent alone can identify the training images, and theta2 learned to lean on it
instead of the patches. Measured on UltraMNIST 512 from a digit-pretrained theta1 (6 epochs,
benchmarks/results/patchgd.md, with ``global_norm="separate"``): validation accuracy 0.610
without it, 0.677 with 0.5 (the paper's gradient) and 0.760 / 0.757 (two seeds) with 0.5 and
the balanced gradient; the framework without the global patch scored 0.880 / 0.860.

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
    """``x`` whose gradient is multiplied by ``factor`` on its way back (0: detached)."""
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    return _ScaleGradient.apply(x, factor)


# ------------------------------------------------------------------------------- geometry


def grid_shape(height: int, width: int, patch: int) -> tuple[int, int]:
    """(rows, cols) of ``patch``-px patches covering ``height x width`` (the last ones padded)."""
    return math.ceil(height / patch), math.ceil(width / patch)


def patch_windows(indices: torch.Tensor | list[int], cols: int, patch: int) -> list[tuple[int, int]]:
    """(top, left) pixel corners of row-major grid indices."""
    return [(int(i) // cols * patch, int(i) % cols * patch) for i in indices]


def patch_at(image: torch.Tensor, top: int, left: int, patch: int) -> torch.Tensor:
    """The ``patch x patch`` crop of ``image`` (``(C, H, W)``) at (top, left), zero-padded past the border."""
    crop = image[:, top : top + patch, left : left + patch]
    pad_h, pad_w = patch - crop.shape[-2], patch - crop.shape[-1]
    if pad_h or pad_w:
        crop = F.pad(crop, (0, pad_w, 0, pad_h))
    return crop


def gather_patches(x: torch.Tensor, indices: torch.Tensor, cols: int, patch: int) -> torch.Tensor:
    """``(B * k, C, patch, patch)``: patches ``indices[b]`` (``(B, k)``) of each image ``x[b]``."""
    return torch.stack(
        [
            patch_at(x[b], top, left, patch)
            for b in range(x.shape[0])
            for top, left in patch_windows(indices[b], cols, patch)
        ]
    )


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def running_statistics(module: nn.Module):
    """Inside, ``module``'s BatchNorm layers normalise with (and leave alone) their running statistics.

    The global patch is encoded this way, in training as at inference: a downsampled whole
    image in the same BatchNorm batch as full-resolution patches would shift the patches'
    batch statistics away from those of the no-grad fill, and pollute the running ones.
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
    trained with (UltraMNIST, 512 px: a global-patch classifier scored 0.59 on its own
    training images as shipped, 0.85 with each normalised by statistics of its own kind).
    Buffers ``mean_i`` / ``var_i`` for theta1's i-th BatchNorm, starting from its statistics
    (pretrained ones included), saved in the checkpoint with the model.
    """

    def __init__(self, theta1: nn.Module):
        super().__init__()
        for i, norm in enumerate(batch_norms(theta1)):
            self.register_buffer(f"mean_{i}", norm.running_mean.detach().clone())
            self.register_buffer(f"var_{i}", norm.running_var.detach().clone())

    @contextlib.contextmanager
    def swapped_into(self, theta1: nn.Module):
        """Inside, theta1's BatchNorm layers read (and in training update) these statistics."""
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
    """How theta1 normalises ``batch`` global patches: the model's ``global_norm`` option
    (batch statistics need more than one patch)."""
    mode = model.options["global_norm"]
    with contextlib.ExitStack() as stack:
        if mode == "separate":
            stack.enter_context(model.global_statistics.swapped_into(model.theta1))
        if mode == "running" or batch <= 1:
            stack.enter_context(running_statistics(model.theta1))
        yield


def even_chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``size``, as equal as possible (so no chunk of
    one patch trails a full one: BatchNorm in training mode needs more than one value)."""
    size = max(1, int(size))
    if not items:
        return []
    count = max(1, math.ceil(len(items) / size))
    step = math.ceil(len(items) / count)
    return [items[i : i + step] for i in range(0, len(items), step)]


def global_view_of(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The whole image resized to ``patch x patch`` by area averaging."""
    if tuple(x.shape[-2:]) == (patch, patch):
        return x
    return F.interpolate(x, size=(patch, patch), mode="area")


class _FrameworkMixin:
    """Shared option checks and patch bookkeeping of the two framework networks."""

    options: dict

    @property
    def patch_size(self) -> int:
        return int(self.options["patch_size"])

    def grid(self, x_or_shape) -> tuple[int, int]:
        shape = x_or_shape.shape[-2:] if isinstance(x_or_shape, torch.Tensor) else x_or_shape
        return grid_shape(int(shape[-2]), int(shape[-1]), self.patch_size)

    def num_sampled(self, num_patches: int) -> int:
        """k: patches re-encoded with gradients per inner iteration (before any memory cap)."""
        return max(1, min(num_patches, int(round(self.options["sampling_fraction"] * num_patches))))

    def global_gradient_factor(self, k: int, num_patches: int) -> float:
        """The factor on the gradient theta1 gets through the global patch (``global_gradient``).

        The loss depends on the global patch everywhere, but on theta1 through Z only at the
        ``k`` recomputed patches (a ``k / num_patches`` share).
        ``"full"`` keeps that imbalance (the paper's graph); ``"balanced"`` scales the
        global path by ``k / num_patches`` so it weighs as much as the ``k`` patches together;
        ``"none"`` detaches it (theta2 still learns to use the global features).
        """
        mode = self.options["global_gradient"]
        return {"full": 1.0, "balanced": k / max(1, num_patches), "none": 0.0}[mode]

    def drop_global(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` with each image's global features zeroed with probability ``global_dropout`` in
        training (unchanged in eval): theta2 must also predict from Z alone, so it cannot lean
        on the global latent only (which, on a small training set, identifies the images).
        No rescaling: kept features are what inference sees."""
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
    """theta1 for classification: timm encoder (last level) -> average pool -> ``Linear(C, latent_dim)``."""

    def __init__(self, encoder: str, in_channels: int, latent_dim: int, pretrained: PretrainedSpec = False):
        super().__init__()
        self.encoder = Encoder(encoder, in_channels=in_channels, pretrained=pretrained)
        self.fc = nn.Linear(self.encoder.out_channels[-1], latent_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        features = self.encoder(patches)[-1]
        return self.fc(features.mean(dim=(-2, -1)))


class GridHead(nn.Module):
    """theta2 for classification: 3x3 conv blocks over the latent grid, pooled, then linear."""

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
    """PatchGD with a global patch for image classification (see the module docstring)."""

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
        self._check_framework_options()
        self._require_positive("latent_dim", "head_layers")
        if not 0 <= self.options["dropout"] < 1:
            raise ConfigError(f"{self.method_name}: option dropout must be in [0, 1), got {self.options['dropout']}")

    @property
    def latent_channels(self) -> int:
        return int(self.options["latent_dim"])

    # ---- pieces
    def fill(self, x: torch.Tensor, sub_batch: int = 16) -> torch.Tensor:
        """``Z`` ``(B, latent_dim, m, n)``: every patch encoded, ``sub_batch`` per pass, without gradients."""
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
        """theta1 on the global patch ``(B, C, p, p)`` -> ``(B, latent_dim)``, BatchNorm per ``global_norm``."""
        with global_normalisation(self, global_view.shape[0]):
            return self.theta1(global_view)

    def fuse(self, z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Z fused with the global latent ``g`` ``(B, latent_dim)`` (None: no global patch)."""
        if g is None:
            return z
        g = g[:, :, None, None].to(z.dtype)
        if self.options["fusion"] == "add":
            return z + g
        return torch.cat([z, g.expand(-1, -1, *z.shape[-2:])], dim=1)

    def classify(self, z: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
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

    # ---- engine hooks


class DownsampledClassifier(ClassificationModel):
    """Baseline: theta1 (encoder + pool + linear to ``latent_dim``) on the whole image at ``input_size``."""

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
        self._require_positive("input_size", "latent_dim")
        if not 0 <= self.options["dropout"] < 1:
            raise ConfigError(f"{self.method_name}: option dropout must be in [0, 1), got {self.options['dropout']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of ``x`` (resized to ``input_size`` first when it is not)."""
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
    """The framework for segmentation: U-Net/DeepLabV3 theta1 with an 8-channel head, 1x1 conv theta2."""

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
        return int(self.options["latent_channels"])

    # ---- pieces
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """theta1: ``(N, C, p, p)`` -> ``(N, latent_channels, p, p)``."""
        return self.theta1(patches)

    def fill(self, x: torch.Tensor, sub_batch: int = 16) -> torch.Tensor:
        """``Z`` ``(B, latent_channels, m*p, n*p)``: every patch's output, stitched, without gradients."""
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
        """theta1's output on the global patch ``(B, latent_channels, p, p)``, BatchNorm per ``global_norm``."""
        with global_normalisation(self, global_view.shape[0]):
            return self.encode(global_view)

    def head(self, z: torch.Tensor, g_up: torch.Tensor | None) -> torch.Tensor:
        """theta2 on ``Z`` (cropped to the output size) and the upsampled global features -> logits."""
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

    # ---- engine hooks
