"""Whole-map reductions in a tile's forward, recognised so that they can see the whole image.

A squeeze-and-excitation block (``x.mean((2, 3))``, ``nn.AdaptiveAvgPool2d(1)``), CBAM's
channel attention (average and max pools to 1 x 1) or SimAM (mean and variance over H x W)
reduces a whole feature map to one value per channel. On a tile it reduces the tile only, so
the tile departs from the whole image as it does with an ``InstanceNorm``'s own statistics
(CBAM-ResUNet: mask IoU 0.9986 with 256 px tiles and exact norm statistics, 0.9992 to 1.0 with
its channel attention pooled too, ``bench/tiling.py``).

:class:`SpatialReductions` is a ``TorchFunctionMode``: inside a tiled forward it hands every
reduction over both spatial axes of a 4-D map to :class:`~mlbench.probes.pooled_norms.PooledNorms`,
which answers with the value over the whole image pooled from the tiles' owned parts (and the
prior for tiles that have not run yet), the way it pools the norms' statistics. Recognised:
``mean``, ``sum`` (the whole image's mean times the tile's pixel count, so that a sum divided by
the tile's size gives the whole image's mean, as SimAM does), ``var`` and ``std`` (with their
correction), ``amax`` and ``F.adaptive_avg_pool2d`` / ``F.adaptive_max_pool2d`` to 1 x 1, as
functions or tensor methods. A ``mean`` or ``sum`` over one spatial axis (MA-ResUNet's triplet
attention, ``adaptive_avg_pool2d(x, (None, 1))`` in coordinate attention) is recognised too, as a
row or column profile (:mod:`mlbench.probes.pooled_profiles`). Anything else runs unchanged on the
tile: a maximum or variance over one axis, a reduction over a flattened map
(``x.flatten(2).mean(-1)``) or an attention over all positions. Which recognised calls reduce a
feature map, not another 4-D tensor (an attention matrix, a channels-last map), is the caller's to
check (:mod:`mlbench.probes.spatial_maps`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Reduction", "SpatialReductions", "spatial_reduction"]

_KINDS = {
    torch.mean: "mean", torch.Tensor.mean: "mean",
    torch.sum: "sum", torch.Tensor.sum: "sum",
    torch.var: "var", torch.Tensor.var: "var",
    torch.std: "std", torch.Tensor.std: "std",
    torch.amax: "max", torch.Tensor.amax: "max",
    F.adaptive_avg_pool2d: "avg_pool", F.adaptive_max_pool2d: "max_pool",
}


class Reduction(NamedTuple):
    """A recognised reduction over both spatial axes of a (B, C, H, W) map."""

    kind: str
    """"mean", "sum", "var", "std" or "max"."""
    input: torch.Tensor
    keepdim: bool
    correction: float = 0.0
    """Subtracted from the pixel count in the variance's denominator (``var``, ``std``)."""
    dtype: torch.dtype | None = None
    axis: int | None = None
    """None: over H and W; 2 or 3: a ``mean`` or ``sum`` over that axis alone, a row or column
    profile (:mod:`mlbench.probes.pooled_profiles`)."""


def spatial_reduction(func, args: tuple, kwargs: dict) -> Reduction | None:
    """The call ``func(*args, **kwargs)`` as a :class:`Reduction` if it reduces a floating
    (B, C, H, W) map over exactly H and W, or averages or sums it over one of them; None for
    anything else (which then runs unchanged)."""
    kind = _KINDS.get(func)
    if kind is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    z = args[0]
    if z.dim() != 4 or not z.is_floating_point():
        return None
    if kind in ("avg_pool", "max_pool"):
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if args[2:] or kwargs.get("return_indices"):
            return None
        if size in (1, (1, 1), [1, 1]):
            return Reduction("mean" if kind == "avg_pool" else "max", z, True)
        axis = _profile_axis(size, z) if kind == "avg_pool" else None
        return None if axis is None else Reduction("mean", z, True, axis=axis)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    one_axis = dim if isinstance(dim, int) else dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else None
    if isinstance(one_axis, int) and one_axis % 4 in (2, 3) and kind in ("mean", "sum"):
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if args[3:] or set(kwargs) - {"dim", "keepdim", "dtype"}:
            return None
        return Reduction(kind, z, bool(keepdim), dtype=kwargs.get("dtype"), axis=one_axis % 4)
    if not isinstance(dim, (tuple, list)) or sorted(d % 4 if isinstance(d, int) else d for d in dim) != [2, 3]:
        return None
    if kind in ("var", "std"):
        unbiased = args[2] if len(args) > 2 else kwargs.get("unbiased")
        keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
        correction = kwargs.get("correction")
        correction = (1 if unbiased in (None, True) else 0) if correction is None else correction
        if args[4:] or set(kwargs) - {"dim", "unbiased", "keepdim", "correction"}:
            return None
        return Reduction(kind, z, bool(keepdim), float(correction))
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if args[3:] or set(kwargs) - {"dim", "keepdim", "dtype"} or (kind == "max" and "dtype" in kwargs):
        return None
    return Reduction(kind, z, bool(keepdim), dtype=kwargs.get("dtype"))


def _profile_axis(size, z: torch.Tensor) -> int | None:
    """The axis an ``adaptive_avg_pool2d(z, size)`` averages away entirely while keeping the other
    (``(None, 1)``: 3, the width; ``(1, None)``: 2); None for any other output size."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        return None
    rows, cols = size
    if cols == 1 and rows in (None, z.shape[-2]) and z.shape[-2] != 1:
        return 3
    if rows == 1 and cols in (None, z.shape[-1]) and z.shape[-1] != 1:
        return 2
    return None


class SpatialReductions(TorchFunctionMode):
    """While entered, every recognised reduction goes to ``answer`` (a :class:`Reduction` to the
    tensor the call would return, or None to run the call as it is); all else runs unchanged."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer
        self.recognised = 0
        """Reductions seen (answered or not): 0 after a forward means the model has none."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KINDS:
            reduction = spatial_reduction(func, args, kwargs)
            if reduction is not None:
                self.recognised += 1
                out = self.answer(reduction)
                if out is not None:
                    return out
        return func(*args, **kwargs)
