"""The output folder every ``gigaseg synth`` generator writes into.

A folder is only (re)written when it is new, empty or an earlier ``gigaseg synth``
output, so a mistyped path cannot wipe someone's data; its files are written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import ConfigError
from ...io.atomic import atomic_output

#: the manifest listing what a generator wrote (and so may remove on a rerun)
MANIFEST = "synth.json"


def prepare_output_dir(out_dir: str | os.PathLike, folders: Sequence[str]) -> Path:
    """Make ``out_dir`` ready for a synthetic dataset, with the sub-``folders`` it writes.

    It may be missing, empty, or an earlier ``gigaseg synth`` output (it has a
    ``synth.json`` manifest), whose listed files (and its dataset.yaml and manifest)
    are removed first so that no stale image survives. Any other non-empty folder is
    refused.

    Args:
        out_dir: the output folder; created with its parents when missing.
        folders: sub-folders to create in it (``"images"``, ``"masks"``).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConfigError: ``out_dir`` is a file, or a non-empty folder that is not an earlier output.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        if manifest is None:
            raise ConfigError(
                f"{out} is not empty and is not an earlier `gigaseg synth` output (no {MANIFEST}); "
                "refusing to write into it: choose a new or empty folder"
            )
        for rel in manifest.get("files", []):
            target = (out / rel).resolve()
            if out.resolve() in target.parents and target.is_file():
                target.unlink()
        for rel in ("dataset.yaml", MANIFEST):
            (out / rel).unlink(missing_ok=True)
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    return out


def read_manifest(out: Path) -> dict | None:
    """The ``synth.json`` of an earlier ``gigaseg synth`` output in ``out``.

    Args:
        out: the folder to look in.

    Returns:
        The manifest, or None when there is none, it does not parse, or its ``generator`` is not
        a ``gigaseg synth`` generator.
    """
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("generator", "")).startswith("gigaseg synth"):
        return None
    return manifest


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a manifest).

    Args:
        path: the file to (over)write.
        text: its new content.
    """
    with atomic_output(path) as tmp:
        tmp.write_text(text)
