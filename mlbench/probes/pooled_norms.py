"""Whole-image normalisation statistics for tiled inference, gathered one tile at a time.

An ``InstanceNorm`` or ``GroupNorm`` normalises by the mean and variance of what it sees, so
a tile normalised by its own statistics departs from the whole image. :class:`PooledNorms`
makes every such norm of a model normalise each tile by statistics pooled over the whole
image instead: each tile contributes sums over the part of the image it owns (the tiles
partition the image), and a norm combines the running tile's own sums, computed live, with
the other tiles' sums from their latest run. Because a norm's input depends on the norms
before it, the pooled sums are only consistent after several passes over the tiles; the
caller (``predict_tiled(norm_stats="image")``) runs passes until the output settles. Memory
stays that of one tile plus two sums per channel, norm call and tile.

Only the norms are pooled: other whole-input reductions (the channel attention's global
mean in CBAM-ResUNet, a self-attention's softmax) still see one tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

__all__ = ["PooledNorms", "pooled_norm_modules"]

Box = tuple[int, int, int, int]
"""``(top, bottom, left, right)`` of the part of a tile it owns, in the tile's pixels."""


def pooled_norm_modules(model: nn.Module) -> list[nn.Module]:
    """The norms whose output depends on the extent of their input: ``InstanceNorm1d/2d/3d``
    without running statistics (or in training mode) and ``GroupNorm``."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            found.append(module)
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if module.training or not module.track_running_stats:
                found.append(module)
    return found


class PooledNorms:
    """Pooled statistics of every extent-dependent norm of ``model``, per tile and norm call.

    Use :meth:`tile` around each tile's forward, for every tile, pass after pass. A norm called
    several times in one forward keeps one record per call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms = pooled_norm_modules(model)
        self._sums: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._totals: dict[int, list] = {}  # per norm call: sums, squares, count over all tiles
        self._tile = 0
        self._box: Box = (0, 0, 0, 0)
        self._size = (1, 1)
        self._call = 0

    @contextmanager
    def tile(self, index: int, box: Box, size: tuple[int, int]) -> Iterator[None]:
        """Pool the norms while tile ``index`` (``size`` = its (H, W), owning ``box``) runs."""
        self._tile, self._box, self._size, self._call = index, box, size, 0
        saved = [(norm, norm.__dict__.get("forward")) for norm in self.norms]
        for norm in self.norms:
            norm.forward = partial(self._pooled_forward, norm)
        try:
            yield
        finally:
            for norm, forward in saved:
                if forward is None:
                    del norm.forward
                else:
                    norm.forward = forward

    def _pooled_forward(self, norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
        call = self._call
        self._call += 1
        groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else z.shape[1]
        height, width = self._size
        top, bottom, left, right = self._box
        spatial = z.shape[2:]
        if len(spatial) >= 2:  # 2-D and 3-D maps: the owned box scaled to this map's resolution
            rows, cols = spatial[-2] / height, spatial[-1] / width
            owned = z[..., round(top * rows):round(bottom * rows), round(left * cols):round(right * cols)]
        else:
            owned = z
        sums, squares, count = _sums(owned, groups)
        key = (call, self._tile)
        total = self._totals.setdefault(call, [torch.zeros_like(sums), torch.zeros_like(squares), 0])
        if total[0].shape != sums.shape:
            raise ValueError(f"{type(norm).__name__}: tiles with different batch sizes or channels cannot pool "
                             f"statistics ({tuple(total[0].shape)} vs {tuple(sums.shape)})")
        if key in self._sums:  # replace this tile's contribution from its last run
            old_sums, old_squares, old_count = self._sums[key]
            total[0], total[1], total[2] = total[0] - old_sums, total[1] - old_squares, total[2] - old_count
        self._sums[key] = (sums, squares, count)
        total[0], total[1], total[2] = total[0] + sums, total[1] + squares, total[2] + count
        mean, var = _moments(*total) if total[2] else _moments(*_sums(z, groups))  # nothing owned yet: the tile's own
        return _normalise(norm, z, groups, mean, var)


def _sums(z: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum and sum of squares per (sample, group) in float64, and the count, from one var_mean."""
    n, channels = z.shape[:2]
    count = z[0, 0].numel() * (channels // groups) if z.numel() else 0
    if not count:
        zeros = torch.zeros(n, groups, dtype=torch.float64, device=z.device)
        return zeros, zeros, 0
    grouped = z if groups == channels else z.reshape(n, groups, -1)
    var, mean = torch.var_mean(grouped, dim=tuple(range(2, grouped.dim())), correction=0)
    mean = mean.double()
    return mean * count, (var.double() + mean.square()) * count, count


def _moments(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / count
    return mean, (total_sq / count - mean.square()).clamp_min(0)


def _normalise(norm: nn.Module, z: torch.Tensor, groups: int, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(z - mean) / sqrt(var + eps)`` per (sample, group), then the norm's affine, in z's dtype."""
    n, channels = z.shape[:2]
    scale = (var + norm.eps).rsqrt()  # (N, groups)
    shift = -mean * scale
    if groups != channels:
        per_group = channels // groups
        scale, shift = scale.repeat_interleave(per_group, dim=1), shift.repeat_interleave(per_group, dim=1)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        scale, shift = scale * weight.double(), shift * weight.double() + norm.bias.double()
    view = (n, channels) + (1,) * (z.dim() - 2)
    return torch.addcmul(shift.to(z.dtype).view(view), z, scale.to(z.dtype).view(view))
