"""Methods side by side on one dataset: accuracy, peak memory and speed, one run, one machine.

Each method is trained in a fresh child process (its peak RSS is the training
figure), then evaluated on the validation split in another fresh child through
the streaming predictor (its peak RSS and megapixels per second are the
inference figures). Every method gets the same encoder and the same training
budget (epochs, batch size, learning rate), so differences come from the method.
Results: ``results.json``, ``results.md`` and ``results.png`` in the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_output
from ..memory import format_size
from . import machine
from .memory import measure_call

#: a detector's scores in its rows (``gigaseg.evaluate``'s keys), in table order
DETECTION_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR100")


@dataclass
class MethodSpec:
    """One entry of a comparison: a method with its options and training budget.

    Attributes:
        method: a registered method name.
        label: the row's name (None: the method's).
        options: method options (``create_model``'s).
        stage: the stage to train (``"all"``: every stage in order).
        epochs: epochs per stage (None: the recipe's).
        batch_size: batch size (None: the recipe's).
        lr: learning rate (None: the recipe's).
        variants: extra rows scored from the same trained weights: label -> inference options.
    """

    method: str
    label: str | None = None
    options: dict = field(default_factory=dict)
    stage: str = "all"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    #: extra rows scored from the same trained weights: label -> inference options
    #: (e.g. MagNet's backbone alone, ``{"refine": "never"}``)
    variants: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The row's name: ``label``, else ``method``."""
        return self.label or self.method


def train_job(spec: dict, data: str, run_dir: str, encoder: str, seed: int, max_memory: int | None) -> dict:
    """Child-process job: train one method.

    Args:
        spec: a :class:`MethodSpec` as a dict (``dataclasses.asdict``).
        data: the dataset folder.
        run_dir: the run folder (checkpoints, metrics).
        encoder: the encoder every method gets.
        seed: the random seed.
        max_memory: the memory budget in bytes (None: none).

    Returns:
        ``history`` (the trainer's per-epoch rows) and ``seconds`` (the training's wall time).
    """
    import torch

    from ..api import train
    from ..training.recipe import TrainSettings

    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = TrainSettings(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        seed=seed,
        max_memory=max_memory,
        progress=False,
    )
    started = time.perf_counter()
    result = train(  # the comparison owns its run folders: a rerun trains afresh
        spec["method"],
        data,
        run_dir,
        encoder=encoder,
        options=spec["options"],
        settings=settings,
        stage=spec["stage"],
        force=True,
    )
    return {"history": result["history"], "seconds": time.perf_counter() - started}


def evaluate_job(run_dir: str, data: str, split: str, max_memory: int | None, options: dict | None = None) -> dict:
    """Child-process job: evaluate a checkpoint on ``split``, timing the streaming prediction.

    Args:
        run_dir: a run folder or checkpoint.
        data: the dataset folder.
        split: the split to score.
        max_memory: the memory budget in bytes (None: none).
        options: inference options for this evaluation (None: the checkpoint's).

    Returns:
        ``summary`` (``gigaseg.evaluate``'s), ``seconds`` and ``megapixels_per_second``.
    """
    from ..api import evaluate
    from ..data.loader import load_dataset

    dataset = load_dataset(data, split=split)
    pixels = sum(s.image.height * s.image.width for s in (dataset[i] for i in range(len(dataset))))
    started = time.perf_counter()
    summary = evaluate(run_dir, dataset, max_memory=max_memory, progress=False, options=options)
    seconds = time.perf_counter() - started
    return {"summary": summary, "seconds": seconds, "megapixels_per_second": pixels / 1e6 / seconds}


def class_groups(data: str) -> dict[str, list[str]]:
    """Named groups of classes whose mean IoU is reported (the synthetic benchmark's failure modes).

    Args:
        data: the dataset folder.

    Returns:
        ``{"fine": [...], "context": [...]}`` for the synthetic land-cover classes, else ``{}``.
    """
    from ..data.loader import load_dataset
    from ..data.synth import landcover

    classes = list(load_dataset(data, split="train").classes)
    if classes == list(landcover.CLASSES):
        return {"fine": list(landcover.FINE_CLASSES), "context": list(landcover.CONTEXT_CLASSES)}
    return {}


def compare(
    specs: list[MethodSpec],
    data: str | Path,
    out: str | Path,
    *,
    encoder: str = "resnet18",
    seed: int = 0,
    max_memory: int | None = None,
    split: str = "val",
    timeout: float | None = None,
) -> dict:
    """Train and score each method of ``specs`` in fresh child processes.

    Results are written to ``out`` (``results.json``, ``.md``, ``.png``) after every method,
    so a long run leaves partial results; the runs go to ``out/runs/<name>``.

    Args:
        specs: the methods, in table order.
        data: the dataset folder (with a train split and ``split``).
        out: the output folder.
        encoder: the encoder every method gets.
        seed: the random seed.
        max_memory: the memory budget in bytes for training and prediction (None: none).
        split: the split scored.
        timeout: seconds any one child may run (None: no limit).

    Returns:
        The results: ``machine``, the settings, ``class_groups`` and one ``methods`` row per
        method and variant (scores, peak RSS of training and prediction, speed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = class_groups(str(data))
    results = {
        "machine": machine.describe(),
        "data": str(data),
        "split": split,
        "encoder": encoder,
        "seed": seed,
        "max_memory": max_memory,
        "class_groups": groups,
        "methods": [],
    }
    for spec in specs:
        run_dir = out / "runs" / spec.name
        trained = measure_call(
            train_job, (asdict(spec), str(data), str(run_dir), encoder, seed, max_memory), timeout=timeout
        )
        training = {
            "train_seconds": trained.value["seconds"],
            "train_peak_rss": trained.peak_rss,
            "train_cuda_peak": trained.cuda_peak,
            "epochs_run": len(trained.value["history"]),
            "epoch_spread": epoch_spread(trained.value["history"], groups),
        }
        entry = score(spec, None, run_dir, data, split, max_memory, groups, timeout)
        results["methods"].append({**entry, **training})
        write_results(results, out)  # after every method, so a long run leaves partial results
        score_variants(spec, results, out, data, split=split, max_memory=max_memory, timeout=timeout)
    return results


def score(
    spec: MethodSpec,
    variant: str | None,
    run_dir: Path,
    data,
    split: str,
    max_memory: int | None,
    groups: dict[str, list[str]],
    timeout: float | None = None,
) -> dict:
    """One row: ``run_dir``'s checkpoint scored on ``split`` in a fresh child.

    Args:
        spec: the method.
        variant: one of ``spec.variants`` (its inference options are used), or None.
        run_dir: the run folder.
        data: the dataset folder.
        split: the split scored.
        max_memory: the memory budget in bytes (None: none).
        groups: class groups whose mean IoU is reported (:func:`class_groups`).
        timeout: seconds the child may run (None: no limit).

    Returns:
        The row: scores, per-class and per-group IoU, peak RSS and speed of the prediction; for a
        detector, COCO's ``DETECTION_KEYS`` and ``per_class_ap`` instead of the IoU scores.
    """
    options = spec.variants[variant] if variant else None
    scored = measure_call(evaluate_job, (str(run_dir), str(data), split, max_memory, options), timeout=timeout)
    summary = scored.value["summary"]
    if summary.get("task") == "detection":  # COCO's scores instead of IoU
        return {
            "name": f"{spec.name} ({variant})" if variant else spec.name,
            "spec": asdict(spec),
            **({"variant_of": spec.name, "inference_options": options} if variant else {}),
            "task": "detection",
            **{key: summary.get(key) for key in DETECTION_KEYS},
            "per_class_ap": {name: row["AP"] for name, row in summary["per_class"].items()},
            "predict_peak_rss": scored.peak_rss,
            "predict_cuda_peak": scored.cuda_peak,
            "megapixels_per_second": scored.value["megapixels_per_second"],
            "runtime_baseline_rss": scored.baseline_rss,
        }
    per_class = {name: row["iou"] for name, row in summary["per_class"].items()}
    detail = summary.get("detail") or {}
    return {
        "name": f"{spec.name} ({variant})" if variant else spec.name,
        "spec": asdict(spec),
        **({"variant_of": spec.name, "inference_options": options} if variant else {}),
        "miou": summary["miou"],
        "pixel_accuracy": summary["pixel_accuracy"],
        "mean_f1": summary["mean_f1"],
        "per_class_iou": per_class,
        "per_class_f1": {name: row.get("f1") for name, row in summary["per_class"].items()},
        "group_iou": {g: _mean([per_class[c] for c in members]) for g, members in groups.items()},
        "boundary_f1": detail.get("mean_boundary_f1"),
        "thin_recall": detail.get("mean_thin_recall"),
        "per_class_detail": {
            name: {"boundary_f1": row["boundary_f1"], "thin_recall": row["thin_recall"]}
            for name, row in detail.get("per_class", {}).items()
        },
        "predict_peak_rss": scored.peak_rss,
        "predict_cuda_peak": scored.cuda_peak,
        "megapixels_per_second": scored.value["megapixels_per_second"],
        "runtime_baseline_rss": scored.baseline_rss,
    }


def score_variants(
    spec: MethodSpec,
    results: dict,
    out: Path,
    data,
    *,
    split: str = "val",
    max_memory: int | None = None,
    timeout: float | None = None,
) -> None:
    """Add (or replace) the rows of ``spec.variants``, scored from the weights of its trained row.

    The trained row must be in ``results`` and its run folder under ``out/runs``. The
    variants' training figures are the trained row's: the weights are the same. The results
    are written to ``out`` after every variant.

    Args:
        spec: the method whose variants are scored.
        results: what :func:`compare` returned (changed in place).
        out: the output folder of that comparison.
        data: the dataset folder.
        split: the split scored.
        max_memory: the memory budget in bytes (None: none).
        timeout: seconds any one child may run (None: no limit).
    """
    trained = next(m for m in results["methods"] if m["name"] == spec.name)
    # the training figures and budget are the trained row's (spec may come from another invocation)
    training = {k: trained[k] for k in ("train_seconds", "train_peak_rss", "train_cuda_peak", "epochs_run")}
    training["spec"] = {**trained["spec"], "variants": spec.variants}
    for variant in spec.variants:
        entry = {
            **score(spec, variant, out / "runs" / spec.name, data, split, max_memory, results["class_groups"], timeout),
            **training,
        }
        rows = [m for m in results["methods"] if m["name"] != entry["name"]]
        at = next(i for i, m in enumerate(rows) if m["name"] == spec.name) + 1
        while at < len(rows) and rows[at].get("variant_of") == spec.name:
            at += 1
        results["methods"] = rows[:at] + [entry] + rows[at:]
        write_results(results, out)


def epoch_spread(history: list[dict], groups: dict[str, list[str]]) -> dict | None:
    """How each class group's validation IoU varied over the epochs of the last training stage.

    A row's scores are those of one checkpoint, the epoch with the best validation mIoU; when a
    group's IoU swings from epoch to epoch, that one epoch can sit far from its typical value.

    Args:
        history: the trainer's per-epoch rows (``stage`` and ``val_iou_<class>`` columns, as in
            ``metrics.csv``; values may be strings).
        groups: the class groups (:func:`class_groups`); with none, the mIoU's spread alone.

    Returns:
        ``{"stage", "epochs", "miou": stats, <group>: stats}`` where ``stats`` is ``{"mean",
        "sd", "min", "max"}`` of the per-epoch values (a group's per-epoch value: the mean of
        its classes' IoU), or None without validation rows or without per-class columns for a
        group (histories written before they were logged).
    """
    rows = [r for r in history if r.get("val_miou") not in (None, "")]
    if not rows:
        return None
    stage = rows[-1].get("stage")
    rows = [r for r in rows if r.get("stage") == stage]
    series = {"miou": [float(r["val_miou"]) for r in rows]}
    for group, members in groups.items():
        if any(r.get(f"val_iou_{c}") in (None, "") for r in rows for c in members):
            return None
        series[group] = [float(np.nanmean([float(r[f"val_iou_{c}"]) for c in members])) for r in rows]
    spread = {"stage": stage, "epochs": len(rows)}
    for name, values in series.items():
        array = np.asarray(values, np.float64)
        spread[name] = {
            "mean": float(array.mean()),
            "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()),
            "max": float(array.max()),
        }
    return spread


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    """The comparison as a Markdown report.

    Args:
        results: what :func:`compare` returned.

    Returns:
        The provenance header, the table of methods, per-class IoU, options and notes.
    """
    groups = list(results["class_groups"])
    lines = [
        "# Methods compared",
        "",
        machine.markdown_header(results["machine"]),
        f"Data: `{results['data']}` ({results['split']} split), encoder `{results['encoder']}`, "
        f"seed {results['seed']}.",
        "",
    ]
    if results["methods"] and all(m.get("task") == "detection" for m in results["methods"]):
        return _detection_markdown(results, lines)
    detail = any(m.get("boundary_f1") is not None for m in results["methods"])
    columns = [
        "method",
        "mIoU",
        *(f"{g} IoU" for g in groups),
        *(("boundary F1", "thin recall") if detail else ()),
        "train peak RSS",
        "predict peak RSS",
        "Mpx/s",
        "train s",
        "epochs per stage",
    ]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for m in results["methods"]:
        epochs = m["spec"].get("epochs")
        cells = [
            m["name"],
            _fmt(m["miou"]),
            *(_fmt(m["group_iou"][g]) for g in groups),
            *((_fmt(m.get("boundary_f1")), _fmt(m.get("thin_recall"))) if detail else ()),
            format_size(m["train_peak_rss"]),
            format_size(m["predict_peak_rss"]),
            _fmt(m["megapixels_per_second"], 2),
            f"{m['train_seconds']:.0f}",
            "stage defaults" if epochs is None else str(epochs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if results["methods"]:
        classes = list(results["methods"][0]["per_class_iou"])
        lines += [
            "",
            "Per-class IoU:",
            "",
            "| method | " + " | ".join(classes) + " |",
            "|---" * (1 + len(classes)) + "|",
        ]
        for m in results["methods"]:
            lines.append(f"| {m['name']} | " + " | ".join(_fmt(m["per_class_iou"][c]) for c in classes) + " |")
        if all(m.get("per_class_f1") for m in results["methods"]):  # rows from before F1 was kept have none
            lines += ["", "Per-class F1 (Dice):", "", "| method | " + " | ".join(classes) + " |"]
            lines.append("|---" * (1 + len(classes)) + "|")
            for m in results["methods"]:
                lines.append(f"| {m['name']} | " + " | ".join(_fmt(m["per_class_f1"][c]) for c in classes) + " |")
    spread = [m for m in results["methods"] if m.get("epoch_spread") and not m.get("variant_of")]
    if spread:
        names = ["miou", *groups]
        lines += [
            "",
            "Validation over the last stage's epochs (a row's scores are one checkpoint's: the epoch with "
            "the best validation mIoU), mean ± sd (min-max):",
            "",
            "| method | stage | epochs | " + " | ".join("mIoU" if n == "miou" else f"{n} IoU" for n in names) + " |",
            "|---" * (3 + len(names)) + "|",
        ]
        for m in spread:
            cells = [m["name"], str(m["epoch_spread"]["stage"]), str(m["epoch_spread"]["epochs"])]
            for n in names:
                st = m["epoch_spread"].get(n)
                cells.append(
                    "n/a" if st is None else f"{st['mean']:.3f} ± {st['sd']:.3f} ({st['min']:.3f}-{st['max']:.3f})"
                )
            lines.append("| " + " | ".join(cells) + " |")
    if results["methods"]:
        lines += ["", "Options:", ""] + [_options_line(m) for m in results["methods"]]
    measured = [m for m in results["methods"] if m.get("measured")]
    if measured:  # rows appended by several invocations
        lines += ["", "Measured (rows from separate runs: compare times only within one run):", ""]
        lines += [
            f"- {m['name']}: commit {m['measured']['commit']}, {m['measured']['date']}, `{m['measured']['command']}`"
            for m in measured
        ]
    for note in results.get("notes", []):
        lines += ["", note]
    baseline = results["methods"][0].get("runtime_baseline_rss") if results["methods"] else None
    if baseline:
        lines += [
            "",
            f"Peak RSS includes the Python + torch runtime; a child that only imports torch peaks at "
            f"{format_size(baseline)}.",
        ]
    return "\n".join(lines) + "\n"


def _detection_markdown(results: dict, lines: list[str]) -> str:
    """The report of detectors: COCO's AP (AP75 is the paper's metric), memory, speed; AP per class."""
    columns = ["method", "AP", "AP50", "AP75 (paper)", "AP small", "AP medium", "AP large", "AR"]
    columns += ["train peak RSS", "predict peak RSS", "Mpx/s", "train s", "epochs per stage"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for m in results["methods"]:
        epochs = m["spec"].get("epochs")
        cells = [m["name"], *(_fmt(m[key]) for key in DETECTION_KEYS)]
        cells += [format_size(m["train_peak_rss"]), format_size(m["predict_peak_rss"])]
        cells += [_fmt(m["megapixels_per_second"], 2), f"{m['train_seconds']:.0f}"]
        cells.append("stage defaults" if epochs is None else str(epochs))
        lines.append("| " + " | ".join(cells) + " |")
    classes = list(results["methods"][0]["per_class_ap"])
    lines += ["", "AP per class (COCO AP@[.50:.95]):", "", "| method | " + " | ".join(classes) + " |"]
    lines.append("|---" * (1 + len(classes)) + "|")
    for m in results["methods"]:
        lines.append(f"| {m['name']} | " + " | ".join(_fmt(m["per_class_ap"][c]) for c in classes) + " |")
    lines += ["", "AP is COCO's AP@[.50:.95]; AP75 (AP at IoU .75) is the one number the paper's code reports."]
    lines += ["", "Options:", ""] + [_options_line(m) for m in results["methods"]]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _options_line(m: dict) -> str:
    if m.get("variant_of"):
        return f"- {m['name']}: the weights of {m['variant_of']}, predicted with `{json.dumps(m['inference_options'])}`"
    return (
        f"- {m['name']}: `{json.dumps(m['spec']['options'])}`, batch {m['spec'].get('batch_size')}, "
        f"lr {m['spec'].get('lr')}"
    )


def plot(results: dict, path: Path) -> None:
    """A bar chart of per-class IoU (AP for detectors), one bar per method, written atomically as PNG.

    Args:
        results: what :func:`compare` returned (at least one method).
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    detection = all(m.get("task") == "detection" for m in methods)
    key, score, axis = ("per_class_ap", "AP", "AP") if detection else ("per_class_iou", "miou", "IoU")
    classes = list(methods[0][key])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(classes)), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [m[key][c] or 0.0 for c in classes]
        label = f"{m['name']} ({'AP' if detection else 'mIoU'} {_fmt(m[score])})"
        ax.bar(np.arange(len(classes)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right")
    ax.set_ylabel(axis)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(results: dict, out: Path, stem: str = "results") -> None:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (with at least one method) to ``out``.

    Args:
        results: what :func:`compare` returned.
        out: the folder.
        stem: the files' name without suffix.
    """
    with atomic_output(out / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_output(out / f"{stem}.md") as tmp:
        tmp.write_text(markdown(results))
    if results["methods"]:
        plot(results, out / f"{stem}.png")
