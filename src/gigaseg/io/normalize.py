"""From image pixels to network input: dtype scaling, then per-channel mean/std.

Image sources return pixels in the file's own dtype. A network sees

    x = (pixel / scale - mean[c]) / std[c]        as float32, channels first

where ``scale`` comes from the dtype: **integer data is first scaled to [0, 1]
by its dtype's maximum** (uint8 / 255, uint16 / 65535, int16 / 32767, bool / 1);
**float data passes as it is** (``scale = 1``: floats are assumed to be in
[0, 1] already, or in whatever range the mean/std were chosen for).

Defaults (:meth:`Normalization.for_image`): RGB channels get the ImageNet
statistics (the pretrained encoders expect them); every other channel -- a 4th
band such as near-infrared, alpha, or a single grey channel -- gets mean 0.5,
std 0.25, which maps [0, 1] to [-2, 2] like ImageNet roughly does.

A ``Normalization`` is saved in checkpoints (:meth:`to_dict` /
:meth:`from_dict`), so inference normalises exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: statistics for channels without a better default (grey, NIR, alpha, ...)
OTHER_MEAN = 0.5
OTHER_STD = 0.25


def dtype_scale(dtype) -> float:
    """What raw values of ``dtype`` are divided by to bring them to [0, 1].

    Args:
        dtype: a numpy dtype (or anything ``np.dtype`` accepts).

    Returns:
        The dtype's maximum for integers (255.0 for uint8, 65535.0 for uint16),
        1.0 for floats and bool.

    Raises:
        ValueError: for other dtypes (complex, strings, ...).
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"cannot normalise images of dtype {dtype}")


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation: ``(pixel / scale - mean[c]) / std[c]``.

    Attributes:
        mean: per-channel mean, in the [0, 1] units after dividing by ``scale``.
        std: per-channel standard deviation, same units; all > 0.
        scale: raw values are divided by this first (255 for uint8 images,
            65535 for uint16, 1 for float images).

    Raises:
        ConfigError: when ``mean`` is empty or not finite, ``mean`` and ``std``
            differ in length, or a ``std`` or ``scale`` is not positive.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "scale", float(self.scale))
        if not mean or len(mean) != len(std):
            raise ConfigError(f"normalisation needs one mean and one std per channel, got {len(mean)} and {len(std)}")
        if not all(np.isfinite(v) for v in mean):
            raise ConfigError(f"normalisation mean must be finite, got {mean}")
        if not all(np.isfinite(s) and s > 0 for s in std):
            raise ConfigError(f"normalisation std must be positive, got {std}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"normalisation scale must be positive, got {self.scale}")

    @property
    def channels(self) -> int:
        """Number of channels this normalisation is for."""
        return len(self.mean)

    @classmethod
    def for_image(cls, channels: int, dtype) -> Normalization:
        """Default for an image of ``channels`` bands of ``dtype``.

        3 or more channels: ImageNet mean/std for the first three (RGB), 0.5/0.25
        for the rest (e.g. NIR of an RGBN scene, alpha). 1 or 2 channels: 0.5/0.25.

        Args:
            channels: number of bands (at least 1).
            dtype: pixel dtype of the image; sets ``scale`` (:func:`dtype_scale`).

        Returns:
            The default normalisation.

        Raises:
            ValueError: when ``channels`` is below 1 or ``dtype`` is not an
                integer, bool or float type.
        """
        channels = int(channels)
        if channels < 1:
            raise ValueError(f"an image has at least 1 channel, got {channels}")
        if channels >= 3:
            mean = IMAGENET_MEAN + (OTHER_MEAN,) * (channels - 3)
            std = IMAGENET_STD + (OTHER_STD,) * (channels - 3)
        else:
            mean, std = (OTHER_MEAN,) * channels, (OTHER_STD,) * channels
        return cls(mean, std, dtype_scale(dtype))

    @classmethod
    def for_source(cls, source) -> Normalization:
        """Default for an ``ImageSource`` (its channel count and dtype).

        Args:
            source: the image (anything with ``channels`` and ``dtype``).

        Returns:
            ``Normalization.for_image(source.channels, source.dtype)``.
        """
        return cls.for_image(source.channels, source.dtype)

    def for_dtype(self, dtype) -> Normalization:
        """The same statistics for pixels of another dtype: ``scale`` follows the dtype.

        The mean and std are in [0, 1] units, so a model trained on uint8 images sees a uint16
        copy of a scene (values x 257) exactly as the uint8 one: integers are divided by their
        dtype's maximum, floats pass as they are.

        Args:
            dtype: the pixel dtype of the image to normalise.

        Returns:
            A ``Normalization`` with ``scale = dtype_scale(dtype)`` (``self`` when it already has it).
        """
        scale = dtype_scale(dtype)
        return self if scale == self.scale else Normalization(self.mean, self.std, scale)

    # -- serialisation (checkpoints) --------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able form, as saved in checkpoints.

        Returns:
            ``{"mean": [...], "std": [...], "scale": float}``.
        """
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`.

        Args:
            data: a dict with ``"mean"`` and ``"std"`` lists and optionally
                ``"scale"`` (default 1.0).

        Returns:
            The normalisation.

        Raises:
            ConfigError: when a field is missing or bad.
        """
        if not isinstance(data, dict) or "mean" not in data or "std" not in data:
            raise ConfigError(f"a saved normalisation needs 'mean' and 'std', got {data!r}")
        try:
            return cls(tuple(data["mean"]), tuple(data["std"]), data.get("scale", 1.0))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad saved normalisation {data!r}: {exc}") from exc

    # -- applying ------------------------------------------------------------------------

    def _check_channels(self, channels: int) -> None:
        if channels != self.channels:
            raise ValueError(f"normalisation is for {self.channels} channel(s), the image has {channels}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Normalise pixels for a network, channels first.

        Args:
            array: ``(H, W, C)`` (or ``(H, W)``) pixels in raw units of any dtype.

        Returns:
            Normalised float32 ``(C, H, W)`` (a new array).

        Raises:
            ValueError: when the array is not 2-D or 3-D, or its channel count
                differs from :attr:`channels`.
        """
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"expected an (H, W, C) array, got shape {array.shape}")
        self._check_channels(array.shape[2])
        out = np.empty((array.shape[2], array.shape[0], array.shape[1]), dtype=np.float32)
        for c in range(self.channels):
            # (x / scale - mean) / std  ==  x * a - b
            a = 1.0 / (self.scale * self.std[c])
            b = self.mean[c] / self.std[c]
            np.multiply(array[:, :, c], np.float32(a), out=out[c], casting="unsafe")
            out[c] -= np.float32(b)
        return out

    def apply_torch(self, tensor):
        """Normalise a tensor of raw pixels, on its own device.

        Args:
            tensor: ``(B, C, H, W)`` or ``(C, H, W)`` torch tensor in raw units.

        Returns:
            Normalised tensor of the same shape and device. Integer tensors
            become float32; floating tensors keep their dtype.

        Raises:
            ValueError: when the tensor is not 3-D or 4-D, or its channel count
                differs from :attr:`channels`.
        """
        import torch

        if tensor.ndim not in (3, 4):
            raise ValueError(f"expected a (B, C, H, W) or (C, H, W) tensor, got shape {tuple(tensor.shape)}")
        channel_dim = tensor.ndim - 3
        self._check_channels(tensor.shape[channel_dim])
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        shape = (-1, 1, 1)
        a = torch.tensor([1.0 / (self.scale * s) for s in self.std], dtype=dtype, device=tensor.device).view(shape)
        b = torch.tensor([m / s for m, s in zip(self.mean, self.std)], dtype=dtype, device=tensor.device).view(shape)
        return tensor.to(dtype) * a - b

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply`: normalised values back to raw pixel units.

        Args:
            array: normalised ``(C, H, W)`` values.

        Returns:
            float32 ``(H, W, C)`` in raw units (``[0, scale]`` for inputs that came
            from valid pixels; neither clipped nor rounded).

        Raises:
            ValueError: when the channel count differs from :attr:`channels`.
        """
        array = np.asarray(array, dtype=np.float32)
        self._check_channels(array.shape[0])
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        return ((array * std + mean) * np.float32(self.scale)).transpose(1, 2, 0)
