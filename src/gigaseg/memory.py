"""Human-readable memory sizes ("2GB", "512MiB") <-> bytes."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Bytes in a memory size.

    Units are case-insensitive; k/M/G/T are decimal (``"2GB"`` is 2e9 bytes), KiB/MiB/GiB/TiB
    binary; no unit means bytes.

    Args:
        value: a number of bytes, or a string like ``"2GB"``, ``"1.5 GiB"``, ``"512M"``.

    Returns:
        The size in bytes (fractions truncated).

    Raises:
        ConfigError: the value is not positive or cannot be read.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"memory size must be positive, got {value}")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read memory size {value!r}; use e.g. '2GB', '1.5GiB' or '512MB'")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory size must be positive, got {value!r}")
    return size


def format_size(num_bytes: float) -> str:
    """A byte count for people: ``1536000000`` -> ``'1.54 GB'``.

    Args:
        num_bytes: the size in bytes.

    Returns:
        Two decimals in GB, MB or kB (decimal units, as in the papers' MB figures), or whole bytes below 1 kB.
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"
