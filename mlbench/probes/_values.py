"""Value statistics of the outputs a shape trace sees, at the cost of about one pass per measured output.

A trace calls :meth:`OutputValues.of` for every module output. Which outputs it measures is the
``scope``:

- ``"blocks"`` (the default ``stats=True``): the outputs of modules that hold other modules, the
  model's output, and the inputs of leaf modules that may hide a NaN or Inf (every type outside
  :data:`PASS_NONFINITE`: a Sigmoid maps Inf to 1, a clamp cuts it, a custom module may do
  anything). A NaN or Inf made inside a block reaches the block's output through the layers of
  :data:`PASS_NONFINITE`, so it is seen there; the trace then runs the forward again with scope
  ``"every"`` to name the module that made it (see :func:`mlbench.probes.trace_shapes`). What this
  scope misses: a -Inf that a ReLU inside a block turns into 0, or a value a block's own code
  (not a module) drops or clamps before the block's output.
- ``"every"``: every module's output, and the same inputs.

The common path costs one ``torch.aminmax`` per new tensor: the exact min and max, and the NaN/Inf
check with them (a NaN anywhere makes both extremes NaN, an Inf shows as an extreme). Only when a
value is not finite (the rare path) are the NaN and Inf counts taken, exactly. Two things make it
cheaper than a pass per call: a tensor seen before, unchanged (a container returns its last child's
output; ``Identity`` returns its input), reuses its statistics; and a clamping activation (``ReLU``,
``ReLU6``, ``Hardtanh``) of a tensor whose extremes are on record and finite gets its own extremes
by clamping those, exactly, without reading the output. The mean costs one ``sum`` more per output
and is taken only with ``stats="full"`` (no clamp shortcut then).

Statistics travel as a plain tuple, indexed by the constants below; :func:`stat_fields` turns it
into the trace's fields.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from mlbench.probes.accounting import tensors_in

__all__ = ["CLAMPS", "PASS_NONFINITE", "OutputValues", "stat_fields", "nonfinite", "stats_of"]

# min and max over the finite values (None when none is finite), the sum of the finite values (None
# when the mean was not asked for), how many values are finite, the NaN and Inf counts.
(LOW, HIGH, SUM, COUNT, NAN, INF) = range(6)

_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # half-float sums overflow at 65504
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_isfinite, _ref = math.isfinite, weakref.ref
CLAMPS = frozenset({nn.ReLU, nn.ReLU6, nn.Hardtanh})  # output extremes = the input's, clamped: exact, no pass needed
# Leaf types whose output holds a NaN or +Inf wherever an input value they read held one (a -Inf
# too, except through ReLU, which makes it 0): with scope "blocks" their inputs need no pass.
PASS_NONFINITE = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.LayerNorm, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten,
    nn.ReLU, nn.LeakyReLU, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d})


def measurable(t: torch.Tensor) -> bool:
    """A float16/bfloat16/float32/float64 tensor, not empty and holding values (not on the meta device)."""
    return t.dtype in _FLOATS and not t.is_meta and t.numel() > 0


def tensor_stats(t: torch.Tensor, mean: bool) -> tuple[Any, ...]:
    """Exact statistics of one floating tensor: one ``aminmax`` pass (plus one ``sum`` with ``mean``);
    the NaN and Inf counts, and the statistics of the finite values, only when an extreme is not finite."""
    if t.requires_grad:
        t = t.detach()
    extremes = torch.aminmax(t)
    low, high = float(extremes[0]), float(extremes[1])
    if math.isfinite(low) and math.isfinite(high):  # so is every value: the common path
        return (low, high, _sum(t) if mean else None, t.numel(), 0, 0)
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    finite = t[torch.isfinite(t)]
    if not finite.numel():
        return (None, None, 0.0 if mean else None, 0, nan, inf)
    extremes = torch.aminmax(finite)
    return (float(extremes[0]), float(extremes[1]), _sum(finite) if mean else None, finite.numel(), nan, inf)


def _sum(t: torch.Tensor) -> float:
    """Sum of finite values, in float64 when float32 (or the half floats' float32) overflowed."""
    total = float(t.sum(dtype=_WIDE.get(t.dtype)))
    return total if math.isfinite(total) else float(t.sum(dtype=torch.float64))


def stats_of(tensors: list[torch.Tensor], mean: bool) -> tuple[Any, ...] | None:
    """Statistics of the floating tensors in ``tensors`` together; None when there is none
    (integer outputs, empty or meta tensors)."""
    parts = [tensor_stats(t, mean) for t in tensors if measurable(t)]
    if len(parts) <= 1:
        return parts[0] if parts else None
    lows = [p[LOW] for p in parts if p[COUNT]]
    highs = [p[HIGH] for p in parts if p[COUNT]]
    return (min(lows) if lows else None, max(highs) if highs else None,
            sum(p[SUM] for p in parts) if mean else None, sum(p[COUNT] for p in parts),
            sum(p[NAN] for p in parts), sum(p[INF] for p in parts))


def stat_fields(found: tuple[Any, ...] | None) -> dict[str, Any]:
    """The trace's fields for a statistics tuple: min/max/mean over the finite values, rounded; nan, inf."""
    if found is None:
        return {}
    fields: dict[str, Any] = {"nan": found[NAN], "inf": found[INF]}
    if found[COUNT]:
        fields.update(min=round(found[LOW], 6), max=round(found[HIGH], 6))
        if found[SUM] is not None:
            fields["mean"] = round(found[SUM] / found[COUNT], 6)
    return fields


def nonfinite(found: tuple[Any, ...] | None) -> int:
    """NaN plus Inf count of a statistics tuple (0 for None)."""
    return found[NAN] + found[INF] if found else 0


class OutputValues:
    """Statistics of module outputs during one forward pass; ``mean=True`` adds the exact mean.

    It keeps weak references only, so no activation lives longer because it was measured.
    """

    __slots__ = ("mean", "seen", "every", "root", "hidden")

    def __init__(self, mean: bool, scope: str = "every", root: nn.Module | None = None) -> None:
        self.mean = mean
        self.every = scope == "every"
        self.root = root  # with scope "blocks", the model: its output is measured even when it is a leaf
        self.hidden: list[nn.Module] = []  # leaves whose watched input held NaN or Inf, in call order
        self.seen: dict[int, tuple[Any, int, Any]] = {}  # id -> (weak ref, version, statistics)

    def watch(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Before a leaf outside :data:`PASS_NONFINITE` runs: measure its tensor inputs (it may
        hide a NaN or Inf in them) and note it in :attr:`hidden` when one holds any."""
        for arg in args:
            found = self.of(None, arg, None) if type(arg) is torch.Tensor else stats_of(tensors_in(arg), False)
            if nonfinite(found):
                self.hidden.append(module)
                return

    def known(self, t: Any) -> tuple[Any, ...] | None:
        """The statistics on record for ``t`` as it is now (same tensor, not changed in place since)."""
        entry = self.seen.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
        return None

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Called before a module of a type in :data:`CLAMPS` runs: the input's statistics, when the
        output's follow from them."""
        if len(args) == 1 and type(args[0]) is torch.Tensor and not self.mean:
            found = self.known(args[0])
            if found is not None and found[COUNT] and not found[NAN] + found[INF]:
                return found
        return None

    def of(self, module: nn.Module | None, output: torch.Tensor, given: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """Statistics of ``output`` of ``module`` (None: a watched input); ``given`` is what
        :meth:`before` returned.

        The common case, a new float tensor, is written out here: it runs 1,352 times per small
        HRNet forward, where each attribute read counts.
        """
        key, version = id(output), output._version
        entry = self.seen.get(key)
        if entry is not None and entry[1] == version and entry[0]() is output:
            return entry[2]
        if given is not None:
            low, high = (0.0, math.inf) if type(module) is nn.ReLU else (module.min_val, module.max_val)
            found = (min(max(low, given[LOW]), high), min(max(low, given[HIGH]), high), None, given[COUNT], 0, 0)
        elif output.dtype not in _FLOATS or self.mean:
            found = tensor_stats(output, self.mean) if measurable(output) else None
        else:
            try:
                low, high = torch.aminmax(output)
                low, high = low.item(), high.item()
            except RuntimeError:  # no values: empty, or on the meta device
                found = None
            else:
                found = ((low, high, None, output.numel(), 0, 0) if _isfinite(low) and _isfinite(high)
                         else tensor_stats(output, False))
        self.seen[key] = (_ref(output), version, found)
        return found
