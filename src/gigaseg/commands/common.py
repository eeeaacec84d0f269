"""Small helpers shared by the subcommands."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError


def read_config(path: str | None) -> dict:
    """Read a ``--config`` YAML file.

    Args:
        path: the file, or None.

    Returns:
        Its mapping (``encoder``, ``pretrained``, ``options``, ``settings``); ``{}`` for None
        or an empty file.

    Raises:
        ConfigError: the file is missing, not valid YAML, or not a mapping.
    """
    if path is None:
        return {}
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping with encoder/options/settings")
    return config


def add_inference_set(parser) -> None:
    """Add ``--set KEY=VALUE`` for a method's inference options (predict and evaluate).

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference option of the method, e.g. --set fast_patches=3 --set points=0.9 "
        "(MagNet-Fast), --set refine=never (MagNet's backbone alone), --set overlap=64 "
        "(patch); repeatable",
    )


def parse_options(pairs: list[str]) -> dict:
    """``["input_size=1024", "blend=uniform"]`` -> ``{"input_size": 1024, "blend": "uniform"}``.

    Args:
        pairs: ``KEY=VALUE`` strings; dashes in keys become underscores, values are read as YAML.

    Returns:
        The options; a repeated key keeps its last value.

    Raises:
        ConfigError: a pair without ``=``.
    """
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def add_polygon_options(parser) -> None:
    """Add ``--simplify``, ``--min-area`` and ``--skip-classes`` (how masks become polygons).

    Args:
        parser: the subcommand's parser (``vectorize``, or ``predict`` for ``--vector``).
    """
    group = parser.add_argument_group("polygons")
    group.add_argument(
        "--simplify",
        type=float,
        default=0.0,
        metavar="TOL",
        help="simplify outlines (Douglas-Peucker) with this tolerance in pixels; 0 (default) keeps pixel edges",
    )
    group.add_argument(
        "--min-area",
        type=float,
        default=0.0,
        metavar="PX",
        help="leave out polygons, and fill holes, smaller than this many pixels (default 0: keep all)",
    )
    group.add_argument(
        "--skip-classes",
        action="append",
        default=[],
        metavar="NAMES",
        help="classes to leave out, by name or id, comma-separated or repeated (e.g. background); default: none",
    )


def polygon_options(args) -> dict:
    """The keyword arguments of :func:`gigaseg.io.vector.vectorize_mask` that :func:`add_polygon_options` parsed.

    Args:
        args: the parsed arguments.

    Returns:
        ``{"simplify": ..., "min_area": ..., "skip_classes": [...]}``.
    """
    skip = [name.strip() for item in args.skip_classes for name in item.split(",") if name.strip()]
    return {"simplify": args.simplify, "min_area": args.min_area, "skip_classes": skip}
