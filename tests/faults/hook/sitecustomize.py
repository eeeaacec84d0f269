"""Fault points for the real ``python -m gigaseg`` children of tests/faults; gigaseg itself never imports this.

The tests put this folder on the child's ``PYTHONPATH`` and set ``GIGASEG_TEST_STOP=<point>:<n>``: the child
then stops itself (``SIGSTOP``) the ``n``-th time it reaches ``<point>``, and the test ``SIGKILL``\\ s it there,
so a kill lands at an exact point of the work instead of wherever a timer happens to fall. Points:

- ``band``: a mask band was stored (its labels and ``progress.json`` are on disk);
- ``torn-band``: inside a band's store, its labels written but ``progress.json`` not yet updated;
- ``assemble``: the final mask TIFF is being written under its temporary name;
- ``step``: before a training step (``supervised_step`` of the global and patch baselines);
- ``saving=<file>``: a checkpoint ``<file>`` (``last.ckpt``, ``best.ckpt``) is written under its temporary
  name, not yet renamed into place;
- ``saved=<file>``: a checkpoint ``<file>`` was renamed into place.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

VARIABLE = "GIGASEG_TEST_STOP"


def _stopper(n: int):
    count = [0]

    def reached() -> None:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGSTOP)

    return reached


def _install(point: str, n: int) -> None:
    reached = _stopper(n)
    if point in ("band", "torn-band"):
        from gigaseg.io.writers import MaskWriter

        write_band, save_progress = MaskWriter.write_band, MaskWriter._save_progress
        inside = [False]

        def patched_write_band(self, top, labels):
            inside[0] = True
            try:
                write_band(self, top, labels)
            finally:
                inside[0] = False
            if point == "band":
                reached()

        def patched_save_progress(self):
            if point == "torn-band" and inside[0]:
                reached()
            save_progress(self)

        MaskWriter.write_band, MaskWriter._save_progress = patched_write_band, patched_save_progress
    elif point == "assemble":
        from gigaseg.io import writers

        raw_render = writers._raw_render

        def patched_raw_render(*args, **kwargs):
            render = raw_render(*args, **kwargs)

            def counted(window):
                reached()
                return render(window)

            return counted

        writers._raw_render = patched_raw_render
    elif point == "step":
        from gigaseg.methods.baselines import recipe

        step = recipe.supervised_step

        def patched_step(ctx, batch):
            reached()
            return step(ctx, batch)

        recipe.supervised_step = patched_step
    elif point.startswith("saving="):
        import torch

        name, save = point.split("=", 1)[1], torch.save

        def patched_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)) and Path(f).name == f".{name}.partial":
                reached()

        torch.save = patched_save
    elif point.startswith("saved="):
        from gigaseg.training import loop

        name, save_checkpoint = point.split("=", 1)[1], loop.save_checkpoint

        def patched_save_checkpoint(path, *args, **kwargs):
            saved = save_checkpoint(path, *args, **kwargs)
            if Path(path).name == name:
                reached()
            return saved

        loop.save_checkpoint = patched_save_checkpoint
    else:
        raise SystemExit(f"{VARIABLE}: unknown point {point!r}")


_spec = os.environ.get(VARIABLE)
if _spec:
    _point, _, _n = _spec.rpartition(":")
    _install(_point, int(_n))
