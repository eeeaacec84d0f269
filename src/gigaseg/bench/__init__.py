"""The benchmark toolkit: what the scripts in ``benchmarks/`` import besides the top-level ``gigaseg`` API.

A benchmark imports names of ``gigaseg`` (the public API) and of this package only, never a
module path below either; ``tests/bench/test_benchmarks_smoke.py`` checks that. The names:

Measurement in fresh child processes (:mod:`gigaseg.bench.memory`):
    ``measure``, ``measure_call``, ``measure_command``, ``baseline_rss``, ``MemoryReport``,
    ``ChildError``.
Provenance of a figure (:mod:`gigaseg.bench.machine`):
    ``describe_machine`` (``machine.describe``: CPU, cores, memory, GPU, versions, commit,
    command line, date) and ``machine_header`` (``machine.markdown_header``: the same as the
    first lines of a Markdown report).
Methods side by side (:mod:`gigaseg.bench.compare`, also ``gigaseg bench``):
    ``MethodSpec``, ``compare_methods`` (``compare.compare``), ``score_variants``,
    ``write_results``, ``comparison_markdown`` (``compare.markdown``), ``epoch_spread`` (a
    run's per-epoch validation spread), the child jobs ``train_job`` / ``evaluate_job``, and
    ``parse_options`` (``KEY=VALUE`` options read as the CLI's ``--set`` reads them).
Sizes and memory estimates that benchmarks report next to measured peaks:
    ``parse_size``, ``format_size``, ``MemoryEstimate``, ``training_estimate``,
    ``CPU_RUNTIME_BYTES`` (:mod:`gigaseg.budget`), ``block_size_for`` (the streaming driver's
    block side under a budget, :mod:`gigaseg.inference.planner`).
Synthetic data (:mod:`gigaseg.data.synth`, :mod:`gigaseg.io.writers`):
    ``write_landcover_dataset``, ``write_vessels_dataset``, ``check_mask``, ``write_ultramnist_dataset``,
    ``UltraMnistConfig``, ``render_digit``, ``write_tiled_tiff``, ``write_objects_dataset``, ``ObjectsConfig``.
Method internals that benchmarks measure:
    ``MAGNET_PRESETS`` (MagNet's published configurations by preset name,
    :mod:`gigaseg.methods.magnet`); ``plan_patches`` (the trainer's patch plan and per-patch
    estimate), ``gather_patches``, ``global_view_of`` (the framework's patches and global patch
    of an image) and ``GridHead`` (theta2's head) of :mod:`gigaseg.methods.patchgd`.

Every name is resolved on first use, so ``import gigaseg.bench`` (the CLI's ``gigaseg bench``
imports it) imports neither torch nor a method.
"""

from __future__ import annotations

import importlib

#: public name -> (module, attribute) it is resolved from on first use
_EXPORTS: dict[str, tuple[str, str]] = {
    # measurement
    "ChildError": ("gigaseg.bench.memory", "ChildError"),
    "MemoryReport": ("gigaseg.bench.memory", "MemoryReport"),
    "baseline_rss": ("gigaseg.bench.memory", "baseline_rss"),
    "measure": ("gigaseg.bench.memory", "measure"),
    "measure_call": ("gigaseg.bench.memory", "measure_call"),
    "measure_command": ("gigaseg.bench.memory", "measure_command"),
    # provenance
    "describe_machine": ("gigaseg.bench.machine", "describe"),
    "machine_header": ("gigaseg.bench.machine", "markdown_header"),
    # methods side by side
    "MethodSpec": ("gigaseg.bench.compare", "MethodSpec"),
    "compare_methods": ("gigaseg.bench.compare", "compare"),
    "comparison_markdown": ("gigaseg.bench.compare", "markdown"),
    "parse_options": ("gigaseg.commands.common", "parse_options"),
    "epoch_spread": ("gigaseg.bench.compare", "epoch_spread"),
    "evaluate_job": ("gigaseg.bench.compare", "evaluate_job"),
    "score_variants": ("gigaseg.bench.compare", "score_variants"),
    "train_job": ("gigaseg.bench.compare", "train_job"),
    "write_results": ("gigaseg.bench.compare", "write_results"),
    # sizes and estimates
    "CPU_RUNTIME_BYTES": ("gigaseg.budget", "CPU_RUNTIME_BYTES"),
    "MemoryEstimate": ("gigaseg.budget", "MemoryEstimate"),
    "block_size_for": ("gigaseg.inference.planner", "block_size_for"),
    "format_size": ("gigaseg.memory", "format_size"),
    "parse_size": ("gigaseg.memory", "parse_size"),
    "training_estimate": ("gigaseg.budget", "training_estimate"),
    # synthetic data
    "UltraMnistConfig": ("gigaseg.data.synth.ultramnist", "UltraMnistConfig"),
    "ObjectsConfig": ("gigaseg.data.synth.objects", "ObjectsConfig"),
    "check_mask": ("gigaseg.data.synth.landcover", "check_mask"),
    "render_digit": ("gigaseg.data.synth.ultramnist", "render_digit"),
    "write_landcover_dataset": ("gigaseg.data.synth.landcover", "write_landcover_dataset"),
    "write_objects_dataset": ("gigaseg.data.synth.objects", "write_objects_dataset"),
    "write_vessels_dataset": ("gigaseg.data.synth.vessels", "write_vessels_dataset"),
    "write_tiled_tiff": ("gigaseg.io.writers", "write_tiled_tiff"),
    "write_ultramnist_dataset": ("gigaseg.data.synth.ultramnist", "write_ultramnist_dataset"),
    # MagNet and PatchGD internals
    "MAGNET_PRESETS": ("gigaseg.methods.magnet.model", "PRESETS"),
    "GridHead": ("gigaseg.methods.patchgd.model", "GridHead"),
    "gather_patches": ("gigaseg.methods.patchgd.model", "gather_patches"),
    "global_view_of": ("gigaseg.methods.patchgd.model", "global_view_of"),
    "plan_patches": ("gigaseg.methods.patchgd.recipe", "plan_patches"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gigaseg.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
