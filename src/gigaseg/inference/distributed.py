"""Prediction on a Dask cluster: row bands of huge images and whole collections, written into OME-Zarr stores.

gigaseg brings no scheduler of its own: :func:`predict_collection` hands work units to a
``dask.distributed`` client (a :func:`local_cluster`, or any cluster: dask-jobqueue on SLURM or PBS,
Kubernetes, ``dask scheduler`` / ``dask worker`` started by hand; see :func:`connect`).

Work units. For every image, in order, on the workers:

1. ``plan``: the worker opens the image lazily by its path, builds the predictor through the
   job (:class:`PredictionJob`: e.g. the API's, which loads the checkpoint once per worker
   process), makes or resumes the image's OME-Zarr store under its partial name
   (``gigaseg.io.omezarr``) with the prediction's fingerprint, and returns the rows of blocks
   (``gigaseg.inference.stream.block_grid``) still to do. A row whose bands are all stored is
   skipped, under the same fingerprint rules as a single-process resume.
2. ``context``: ``predictor.prepare(image)`` once per image (the global view of the global
   baseline and of GLNet, MagNet's whole-image prediction, ...), with the predictor's
   ``sub_batch`` as ``prepare`` left it. It stays in the memory of the worker that made it and
   is copied by Dask to the workers that need it; the client never sees it.
3. ``unit`` (one per row still to do): the row's labels from
   ``gigaseg.inference.stream.predict_band`` (the same function the single-process driver runs,
   from the predictor's ``band_context``, so the labels are the same bits), written to the
   store's chunks of that row. Rows are whole chunk rows, so no two units write one chunk file
   and no lock is needed; a unit writes whole chunks and then the band markers, so a unit that
   dies half-way is simply run again.
4. ``finish``: the store becomes the outputs asked for (``stream.finish_store``: the TIFF mask
   converted from it by streaming, then the store's pyramid and metadata and its rename into
   place), the overlay and the polygons.

A collection is its images' units: all images are planned as they are admitted (at most
``2 x workers`` images at a time, each holding its output's lock), and one progress bar counts
the units of all of them. A bad image fails alone (its one-line error in
:attr:`CollectionResult.failures`); the others complete.

Faults: a worker that dies is replaced (by its nanny) and Dask reruns the tasks it was running,
and recomputes results it held (a context), up to ``distributed.scheduler.allowed-failures``.
A client that dies leaves the partial stores; the same call again resumes from the rows they hold.

Memory: a worker runs one of these tasks at a time (a lock per process, whatever its thread count),
so it holds what one single-process prediction holds and stays within ``--max-memory``; torch
uses ``threads`` threads (:data:`THREADS_VARIABLE`). The client holds plans, counts and paths only.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, GigasegError, GigasegNotice
from ..geometry import Window
from ..io.base import ImageSource
from ..io.omezarr import OmeZarrMaskWriter, ome_zarr_path
from .contract import SegmentationPredictor
from .heap import bound_heap_growth
from .stream import (
    WRITER_TILE,
    PredictionResult,
    band_done,
    block_grid,
    finish_store,
    predict_band,
    write_band_rows,
    write_overlay,
)

__all__ = [
    "CollectionResult",
    "ImageTask",
    "PredictionJob",
    "PredictionSetup",
    "THREADS_VARIABLE",
    "connect",
    "dashboard_link",
    "local_cluster",
    "predict_collection",
]

#: setups (predictor and opened image) a worker process keeps, most recently used first
_SETUP_CACHE = 8
#: environment variable of a worker: torch's threads in it (:func:`local_cluster` sets it; set it for workers
#: started elsewhere to the cores each may use: a Dask nanny starts its worker with OMP_NUM_THREADS=1)
THREADS_VARIABLE = "GIGASEG_TORCH_THREADS"


@dataclass
class PredictionSetup:
    """What one image's prediction runs with in one process.

    Attributes:
        predictor: the segmentation predictor (planned for the memory budget).
        source: the image, opened lazily (as the network's channels).
        block_size: the block side of the prediction (rows of blocks are the work units).
        palette: ``(N, 3)`` class colours, or None.
        class_names: the class names, or None.
        fingerprint: returns the prediction's fingerprint
            (``gigaseg.inference.fingerprint.prediction_fingerprint``); called at most once here.
        notices: the one-line notices made while setting up (a grey image's channel repeated).
    """

    predictor: SegmentationPredictor
    source: ImageSource
    block_size: int
    palette: np.ndarray | None
    class_names: list[str] | None
    fingerprint: Callable[[], str]
    notices: list[str] = field(default_factory=list)
    _fingerprint: str | None = None

    def producer(self) -> str:
        """The fingerprint, computed on first use and kept.

        Returns:
            The fingerprint string.
        """
        if self._fingerprint is None:
            self._fingerprint = self.fingerprint()
        return self._fingerprint


class PredictionJob(Protocol):
    """How a worker builds the prediction of an image: picklable, hashable, and method-agnostic.

    ``gigaseg.api`` provides one that loads a checkpoint file (once per process); anything with a
    ``setup`` method will do.
    """

    def setup(self, image: str) -> PredictionSetup:
        """The predictor and the opened image for ``image``.

        Args:
            image: the image's path, as the workers see it.

        Returns:
            The setup.
        """


@dataclass(frozen=True)
class ImageTask:
    """One image of a distributed prediction and the outputs it gets.

    Attributes:
        image: the image's path (workers open it themselves: a path they can see).
        mask: the TIFF mask's path; it names the other outputs (``<stem>.ome.zarr``, the overlay...).
        formats: the mask formats (``gigaseg.inference.stream.parse_formats``).
        probabilities: also keep the probabilities (in the OME-Zarr store).
        overlay: also write ``<stem>_overlay.png``.
        resume: keep the rows an interrupted run finished.
        vector: also write polygons: ``(format, path, options)``, or None.
    """

    image: str
    mask: str
    formats: tuple[str, ...] = ("tiff",)
    probabilities: bool = False
    overlay: bool = False
    resume: bool = True
    vector: tuple[str, str, tuple] | None = None


@dataclass(frozen=True)
class ImagePlan:
    """What the ``plan`` task tells the client about an image (no pixels).

    Attributes:
        height: rows of the image.
        width: columns of the image.
        blocks: blocks in each row of blocks (the work units), top to bottom.
        todo: indices of the rows still to predict.
        notices: notices made while opening it.
    """

    height: int
    width: int
    blocks: tuple[int, ...]
    todo: tuple[int, ...]
    notices: tuple[str, ...] = ()


@dataclass
class CollectionResult:
    """What :func:`predict_collection` did.

    Attributes:
        results: image path -> its ``PredictionResult``, for the images that completed (in input order).
        failures: image path -> the exception that stopped it (in input order).
        seconds: wall time.
        units: rows of blocks predicted in this run, over all images.
        units_resumed: rows an earlier run had finished.
        workers: the cluster's workers at the end.
        busy_seconds: the time the workers spent in this prediction's tasks (Dask's task stream,
            summed over workers), or None where the scheduler could not say.
    """

    results: dict[str, PredictionResult] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)
    seconds: float = 0.0
    units: int = 0
    units_resumed: int = 0
    workers: int = 0
    busy_seconds: float | None = None

    @property
    def ok(self) -> bool:
        """True when no image failed."""
        return not self.failures

    @property
    def overhead_per_unit(self) -> float | None:
        """Worker time per row predicted not spent in this prediction's tasks, in seconds.

        ``(seconds x workers - busy_seconds) / units``: scheduling, transfers, and workers idle
        while others finish (a serial last step, rows that do not divide among the workers).
        None without the task stream or without units.
        """
        if self.busy_seconds is None or not self.units:
            return None
        return (self.seconds * self.workers - self.busy_seconds) / self.units


# --------------------------------------------------------------------------- the cluster


def local_cluster(workers: int, *, threads: int | None = None, dashboard: bool = True, preload: Sequence[str] = ()):
    """A ``dask.distributed.LocalCluster`` of ``workers`` processes for prediction.

    Each worker runs one task at a time (one Dask thread) with ``threads`` torch threads (through
    :data:`THREADS_VARIABLE`; by default ``cores // workers``, which fills the machine). Workers are forked
    from a server process that has imported ``preload`` (where the platform has ``forkserver``;
    this sets ``distributed.worker.multiprocessing-method`` for this process), so a worker that
    dies is back in a fraction of a second instead of importing torch again.

    Args:
        workers: worker processes, at least 1.
        threads: torch threads per worker; None: :data:`THREADS_VARIABLE` of this process if set, else
            the cores this process may use divided among the workers.
        dashboard: serve Dask's dashboard on a free port.
        preload: modules the worker processes import before they start (``"gigaseg.api"``).

    Returns:
        The started cluster (close it, or use it as a context manager).

    Raises:
        ConfigError: fewer than one worker or thread.
    """
    if workers < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"a local cluster needs at least 1 worker and 1 thread, got {workers} and {threads}")
    import dask
    from distributed import LocalCluster
    from distributed.utils import get_mp_context

    if "forkserver" in multiprocessing.get_all_start_methods():
        dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
        context = get_mp_context()
        context.set_forkserver_preload(["distributed", __name__, *preload])
    threads = threads or int(os.environ.get(THREADS_VARIABLE) or 0) or max(1, _usable_cores() // workers)
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        silence_logs=logging.CRITICAL,  # a bad image is reported by the client, in one line
        dashboard_address=":0" if dashboard else None,
        env={THREADS_VARIABLE: str(threads)},
    )


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect(address: str, timeout: float = 20.0):
    """A client of the Dask scheduler at ``address`` (a cluster started elsewhere).

    Args:
        address: e.g. ``tcp://10.0.0.5:8786`` (what ``dask scheduler`` or a dask-jobqueue cluster prints).
        timeout: seconds to wait for the scheduler.

    Returns:
        The ``distributed.Client``.

    Raises:
        ConfigError: the scheduler cannot be reached.
    """
    from distributed import Client

    try:
        return Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError, TypeError) as error:
        raise ConfigError(f"cannot reach a Dask scheduler at {address!r}: {error}") from None


def dashboard_link(client) -> str | None:
    """The address of the cluster's dashboard, or None when the scheduler serves none.

    Args:
        client: a ``distributed.Client``.

    Returns:
        The dashboard's URL or None.
    """
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - a scheduler that cannot say has no dashboard to show
        return None
    return client.dashboard_link if "dashboard" in services else None


def _worker_count(client) -> int:
    try:
        return max(1, len(client.scheduler_info().get("workers", {})))
    except Exception:  # noqa: BLE001
        return 1


# --------------------------------------------------------------------------- on the workers

_LOCK = threading.Lock()
_SETUPS: OrderedDict = OrderedDict()


@contextlib.contextmanager
def _one_task_at_a_time(threads: int | None):
    """Run the block with this process's task lock held and torch's threads set."""
    with _LOCK:
        import torch

        threads = threads or os.environ.get(THREADS_VARIABLE)
        if threads:
            torch.set_num_threads(int(threads))
        bound_heap_growth()
        yield


def _setup(job: PredictionJob, image: str) -> PredictionSetup:
    """The cached setup of ``image`` in this process (call under the task lock)."""
    key = (job, image)
    if key in _SETUPS:
        _SETUPS.move_to_end(key)
        return _SETUPS[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GigasegNotice)
        setup = job.setup(image)
    setup.notices = [str(w.message) for w in caught if issubclass(w.category, GigasegNotice)]
    _SETUPS[key] = setup
    while len(_SETUPS) > _SETUP_CACHE:
        _SETUPS.popitem(last=False)
    return setup


def _rows(setup: PredictionSetup) -> list[list[Window]]:
    return block_grid(setup.source.height, setup.source.width, setup.block_size)


def _band(row: list[Window], width: int) -> Window:
    return Window(row[0].top, 0, row[0].height, width)


def _store(task: ImageTask, setup: PredictionSetup) -> OmeZarrMaskWriter:
    """The image's partial store, opened by a worker, checked to be this prediction's."""
    store = OmeZarrMaskWriter.attach(ome_zarr_path(task.mask))
    if store.producer != setup.producer():
        raise GigasegError(
            f"{task.image}: the store {store.partial} was made by another model or settings than this worker's "
            f"(do all workers see the same checkpoint file?)"
        )
    return store


def plan_image(job: PredictionJob, task: ImageTask, threads: int | None = None) -> ImagePlan:
    """Task: open the image, make or resume its store, list the rows of blocks still to do.

    Args:
        job: builds the predictor.
        task: the image and its outputs.
        threads: torch threads (None: the worker's :data:`THREADS_VARIABLE`, else as they are).

    Returns:
        The image's plan.
    """
    with _one_task_at_a_time(threads):
        setup = _setup(job, task.image)
        source = setup.source
        store = OmeZarrMaskWriter(
            ome_zarr_path(task.mask),
            source.height,
            source.width,
            palette=setup.palette,
            class_names=setup.class_names,
            chunk=WRITER_TILE,
            num_classes=setup.predictor.num_classes if task.probabilities else None,
            resume=task.resume,
            producer=setup.producer(),
            name=source.name,
        )
        rows = _rows(setup)
        todo = tuple(i for i, row in enumerate(rows) if not band_done(store, _band(row, source.width)))
        return ImagePlan(source.height, source.width, tuple(len(r) for r in rows), todo, notices=tuple(setup.notices))


def prepare_context(job: PredictionJob, image: str, threads: int | None = None) -> tuple[Any, int]:
    """Task: the image's context, computed once and shared with every unit of the image.

    Args:
        job: builds the predictor.
        image: the image's path.
        threads: torch threads (None: the worker's :data:`THREADS_VARIABLE`, else as they are).

    Returns:
        ``(predictor.prepare(image), predictor.sub_batch)`` (``prepare`` may plan the sub-batch
        for the image's size; units predict with the same).
    """
    with _one_task_at_a_time(threads):
        setup = _setup(job, image)
        context = setup.predictor.prepare(setup.source)
        return context, setup.predictor.sub_batch


def predict_unit(
    job: PredictionJob, task: ImageTask, row_index: int, shared: tuple[Any, int], threads: int | None = None
) -> int:
    """Task: predict one row of blocks and write it into the image's store (nothing if it is there).

    Args:
        job: builds the predictor.
        task: the image and its outputs.
        row_index: the row of blocks (top to bottom).
        shared: what :func:`prepare_context` returned for the image.
        threads: torch threads (None: the worker's :data:`THREADS_VARIABLE`, else as they are).

    Returns:
        Blocks predicted (0 when the row was already stored).
    """
    with _one_task_at_a_time(threads):
        setup = _setup(job, task.image)
        store = _store(task, setup)
        row = _rows(setup)[row_index]
        band = _band(row, setup.source.width)
        if band_done(store, band):  # a rerun of a unit whose worker died after writing it
            return 0
        context, sub_batch = shared
        setup.predictor.sub_batch = sub_batch
        on_block = store.write_probabilities if store.num_classes is not None else None
        labels = predict_band(setup.predictor, setup.source, context, row, on_block=on_block)
        write_band_rows(store, band, labels)
        return len(row)


def finish_image(
    job: PredictionJob, task: ImageTask, plan: ImagePlan, threads: int | None = None, *units: int
) -> PredictionResult:
    """Task: once every unit is done, make the outputs from the store.

    Args:
        job: builds the predictor.
        task: the image and its outputs.
        plan: the image's plan.
        threads: torch threads (None: the worker's :data:`THREADS_VARIABLE`, else as they are).
        *units: what each unit returned (their blocks predicted); passing them makes this task wait for them.

    Returns:
        The image's ``PredictionResult`` (its ``seconds`` are the finishing step's; the client sets them).
    """
    with _one_task_at_a_time(threads):
        setup = _setup(job, task.image)
        store = _store(task, setup)
        predicted = int(sum(units))
        result = PredictionResult(None, plan.height, plan.width, 0.0, predicted, sum(plan.blocks) - predicted)
        mask = Path(task.mask)
        common = dict(palette=setup.palette, class_names=setup.class_names, producer=setup.producer())
        finish_store(store, result, mask, setup.source, task.formats, **common)
        if task.overlay:
            write_overlay(result, mask, setup.source, setup.palette)
        if task.vector is not None:
            from ..io.vector import vectorize_mask

            fmt, path, options = task.vector
            result.vector_path = vectorize_mask(result.mask_path, path, format=fmt, **dict(options)).path
        _SETUPS.pop((job, task.image), None)  # the image is done: release its file handles
        return result


def discard_empty_store(task: ImageTask) -> None:
    """Task: after a failure, delete the image's partial store if it holds no finished band.

    Args:
        task: the image and its outputs.
    """
    with contextlib.suppress(GigasegError):
        store = OmeZarrMaskWriter.attach(ome_zarr_path(task.mask))
        if not store.has_done_bands():
            store.discard()


# --------------------------------------------------------------------------- on the client


@dataclass
class _Image:
    """The client's record of an image in flight."""

    task: ImageTask
    order: int
    locks: contextlib.ExitStack
    started: float
    futures: list = field(default_factory=list)
    plan: ImagePlan | None = None


def predict_collection(
    client,
    job: PredictionJob,
    tasks: Sequence[ImageTask],
    *,
    threads: int | None = None,
    progress: bool = True,
    lock: Callable[[str], contextlib.AbstractContextManager] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> CollectionResult:
    """Predict every image of ``tasks`` on ``client``'s cluster (see the module docstring).

    Args:
        client: a ``distributed.Client``.
        job: builds the predictor on the workers (picklable; workers must see its files).
        tasks: the images and their outputs (output names checked by the caller: distinct, not inputs).
        threads: torch threads per worker; None: a worker's :data:`THREADS_VARIABLE`, else torch's default.
        progress: one progress bar over the units of all images (on a terminal).
        lock: ``lock(mask)`` is held while an image is in flight (``gigaseg.io.lock.output_lock``:
            one process at a time writes an output); None locks nothing.
        on_notice: receives the notices the workers made opening an image.

    Returns:
        The results and failures, by image.

    Raises:
        KeyboardInterrupt: the client was interrupted (the partial stores stay for a resume).
    """
    from distributed import as_completed, get_task_stream

    from ..progress import progress_counter

    start = time.perf_counter()
    outcome = CollectionResult()
    pending = deque(enumerate(tasks))
    active: dict[str, _Image] = {}
    kinds: dict[str, tuple[str, str]] = {}  # future key -> (kind, image)
    ours: set[str] = set()
    finished = as_completed([], with_results=False)

    def submit(state: _Image, kind: str, function, *args, priority: int = 0):
        future = client.submit(function, *args, pure=False, priority=priority - 1000 * state.order)
        kinds[future.key] = (kind, state.task.image)
        ours.add(future.key)
        state.futures.append(future)
        finished.add(future)
        return future

    def admit() -> None:
        window = 2 * _worker_count(client)  # asked each time: a cluster may grow (adaptive dask-jobqueue)
        while pending and len(active) < window:
            order, task = pending.popleft()
            locks = contextlib.ExitStack()
            try:
                if lock is not None:
                    locks.enter_context(lock(task.mask))
            except GigasegError as error:
                outcome.failures[task.image] = error
                continue
            state = _Image(task, order, locks, time.perf_counter())
            active[task.image] = state
            submit(state, "plan", plan_image, job, task, threads, priority=3)

    def fail(state: _Image, error: BaseException) -> None:
        client.cancel([f for f in state.futures if not f.done()])
        if state.plan is not None:  # a store was made: leave it only if it holds finished rows
            with contextlib.suppress(Exception):
                client.submit(discard_empty_store, state.task, pure=False).result(timeout=60)
        close(state)
        outcome.failures[state.task.image] = _described(error, state.task.image)

    def close(state: _Image) -> None:
        state.futures.clear()
        state.locks.close()
        active.pop(state.task.image, None)

    description = f"predict {len(tasks)} image{'s' * (len(tasks) != 1)}"
    with progress_counter(description, 0, progress) as bar, _task_stream(client, get_task_stream) as stream:
        try:
            admit()
            for future in finished:
                kind, image = kinds.pop(future.key)
                state = active.get(image)
                if state is None:  # the image failed already
                    continue
                if future.status != "finished":
                    fail(state, future.exception() if future.status == "error" else GigasegError("cancelled"))
                    admit()
                    continue
                if kind == "plan":
                    state.plan = plan = future.result()
                    for message in plan.notices:
                        if on_notice is not None:
                            on_notice(message)
                    resumed = len(plan.blocks) - len(plan.todo)
                    outcome.units_resumed += resumed
                    bar.grow(len(plan.blocks))
                    bar.advance(resumed)
                    units = []
                    if plan.todo:
                        shared = submit(state, "context", prepare_context, job, state.task.image, threads, priority=2)
                        units = [
                            submit(state, "unit", predict_unit, job, state.task, i, shared, threads, priority=1)
                            for i in plan.todo
                        ]
                    submit(state, "finish", finish_image, job, state.task, plan, threads, *units, priority=0)
                elif kind == "unit":
                    outcome.units += 1
                    bar.advance(1)
                elif kind == "finish":
                    result = future.result()
                    result.seconds = time.perf_counter() - state.started
                    outcome.results[image] = result
                    close(state)
                    admit()
        except BaseException:
            for state in list(active.values()):
                client.cancel(state.futures)
                close(state)
            raise
    order = {task.image: i for i, task in enumerate(tasks)}
    outcome.results = dict(sorted(outcome.results.items(), key=lambda item: order[item[0]]))
    outcome.failures = dict(sorted(outcome.failures.items(), key=lambda item: order[item[0]]))
    outcome.seconds = time.perf_counter() - start
    outcome.workers = _worker_count(client)
    if stream is not None and stream.data:
        outcome.busy_seconds = sum(
            part["stop"] - part["start"]
            for record in stream.data
            if record.get("key") in ours
            for part in record.get("startstops", ())
            if part.get("action") == "compute"
        )
    return outcome


@contextlib.contextmanager
def _task_stream(client, get_task_stream):
    """Dask's record of every task's start and stop while the block runs, or None if the scheduler refuses."""
    try:
        recorder = get_task_stream(client)
        stream = recorder.__enter__()
    except Exception:  # noqa: BLE001 - an older or restricted scheduler: no figures, the prediction goes on
        yield None
        return
    try:
        yield stream
    finally:
        with contextlib.suppress(Exception):
            recorder.__exit__(None, None, None)


def _described(error: BaseException, image: str) -> BaseException:
    """A worker's exception as the client reports it: as it is, but a worker lost too often, in words."""
    if type(error).__name__ == "KilledWorker":
        import dask

        allowed = dask.config.get("distributed.scheduler.allowed-failures", 3)
        return GigasegError(
            f"{image}: more than {allowed} workers died predicting it (out of memory? see the workers' logs); "
            f"rerun to resume from the rows finished"
        )
    return error
