"""The models side by side on the same images: ``mb.compare_models``.

One row per (image, model): pixel scores, object scores (StarDist's definitions, see
:mod:`mlbench.metrics`), polygon count, wall time, and memory. Memory is reported two
ways, honestly labelled: ``rss_peak_mib`` is the growth of the process's resident set
during the run, sampled every 2 ms with psutil (memory the process already holds from
earlier runs is reused and not counted again, so it is a lower bound and noisy);
``est_peak_mib`` is the forward's computed peak (parameters + input + live activations,
:func:`mlbench.probes.estimate.estimate_memory`, nothing allocated) at the size the
model ran at. ``full_1024_gib`` is the same estimate for the full-size published model at
1024 x 1024 on CUDA, the service's setting.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from mlbench.errors import OptionsError
from mlbench.metrics import match_objects, pixel_scores
from mlbench.models import build_model, list_models, resolve_name
from mlbench.samples.bundled import Sample, list_samples, load_sample
from mlbench.pipeline.result import Segmentation
from mlbench.pipeline import segment
from mlbench.pipeline.stages import default_input_size
from mlbench.pipeline.options import PRESET_NAMES
from mlbench.models.cards import card

__all__ = ["compare_models", "summarize_comparison", "measure"]

_MIB = 1024**2


def measure(fn: Callable[[], Any], interval: float = 0.002) -> tuple[Any, float, float]:
    """Run ``fn()``; return (result, wall seconds, peak RSS growth in bytes sampled every ``interval`` s)."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        thread.join()
    return result, seconds, float(max(peak[0], proc.memory_info().rss) - base)


def _models(models: Iterable[Any] | Mapping[str, torch.nn.Module] | None) -> dict[str, torch.nn.Module]:
    from mlbench.models.loading import load_model

    if isinstance(models, Mapping):  # {label: module or name}
        bad = {label: type(m).__name__ for label, m in models.items() if not isinstance(m, (str, torch.nn.Module))}
        if bad:
            raise OptionsError(f"models={{label: model}} takes modules or bundled names as values, got {bad}; e.g. "
                               "{'mine': my_model, 'cbam': 'cbam_resunet'}")
        return {str(label): load_model(m) if isinstance(m, str) else m for label, m in models.items()}
    out = {}
    for model in (list_models() if models is None else models):
        if isinstance(model, str):
            out[resolve_name(model)] = load_model(model)
        elif isinstance(model, torch.nn.Module):
            out[card(model).name] = model
        else:
            raise OptionsError(f"models must be names or torch.nn.Module objects, got {type(model).__name__}; "
                               f"e.g. models={list_models()}")
    return out


def _samples(samples: Iterable[Any] | None) -> list[Sample]:
    chosen = [load_sample(n) for n in list_samples()] if samples is None else [
        load_sample(s) if isinstance(s, str) else s for s in samples]
    bad = [type(s).__name__ for s in chosen if not isinstance(s, Sample)]
    if bad:
        raise OptionsError(f"samples must be names or mb.Sample objects, got {bad}; e.g. samples={list_samples()[:2]}")
    return [s for s in chosen if samples is not None or s.mask is not None]


def _estimates(name: str, model: torch.nn.Module, size: int, full_size: int | None) -> dict[str, float]:
    """Computed peaks (MiB at the run size on CPU; GiB of the full model at ``full_size`` on CUDA)."""
    from mlbench.probes.estimate import estimate_memory

    out = {"est_peak_mib": round(estimate_memory(model, size, device="cpu").peak_bytes / _MIB, 1)}
    if full_size:
        try:
            full = build_model(name, "full", device="meta")
            out[f"full_{full_size}_gib"] = round(estimate_memory(full, full_size, device="cuda").peak_bytes / 1024**3, 2)
        except Exception:  # a foreign model has no full size: leave the column empty
            out[f"full_{full_size}_gib"] = float("nan")
    return out


def _row(sample: Sample, name: str, seg: Segmentation, seconds: float, rss: float, iou_thresh: float) -> dict[str, Any]:
    row: dict[str, Any] = {"image": sample.name, "model": name}
    if sample.mask is not None:
        pix = pixel_scores(sample.mask, seg.mask)
        obj = match_objects(sample.mask, seg.mask, iou_thresh, table=False)
        row.update(pixel_iou=round(pix.iou, 4), dice=round(pix.dice, 4), precision=round(pix.precision, 4),
                   recall=round(pix.recall, 4), n_true=obj.n_true, n_pred=obj.n_pred, tp=obj.tp, fp=obj.fp,
                   fn=obj.fn, f1=round(obj.f1, 4), accuracy=round(obj.accuracy, 4),
                   mean_matched_iou=round(obj.mean_matched_score, 4), panoptic_quality=round(obj.panoptic_quality, 4),
                   merged=len(obj.merged), split=len(obj.split))
    row.update(polygons=len(seg.polygons), seconds=round(seconds, 3),
               forward_seconds=round(seg.run.timings.get("forward", float("nan")), 3), rss_peak_mib=round(rss / _MIB, 1))
    return row


def compare_models(samples: Iterable[Any] | None = None, models: Iterable[Any] | Mapping[str, torch.nn.Module] | None = None,
                   *, preset: str = "fixed", iou_thresh: float = 0.5, full_size: int | None = 1024,
                   keep: dict | None = None, **options: Any) -> pd.DataFrame:
    """Run every model over every sample; one row per (image, model).

    Parameters
    ----------
    samples : names or :class:`mlbench.Sample` objects, optional
        Default: every bundled sample that has ground truth.
    models : names, nn.Modules or {name: module}, optional
        Default: the three bundled small models (``mb.load_model``).
    preset, **options
        Pipeline preset and options (threshold, input_size, ...), the same for every run.
    iou_thresh : float
        IoU a predicted object needs to count as a match.
    full_size : int or None
        Side of the full-size memory estimate (the service's 1024); None skips it.
    keep : dict, optional
        If given, filled with ``{(image, model): Segmentation}`` for figures.

    Returns
    -------
    DataFrame
        image, model, pixel_iou, dice, precision, recall, n_true, n_pred, tp, fp, fn, f1,
        accuracy, mean_matched_iou, panoptic_quality, merged, split (when the sample has
        ground truth), polygons, seconds, forward_seconds, rss_peak_mib, est_peak_mib and
        ``full_{full_size}_gib`` (see the module docstring for what the memory columns mean).
    """
    chosen, nets = _samples(samples), _models(models)
    rows = []
    for name, model in nets.items():
        size = int(options.get("input_size") or default_input_size(model))
        estimates = _estimates(name, model, size, full_size)
        for sample in chosen:
            seg, seconds, rss = measure(lambda: segment(sample.path, model, preset, **options))
            rows.append({**_row(sample, name, seg, seconds, rss, iou_thresh), **estimates})
            if keep is not None:
                keep[(sample.name, name)] = seg
    return pd.DataFrame(rows)


def summarize_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every numeric column per model (rounded), best pixel IoU first."""
    numeric = table.drop(columns=["image"]).groupby("model").mean(numeric_only=True)
    return numeric.sort_values(numeric.columns[0], ascending=False).round(4)


def add_compare_command(subparsers) -> None:
    """Register ``mlbench compare`` (``mlbench`` adds ``--weights PATH`` (repeatable) and ``--card JSON``)."""
    p = subparsers.add_parser("compare", help="run the models over the bundled samples and print a comparison table")
    p.add_argument("--samples", nargs="+", default=None, help="sample names (default: every sample with ground truth)")
    p.add_argument("--models", nargs="+", default=list_models(),
                   help="model names (default: all three, or none when --weights is given)")
    p.add_argument("--preset", default="fixed", choices=PRESET_NAMES)
    p.add_argument("--no-full-size", action="store_true", help="skip the full-size memory estimate at 1024")
    p.add_argument("--json", action="store_true", help="print one JSON record per (image, model)")
    p.set_defaults(run=_compare_cli)


def _compare_cli(args) -> int:
    table = compare_models(args.samples, args.models, preset=args.preset, full_size=None if args.no_full_size else 1024)
    if args.json:
        print(table.to_json(orient="records", indent=1))
    else:
        print(table.to_string(index=False))
        print("\nmeans per model:\n" + summarize_comparison(table).to_string())
    return 0
