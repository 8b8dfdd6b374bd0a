"""Where do two runs part ways? ``mb.diff_runs(a, b)``: first the stage, then the module.

Two :class:`~mlbench.pipeline.run.Run` objects (two presets, two models, two devices, two
versions of the code) are compared stage by stage: the decoded image, the model input, the raw
output, the probability and mask, the polygons. The first stage whose output differs is named
with the size of the difference. When that stage is the forward (the same input, a different
output) and both runs hold their models, the forwards are compared module by module
(:mod:`mlbench.studies.module_diff`) and the first module whose output departs is named.
``.plot()`` draws the two maps where they part and their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlbench.checks.polygons import polygon_points
from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.metrics import match_objects, pixel_scores
from mlbench.pipeline.run import Run
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.studies.module_diff import ModuleComparison, Tolerance, compare_modules, record_modules, tolerance_for
from mlbench.studies.run_diff_maps import pair_for_diff, plot_run_diff, stage_array

__all__ = ["RunDiff", "StageDiff", "diff_runs", "polygon_changes"]


def polygon_changes(reference: list[dict[str, Any]], other: list[dict[str, Any]], shape: tuple[int, int]) -> tuple[int, int]:
    """``(added, lost)``: polygons of ``other`` without a counterpart in ``reference``, and the converse.

    Polygons are matched one to one by the IoU (>= 0.5) of their filled areas, externals with
    externals and holes with holes, on an (H, W) ``shape`` canvas; identical lists give (0, 0).
    """
    if reference == other:
        return 0, 0
    added = lost = 0
    for kind in ("external", "internal"):
        mine = [p for p in reference if p.get("type", "external") == kind]
        theirs = [p for p in other if p.get("type", "external") == kind]
        if mine or theirs:
            matching = match_objects(_labels(mine, shape), _labels(theirs, shape), 0.5, table=False)
            added, lost = added + matching.fp, lost + matching.fn
    return added, lost


def _labels(polygons: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Each polygon filled with its own label, the largest first (so one inside another stays visible)."""
    import cv2

    canvas = np.zeros(shape, np.int32)
    points = [polygon_points(p) for p in polygons]
    for label, i in enumerate(sorted(range(len(points)), key=lambda k: -abs(cv2.contourArea(points[k]))), 1):
        if len(points[i]):
            cv2.fillPoly(canvas, [points[i]], label)
    return canvas


@dataclass(frozen=True)
class StageDiff:
    """One stage of two runs: ``status`` is "same", "differs", "failed" (in either run) or "not run"."""

    stage: str
    status: str
    summary: str
    max_abs: float | None = None

    def line(self) -> str:
        return f"  {self.stage:<12} {self.status:<8} {self.summary}"


def _range(array: np.ndarray) -> str:
    return f"{float(array.min()):.4g}..{float(array.max()):.4g}" if array.size else "empty"


def compare_arrays(stage: str, a: np.ndarray, b: np.ndarray, tolerance: Tolerance) -> StageDiff:
    """Shapes, dtypes and values of two arrays; floats within ``tolerance`` of ``a`` count as the same."""
    notes = []
    if a.shape != b.shape:
        notes.append(f"shape {a.shape} vs {b.shape}")
    if a.dtype != b.dtype:
        notes.append(f"dtype {a.dtype} vs {b.dtype}")
    paired = pair_for_diff(a, b)
    if paired is None:
        return StageDiff(stage, "differs", "; ".join(notes + [f"values {_range(a)} vs {_range(b)}"]))
    left, right = (x.astype(np.float64, copy=False) for x in paired)
    diff = float(np.abs(left - right).max()) if left.size else 0.0
    scale = float(np.abs(left).max()) if left.size else 0.0
    exact = not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating))
    same_values = diff == 0 if exact else (math.isfinite(diff) and tolerance.allows(diff, scale))
    if same_values and not notes:
        within = "identical" if diff == 0 else f"max |a-b| {diff:.3g}, within tolerance ({tolerance})"
        return StageDiff(stage, "same", within, diff)
    notes.append(f"values {_range(a)} vs {_range(b)}, max |a-b| {diff:.4g}")
    return StageDiff(stage, "differs", "; ".join(notes), diff)


def _compare_stage(stage: str, a: Any, b: Any, shape: tuple[int, int], tolerance: Tolerance) -> StageDiff:
    if stage == "polygons":
        if a == b:
            return StageDiff(stage, "same", f"{len(a)} identical polygon(s)", 0.0)
        added, lost = polygon_changes(a, b, shape)
        return StageDiff(stage, "differs", f"{len(a)} vs {len(b)} polygon(s): b adds {added}, loses {lost}")
    if stage == "postprocess":
        probability = compare_arrays(stage, a.probability, b.probability, tolerance)
        if a.mask.shape != b.mask.shape:
            return StageDiff(stage, "differs", f"mask shape {a.mask.shape} vs {b.mask.shape}")
        changed = int(np.count_nonzero(a.mask != b.mask))
        if changed == 0 and probability.status == "same":
            return StageDiff(stage, "same", f"same mask; probability {probability.summary}", probability.max_abs)
        iou = pixel_scores(a.mask, b.mask).iou
        return StageDiff(stage, "differs", f"mask IoU {iou:.4f} ({changed} pixel(s) differ); probability "
                         f"{probability.summary}", probability.max_abs)
    return compare_arrays(stage, stage_array(a), stage_array(b), tolerance)


def _stage_diffs(a: Run, b: Run, tolerance: Tolerance) -> list[StageDiff]:
    diffs, shape = [], None
    for stage in STAGE_NAMES:
        left, right = a.records[stage], b.records[stage]
        if "failed" in (left.status, right.status):
            which = "both runs" if left.status == right.status else ("run a" if left.status == "failed" else "run b")
            error = left.error if left.status == "failed" else right.error
            if left.status == right.status and repr(left.error) == repr(right.error):
                diffs.append(StageDiff(stage, "same", f"failed in both runs with the same error: {error!r}"[:300]))
                continue
            diffs.append(StageDiff(stage, "failed", f"failed in {which}: {type(error).__name__}: {error}"))
        elif "pending" in (left.status, right.status):
            diffs.append(StageDiff(stage, "not run", "an earlier stage failed"))
        else:
            if stage == "decode":
                shape = tuple(stage_array(left.output).shape[:2])
            diffs.append(_compare_stage(stage, left.output, right.output, shape, tolerance))
    return diffs


@dataclass(frozen=True, repr=False)
class RunDiff(ReportText):
    """Two runs stage by stage, and module by module where the forward parts them.

    Attributes
    ----------
    a, b : str
        The runs' models and presets.
    options : tuple of (option, value in a, value in b)
        The pipeline options that differ.
    stages : tuple of StageDiff
    first_stage : str or None
        The first stage whose outputs differ (or that failed in one run); None when the runs agree.
    first_module : dict or None
        The first module whose output departs (path, call, type, shape, max_abs, rel), when the
        forward is the first stage to differ and both runs hold models.
    module_note : str
        Why there is no module comparison, or what it compared.
    """

    a: str
    b: str
    options: tuple[tuple[str, Any, Any], ...]
    stages: tuple[StageDiff, ...]
    first_stage: str | None
    first_module: dict[str, Any] | None
    module_note: str
    tolerance: Tolerance
    runs: tuple[Run, Run] = field(repr=False, compare=False)
    modules: ModuleComparison | None = field(default=None, repr=False, compare=False)

    def stage(self, name: str) -> StageDiff:
        """The :class:`StageDiff` of stage ``name``."""
        for diff in self.stages:
            if diff.stage == name:
                return diff
        raise OptionsError(f"no stage named {name!r}; stages are {STAGE_NAMES}")

    def text(self) -> str:
        where = "the runs agree at every stage" if self.first_stage is None else f"first difference: {self.first_stage}"
        lines = [f"RunDiff(a: {self.a}, b: {self.b}): {where}"]
        if self.options:
            lines.append("  options that differ: " + ", ".join(f"{k} {va!r} -> {vb!r}" for k, va, vb in self.options))
        lines += [d.line() for d in self.stages]
        if self.first_module is not None:
            m = self.first_module
            lines.append(f"  first module that departs: {m['module']} ({m['type']}, output {m['shape']}): "
                         f"max |a-b| {m['max_abs']:.4g}, {m['rel']:.3g} of max |a| (tolerance {self.tolerance})")
        if self.module_note:
            lines.append(f"  modules: {self.module_note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: stages, the first stage and module, the options that differ."""
        return {"a": self.a, "b": self.b, "first_stage": self.first_stage,
                "options": [{"option": k, "a": va, "b": vb} for k, va, vb in self.options],
                "stages": [{"stage": d.stage, "status": d.status, "summary": d.summary, "max_abs": d.max_abs}
                           for d in self.stages],
                "first_module": self.first_module, "module_note": self.module_note}

    def plot(self, stage: str | None = None, axes: Any = None) -> Any:
        """The two maps where the runs part (a, b) and their difference, each with a colour bar.

        ``stage`` is a stage name, or "module" for the outputs of the first module that departs;
        default: the first module when one was named, else the first stage that differs. Draws
        into three ``axes`` (a, b, difference) or a new Figure, and returns the Figure.
        """
        chosen = stage or ("module" if self.modules is not None and self.modules.captured else self.first_stage)
        if chosen is None:
            raise OptionsError("the runs agree at every stage: there is no difference to draw; "
                               "pass stage='forward' (or another stage) to draw that stage anyway")
        return plot_run_diff(self, chosen, axes)


def _options_diff(a: Run, b: Run) -> tuple[tuple[str, Any, Any], ...]:
    left, right = a.options.to_dict(), b.options.to_dict()
    return tuple((k, left[k], right[k]) for k in left if left[k] != right[k])


def _label(run: Run) -> str:
    return f"{run.pipeline.model_name} {run.pipeline.preset}"


def _module_diff(a: Run, b: Run, first: str | None, modules: bool) -> tuple[ModuleComparison | None, Tolerance | None, str]:
    """Compare the forwards module by module when the forward is where the runs first differ."""
    if not modules:
        return None, None, "not compared (modules=False)"
    if first != "forward":
        return None, None, ("" if first is None else f"not compared: the runs already differ before the forward "
                            f"(at {first}), so every module would differ")
    left, right = a.pipeline.model, b.pipeline.model
    if not (isinstance(left, torch.nn.Module) and isinstance(right, torch.nn.Module)):
        return None, None, "not compared: a run has no model to trace"
    x_a, x_b = a.output("preprocess"), b.output("preprocess")
    device_a, device_b = torch.device(a.options.device), torch.device(b.options.device)
    dtype = next((p.dtype for p in right.parameters()), torch.float32)
    tolerance = tolerance_for(dtype)
    record = record_modules(left, x_a.to(device_a), eval=a.options.train_mode != "keep", stride=1)  # whole maps to draw
    if record.error is not None:
        return None, None, f"not compared: run a's forward failed when traced again: {record.error}"
    comparison = compare_modules(right, x_b.to(device_b), record.to(device_b), eval=b.options.train_mode != "keep",
                                 capture=tolerance)
    matched = sum(i is not None for i in comparison.ref_index)
    if matched == 0:
        return None, None, "not compared: no module of b has a counterpart in a (different architectures?)"
    note = f"{matched} module call(s) of b compared with a's, aligned by module path"
    return comparison, tolerance, note


def diff_runs(a: Run, b: Run, *, modules: bool = True, tolerance: Tolerance | tuple[float, float] | None = None) -> RunDiff:
    """Compare two runs stage by stage, then module by module where the forward parts them.

    Parameters
    ----------
    a, b : Run
        Two runs (``mb.Pipeline(model, preset).start(image)``), of any presets, models, devices; each
        is run to its end first (a stage that fails stays failed and is reported).
    modules : bool
        When the forward is the first stage to differ and both runs hold models, run both forwards
        again with the module trace on and name the first module whose output departs (b compared
        with a, aligned by module path).
    tolerance : Tolerance or (atol, rtol), optional
        Floats within ``atol + rtol * max |a|`` count as the same; default float32's
        (:data:`mlbench.studies.module_diff.TOLERANCES`). The module comparison uses the tolerance
        of b's parameter dtype.

    Returns
    -------
    RunDiff
        ``.first_stage``, ``.first_module``, ``.stages``; its text is the report; ``.plot()``.

    Raises
    ------
    OptionsError
        When ``a`` or ``b`` is not a Run, or ``tolerance`` is not (atol, rtol).
    """
    for name, run in (("a", a), ("b", b)):
        if not isinstance(run, Run):
            raise OptionsError(f"diff_runs: {name} must be a mlbench Run (mb.Pipeline(model).start(image)), "
                               f"got {type(run).__name__}")
    stage_tolerance = tolerance_for(torch.float32, {"float32": tolerance} if tolerance is not None else None)
    a.run(), b.run()
    stages = _stage_diffs(a, b, stage_tolerance)
    first = next((d.stage for d in stages if d.status in ("differs", "failed")), None)
    comparison, module_tolerance, note = _module_diff(a, b, first, modules)
    first_module = comparison.first_departure(module_tolerance) if comparison is not None else None
    if comparison is not None and first_module is None:
        note += "; none departs beyond tolerance (the difference appears only in the final output)"
    return RunDiff(_label(a), _label(b), _options_diff(a, b), tuple(stages), first, first_module, note,
                   module_tolerance or stage_tolerance, (a, b), comparison)

