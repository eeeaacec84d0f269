"""Position-addressed texture, noise and lighting for synthetic scenes.

Everything here is a pure function of absolute pixel coordinates (and a seed), so any
window of a scene can be rendered on its own and comes out identical to the same
pixels of any other window: that is what lets a scene of any size stream to disk.

- ``texture(name)``: a grey photograph that scikit-image ships (``grass``, ``gravel``,
  ``brick``; bundled, no download), normalised to mean 0 and standard deviation 1, and
  ``sample`` reads it tiled, shifted and flipped/transposed per region.
- ``hash32`` / ``pixel_noise``: integer hashing of ``(row, column, seed)``: per-pixel
  noise without any random state.
- ``SmoothField``: a sum of a few long-wavelength plane waves, for lighting gradients
  and slow colour drift.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: photographs used as textures (all 512 x 512 grey in scikit-image)
TEXTURES = ("grass", "gravel", "brick")
_SIDE = 512
_MASK = _SIDE - 1


@functools.cache
def texture(name: str) -> np.ndarray:
    """``(512, 512)`` float32 photograph ``name``, mean 0 and std 1, read-only (cached).

    Args:
        name: one of ``TEXTURES``.

    Returns:
        The normalised grey photograph; the same read-only array on every call.

    Raises:
        ValueError: ``name`` is not one of ``TEXTURES``.
    """
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURES}")
    from skimage import data  # bundled images: no network access

    grey = getattr(data, name)().astype(np.float32)
    if grey.shape != (_SIDE, _SIDE):
        raise RuntimeError(f"skimage.data.{name}() is {grey.shape}, expected {(_SIDE, _SIDE)}")
    grey -= grey.mean()
    grey /= grey.std()
    grey.setflags(write=False)
    return grey


def hash32(*keys) -> np.ndarray:
    """A well-mixed uint32 of integer arrays/scalars (broadcast), e.g. ``hash32(rows, cols, seed)``.

    Murmur3-style finaliser over a multiplicative combination: deterministic,
    platform-independent (pure uint32 arithmetic), and cheap enough per pixel.

    Args:
        *keys: integer arrays or scalars, broadcast together; their order matters.

    Returns:
        uint32 array of the broadcast shape (0-d for scalar keys).
    """
    with np.errstate(over="ignore"):
        h = np.uint32(0x9E3779B9)
        for i, key in enumerate(keys):
            k = np.asarray(key).astype(np.uint32, copy=False)
            k = k * np.uint32(0xCC9E2D51 + 0x1000 * i)
            k ^= k >> np.uint32(15)
            k = k * np.uint32(0x1B873593)
            h = h ^ k
            h = (h << np.uint32(13)) | (h >> np.uint32(19))
            h = h * np.uint32(5) + np.uint32(0xE6546B64)
        h = np.asarray(h, dtype=np.uint32)
        h ^= h >> np.uint32(16)
        h = h * np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h = h * np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def unit_hash(*keys) -> np.ndarray:
    """``hash32(*keys)`` mapped to float64 in ``[0, 1)``.

    Args:
        *keys: as for ``hash32``.

    Returns:
        float64 array of the broadcast shape.
    """
    return hash32(*keys).astype(np.float64) / 2.0**32


def sample(name: str, rows: np.ndarray, cols: np.ndarray, region_key: np.ndarray) -> np.ndarray:
    """Texture ``name`` at absolute pixels ``(rows, cols)`` (1-D arrays of equal length).

    Each distinct ``region_key`` (uint32 per pixel) sees the photograph tiled with its
    own shift, and one of the eight flips/transposes, so neighbouring regions do not
    show the same pattern and large areas do not look periodic.

    Args:
        name: one of ``TEXTURES``.
        rows: absolute row of each pixel (integers).
        cols: absolute column of each pixel (integers).
        region_key: uint32 key of the region each pixel belongs to.

    Returns:
        float32 texture values (mean 0, std 1 over the photograph), one per pixel.
    """
    tex = texture(name)
    key = hash32(region_key, 0x7E7)
    r = (rows + (key & np.uint32(_MASK)).astype(np.int64)) & _MASK
    c = (cols + ((key >> np.uint32(9)) & np.uint32(_MASK)).astype(np.int64)) & _MASK
    flip = key >> np.uint32(18)
    r = np.where(flip & np.uint32(1), _MASK - r, r)
    c = np.where(flip & np.uint32(2), _MASK - c, c)
    swap = (flip & np.uint32(4)).astype(bool)
    return np.where(swap, tex[c, r], tex[r, c])


def pixel_noise(rows: np.ndarray, cols: np.ndarray, seed: int) -> np.ndarray:
    """Uniform noise in ``[-0.5, 0.5)`` per pixel and channel, a pure function of position.

    Args:
        rows: absolute row of each pixel (integers, broadcast with ``cols``).
        cols: absolute column of each pixel.
        seed: the scene's noise seed.

    Returns:
        float32 array of the broadcast shape of ``rows`` and ``cols`` plus a last axis of 3
        (``(n, 3)`` for 1-D coordinates).
    """
    h = hash32(rows, cols, seed)
    out = np.empty(h.shape + (3,), dtype=np.float32)
    for channel in range(3):
        out[..., channel] = ((h >> np.uint32(8 * channel)) & np.uint32(255)).astype(np.float32)
    out *= 1.0 / 256.0
    out -= 0.5
    return out


@dataclass(frozen=True)
class SmoothField:
    """``sum_k amplitude_k * sin(2 pi (u_k . (row, col)) / wavelength_k + phase_k)``.

    Long wavelengths (thousands of pixels) give smooth gradients that are the same
    function of position whatever window is rendered.
    """

    directions: np.ndarray  # (K, 2) unit vectors (row, col)
    wavelengths: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, waves: int, wavelength: tuple[float, float], amplitude: float
    ) -> SmoothField:
        """``waves`` plane waves, random directions, wavelengths uniform in ``wavelength``.

        Args:
            rng: the random generator to draw from.
            waves: number of plane waves.
            wavelength: ``(low, high)`` range of the wavelengths, in pixels.
            amplitude: standard deviation of the sum (over random positions).

        Returns:
            The field.
        """
        angles = rng.uniform(0, 2 * np.pi, waves)
        return cls(
            directions=np.stack([np.sin(angles), np.cos(angles)], axis=1),
            wavelengths=rng.uniform(*wavelength, waves),
            phases=rng.uniform(0, 2 * np.pi, waves),
            amplitudes=np.full(waves, amplitude * np.sqrt(2.0 / waves)),
        )

    def grid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Field values on the grid ``rows x cols``.

        Plane waves are separable (sin(a + b) = sin a cos b + cos a sin b), so this
        costs two outer products per wave instead of one sine per pixel.

        Args:
            rows: absolute row coordinates (1-D).
            cols: absolute column coordinates (1-D).

        Returns:
            ``(len(rows), len(cols))`` float32.
        """
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        out = np.zeros((rows.size, cols.size), dtype=np.float32)
        for (dr, dc), wavelength, phase, amp in zip(self.directions, self.wavelengths, self.phases, self.amplitudes):
            k = 2 * np.pi / wavelength
            a = rows * (dr * k) + phase
            b = cols * (dc * k)
            out += np.outer(amp * np.sin(a), np.cos(b)).astype(np.float32)
            out += np.outer(amp * np.cos(a), np.sin(b)).astype(np.float32)
        return out
