"""Two forwards of one architecture, module by module: where do they part ways?

:func:`~mlbench.studies.module_record.record_modules` runs the reference forward once and keeps,
of every module call's output, every ``stride``-th row; :func:`compare_modules` runs the other
forward and compares each module's output with the reference's the moment it comes out, on the
same rows, with one subtraction and one reduction (``max |a - b|``). It keeps two numbers per call,
never the other run's activations. Calls are aligned by module path and call number (the third
call of ``encoder1.0.relu`` with the third), so a deep copy of the model, cast to bfloat16 or moved
to CUDA, aligns with the original.

A module *departs* when ``max |variant - reference| > atol + rtol * max |reference|`` over its
output; :data:`TOLERANCES` gives ``(atol, rtol)`` per compute dtype.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlbench.errors import OptionsError
from mlbench.probes._hooks import plain_torch
from mlbench.probes.accounting import tensors_in
from mlbench.studies.module_record import STRIDE, Key, ModuleRecord, Walk, record_modules, rows_of, walk_forward

__all__ = ["Tolerance", "TOLERANCES", "STRIDE", "tolerance_for", "ModuleRecord", "ModuleComparison", "record_modules",
           "compare_modules", "max_abs_diff", "rows_of"]


@dataclass(frozen=True)
class Tolerance:
    """A module departs when ``max |a - b| > atol + rtol * max |reference|`` over its output."""

    atol: float
    rtol: float

    def allows(self, diff: float, scale: float) -> bool:
        """True when ``diff`` is within tolerance of a reference whose largest magnitude is ``scale``."""
        return diff <= self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-9, 1e-9),
    "float32": Tolerance(1e-5, 1e-4),
    "float16": Tolerance(1e-4, 5e-3),
    "bfloat16": Tolerance(1e-3, 3e-2),
}
"""Default tolerance per compute dtype. float32's ``rtol`` 1e-4 is about a thousand times its
machine epsilon (1.2e-7): summation order (thread count, batch size, memory layout) moves a
module's output by 1e-7 to 1e-6 of its largest value, a changed weight or a skipped step by far
more. float16 (epsilon 9.8e-4) and bfloat16 (7.8e-3) get about five of their epsilons: rounding
alone stays within that for the first layers, so the module named is where the error has grown
past what one rounding explains. Override per call (``tolerances={"bfloat16": (1e-3, 5e-2)}``)."""


def tolerance_for(dtype: torch.dtype | str, overrides: dict[str, Any] | None = None, *names: str) -> Tolerance:
    """The tolerance for a forward computed in ``dtype``: the first of ``names`` (a variant's name)
    or the dtype's name found in ``overrides``, else :data:`TOLERANCES`.

    Raises
    ------
    OptionsError
        For an override that is not ``(atol, rtol)`` with two numbers >= 0.
    """
    name = str(dtype).replace("torch.", "")
    for key in (*names, name):
        if overrides and key in overrides:
            return _as_tolerance(key, overrides[key])
    return TOLERANCES.get(name, TOLERANCES["float32"])


def _as_tolerance(key: str, value: Any) -> Tolerance:
    if isinstance(value, Tolerance):
        return value
    try:
        atol, rtol = (float(v) for v in value)
    except (TypeError, ValueError):
        atol = rtol = -1.0
    if not (atol >= 0 and rtol >= 0):
        raise OptionsError(f"tolerances[{key!r}] = {value!r} is not (atol, rtol) with two numbers >= 0; "
                           "e.g. tolerances={'bfloat16': (1e-3, 5e-2)}")
    return Tolerance(atol, rtol)


def max_abs_diff(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | None:
    """``max |value - reference|`` as a 0-d tensor on ``value``'s device (no host sync), or None when
    the shapes cannot be compared. A batch of k copies (``(k * N, ...)`` against ``(N, ...)``) is
    compared item by item with the reference, broadcast."""
    if value.shape != reference.shape:
        if (value.dim() != reference.dim() or value.shape[1:] != reference.shape[1:] or not reference.shape[0]
                or value.shape[0] % reference.shape[0]):
            return None
        value = value.reshape(value.shape[0] // reference.shape[0], *reference.shape)
    if not value.is_floating_point() or not reference.is_floating_point():
        value, reference = value.float(), reference.float()
    if reference.device != value.device:
        reference = reference.to(value.device)
    if not value.numel():
        return torch.zeros((), device=value.device)
    return torch.sub(value, reference).abs_().amax()  # 10x faster than vector_norm(ord=inf) on the CPU


@dataclass
class ModuleComparison:
    """One forward compared with a :class:`ModuleRecord`, call by call in its completion order.

    ``diffs[i]`` is ``max |variant - reference|`` of call ``keys[i]``, or None where the call has
    no counterpart in the reference or the shapes cannot be compared; ``ref_index[i]`` is the
    counterpart's position in the reference (None without one).
    """

    record: ModuleRecord
    keys: list[Key]
    types: list[str]
    ref_index: list[int | None]
    diffs: list[float | None]
    output: Any
    error: BaseException | None
    failed: str | None
    captured: tuple[Key, torch.Tensor, torch.Tensor] | None = None

    @property
    def missing(self) -> list[Key]:
        """Reference calls the compared forward never made."""
        seen = set(self.keys)
        return [key for key in self.record.keys if key not in seen]

    def first_departure(self, tolerance: Tolerance) -> dict[str, Any] | None:
        """The first call (completion order: the producer before the containers around it) whose output
        departs beyond ``tolerance`` or holds NaN/Inf where the reference's does not; None if none does."""
        scales = self.record.scales
        for order, (key, index, diff) in enumerate(zip(self.keys, self.ref_index, self.diffs)):
            if diff is None:
                continue
            scale = scales[index]
            nonfinite = not math.isfinite(diff) and math.isfinite(scale)
            if nonfinite or (math.isfinite(scale) and not tolerance.allows(diff, scale)):
                return self._row(order, key, index, diff, scale, nonfinite)
        return None

    def first_nonfinite(self) -> dict[str, Any] | None:
        """The first call whose output holds NaN or Inf where the reference's is finite."""
        scales = self.record.scales
        for order, (key, index, diff) in enumerate(zip(self.keys, self.ref_index, self.diffs)):
            if diff is not None and not math.isfinite(diff) and math.isfinite(scales[index]):
                return self._row(order, key, index, diff, scales[index], True)
        return None

    def _row(self, order: int, key: Key, index: int, diff: float, scale: float, nonfinite: bool) -> dict[str, Any]:
        return {"order": order, "module": key[0], "call": key[1], "type": self.types[order],
                "shape": self.record.shape(index), "max_abs": diff, "ref_max_abs": scale,
                "rel": diff / scale if scale else (0.0 if diff == 0 else math.inf), "nonfinite": nonfinite}

    def rows(self, tolerance: Tolerance) -> list[dict[str, Any]]:
        """Every compared call as a row (``departs`` by ``tolerance``), in completion order."""
        scales, rows = self.record.scales, []
        for order, (key, index, diff) in enumerate(zip(self.keys, self.ref_index, self.diffs)):
            if diff is None:
                continue
            row = self._row(order, key, index, diff, scales[index], not math.isfinite(diff))
            row["ref_order"] = index
            row["departs"] = row["nonfinite"] or not tolerance.allows(diff, scales[index])
            rows.append(row)
        return rows


def compare_modules(model: nn.Module, x: Any, record: ModuleRecord, *,
                    context: AbstractContextManager | None = None, eval: bool = True,
                    capture: Tolerance | None = None) -> ModuleComparison:
    """Run ``model(x)`` and compare every module call's output with ``record`` as it is produced.

    Parameters
    ----------
    model : nn.Module
        The reference model, or a copy of it (cast, moved, in another memory format).
    x : Tensor
        Its input; a batch of k copies of the reference's input is compared item by item.
    record : ModuleRecord
        From :func:`record_modules`; moved to the device of the forward's outputs as needed.
    context : context manager, optional
        Entered around the forward (``torch.autocast``, a thread count).
    eval : bool
        Run in eval mode; False keeps the model's own flags (the caller may set train mode inside).
    capture : Tolerance, optional
        Also keep the outputs (variant, reference) of the first call that departs beyond it, for
        a figure (the reference's as recorded: whole with ``stride=1``); costs one host sync per call.
    """
    walk, found, last = Walk(model), [], [None, -1, None, None]
    index, tensors, stride, paths = record.index, record.tensors, record.stride, walk.paths
    counts: dict[nn.Module, int] = {}
    captured: list[Any] = []
    scales = record.scales if capture is not None else None

    def compare(module, out):
        n = counts[module] = counts.get(module, -1) + 1
        i = index.get((paths.get(module, "?"), n))
        if i is None:
            found.append((None, None))
            return
        reference = tensors[i]
        with plain_torch():  # the comparison's ops skip a variant's TorchFunctionMode (fp16 on the CPU)
            pair = _compare_output(out, reference, stride, last)
        found.append((i, pair))
        if scales is not None and not captured and pair is not None:
            largest = max(-float(pair[0]), float(pair[1]))
            if not math.isfinite(largest) or not capture.allows(largest, scales[i]):
                first = out if type(out) is torch.Tensor else tensors_in(out)[0]
                captured.append((i, first.detach().clone(), reference[0]))

    output, error = walk_forward(model, x, walk.around(compare), context, eval)
    pairs = [p for _, p in found if p is not None]
    if pairs:  # max |a - b| = max(max(a - b), -min(a - b)), for every call at once
        lows, highs = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        values = iter(torch.maximum(highs, lows.neg()).float().cpu().tolist())
    capture_row = None
    if captured:
        i, value, reference = captured[0]
        capture_row = (record.keys[i], value, reference)
    return ModuleComparison(record, walk.keys(), [type(m).__name__ for m in walk.modules], [i for i, _ in found],
                            [None if p is None else next(values) for _, p in found], output, error,
                            walk.failure(error), capture_row)


def _compare_output(out: Any, reference: tuple[torch.Tensor, ...], stride: int, last: list[Any]) -> Any:
    """``(min, max)`` of one call's output minus the reference's, on the recorded rows; ``last`` remembers
    the previous call's (output, version, reference, result): a container returning its last child's
    output, unchanged, is compared once."""
    if type(out) is not torch.Tensor or len(reference) != 1:
        diff = _diff_many(tuple(rows_of(t, stride) for t in tensors_in(out)), reference)
        return None if diff is None else (diff.neg(), diff)
    expected = reference[0]
    if out is last[0] and out._version == last[1] and expected is last[2]:
        return last[3]
    pair = _min_max(rows_of(out, stride), expected)
    last[:] = out, out._version, expected, pair
    return pair


def _min_max(value: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(min, max)`` of ``value - reference`` as 0-d tensors: two operations on the common path (same
    shape and device, floating point); the rest through :func:`max_abs_diff`."""
    if (value.shape == reference.shape and value.get_device() == reference.get_device() and value.is_floating_point()
            and reference.is_floating_point() and value.numel()):
        return torch.aminmax(torch.sub(value, reference))
    diff = max_abs_diff(value, reference)
    return None if diff is None else (diff.neg(), diff)


def _diff_many(tensors: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The largest ``max |a - b|`` over a call's output tensors, paired in order; None if they do not pair."""
    if len(tensors) != len(reference) or not tensors:
        return None
    diffs = [max_abs_diff(t, r) for t, r in zip(tensors, reference)]
    if any(d is None for d in diffs):
        return None
    return torch.stack([d.float() for d in diffs]).max()
