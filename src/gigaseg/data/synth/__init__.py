"""Synthetic benchmark data with known ground truth, streamed to disk at any size.

- ``landcover``: aerial-style land-cover scenes whose fine classes (roads, streams) a
  downsampled global view loses and whose two vegetation classes only context farther
  than a patch tells apart (``gigaseg synth landcover``).
- ``checks``: the land-cover self-checks proving both properties, computed band by band.
- ``vessels``: DRIVE-style binary thin-structure scenes, branching vessels 1-5 px wide that
  a downsampled view loses, with their self-check (``gigaseg synth vessels``).
- ``ultramnist``: UltraMNIST-style classification images, digits of very different sizes
  on one large canvas (``gigaseg synth ultramnist``).
- ``textures``: position-addressed texture, noise and lighting the scenes are painted with.
- ``output``: the output folder every generator writes into.
"""

from ..labels import IGNORE_INDEX
from .checks import CheckReport, run_checks
from .landcover import (
    CLASSES,
    CONTEXT_CLASSES,
    CUE_CLASSES,
    FINE_CLASSES,
    PALETTE,
    LandcoverConfig,
    LandcoverScene,
    check_mask,
    check_scene,
    write_landcover_dataset,
)
from .vessels import VesselConfig, VesselReport, VesselScene, write_vessels_dataset

__all__ = [
    "CLASSES",
    "CONTEXT_CLASSES",
    "CUE_CLASSES",
    "FINE_CLASSES",
    "IGNORE_INDEX",
    "PALETTE",
    "CheckReport",
    "LandcoverConfig",
    "LandcoverScene",
    "VesselConfig",
    "VesselReport",
    "VesselScene",
    "check_mask",
    "check_scene",
    "run_checks",
    "write_landcover_dataset",
    "write_vessels_dataset",
]
