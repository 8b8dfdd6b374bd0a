"""Resize a tile's maps on the whole image's grid: ``align_corners=True`` made tileable.

A bilinear resize with ``align_corners=True`` maps output pixel ``i`` to input coordinate
``i * (in - 1) / (out - 1)``: the scale depends on the sizes, so a tile (``in`` = 8, ``out`` =
64 for HRNet's 1/32 branch in a 256 px tile) samples another grid than the whole image (16 to
128 at 512 px), and tiles cannot reproduce the whole image, whatever their overlap. HRNet
resizes this way in every fusion and in its head, as the service's code does.

:class:`WholeImageGrid` intercepts every such ``F.interpolate`` call inside a tile's forward
(a ``TorchFunctionMode``; the model is not changed) and computes the crop of the whole
image's resize that the tile covers, from the tile's own map: global output pixel ``g``
samples global input coordinate ``g * (S_in - 1) / (S_out - 1)``, where ``S_in``, ``S_out`` are
the whole image's map sizes, shifted by the tile's offset at each resolution. Near a tile's
border the coordinate can fall outside the tile's map; it is clamped there (those pixels lie in
the overlap, which the blending discards). Exact when tile offsets and sizes are multiples of
the model's total stride, as with the 512 px samples and 256 or 384 px tiles.

The whole image's map sizes come from the stride of the tile's map: ``S = ceil(H / s)`` with
``s = tile / h``, the sizes stride-2 "same" convolutions give (HRNet's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["WholeImageGrid"]


class WholeImageGrid(TorchFunctionMode):
    """Inside :meth:`batch`, compute ``align_corners=True`` bilinear resizes on the whole image's grid.

    Parameters
    ----------
    image_size : (int, int)
        (H, W) of the whole image.
    tile_size : (int, int)
        (H, W) of every tile as it enters the model (padded).
    """

    def __init__(self, image_size: tuple[int, int], tile_size: tuple[int, int]) -> None:
        super().__init__()
        self.image_size, self.tile_size = image_size, tile_size
        self.needed: bool | None = None
        """Whether the first batch had a resize to take over; False: the model needs no grid (nor its overhead)."""
        self._offsets: list[tuple[int, int]] = []
        self._n = 1
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def batch(self, offsets: Sequence[tuple[int, int]], n: int) -> Iterator[None]:
        """Intercept while tiles at ``offsets`` ((top, left) in the image) run as one batch, N images each."""
        self._offsets, self._n = list(offsets), n
        with self:
            yield
        self.needed = bool(self.needed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.interpolate:
            out_size = _aligned_bilinear_size(*args, **kwargs)
            if out_size is not None:
                self.needed = True
                return self._resize(args[0] if args else kwargs["input"], out_size)
        return func(*args, **kwargs)

    def _resize(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Each tile's part of (tiles * N, C, h, w) resized to ``out_size`` on the whole image's grid."""
        parts = []
        for j, (top, left) in enumerate(self._offsets):
            part = z[j * self._n:(j + 1) * self._n]
            for axis, offset in ((2, top), (3, left)):
                low, high, frac = self._axis(axis, offset, part.shape[axis], out_size[axis - 2], z.device)
                shape = [1] * part.dim()
                shape[axis] = -1
                frac = frac.to(part.dtype).view(shape)
                lower, upper = part.index_select(axis, low), part.index_select(axis, high)
                part = torch.lerp(lower, upper, frac)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _axis(self, axis: int, offset: int, size_in: int, size_out: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lower and upper source indices and the fraction between them for one axis (cached)."""
        key = (axis, offset, size_in, size_out, device)
        if key not in self._cache:
            tile, image = self.tile_size[axis - 2], self.image_size[axis - 2]
            stride_in, stride_out = tile / size_in, tile / size_out
            whole_in, whole_out = math.ceil(image / stride_in - 1e-9), math.ceil(image / stride_out - 1e-9)
            scale = (whole_in - 1) / (whole_out - 1) if whole_out > 1 else 0.0
            position = torch.arange(size_out, dtype=torch.float64) + offset / stride_out
            source = (position * scale - offset / stride_in).clamp(0, size_in - 1)
            low = source.floor().long().clamp(max=size_in - 1)
            high = (low + 1).clamp(max=size_in - 1)
            self._cache[key] = (low.to(device), high.to(device), (source - low).float().to(device))
        return self._cache[key]


def _aligned_bilinear_size(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                           recompute_scale_factor=None, antialias=False) -> tuple[int, int] | None:
    """The output (h, w) of an ``F.interpolate`` call this grid takes over (bilinear, 4-D,
    ``align_corners=True``, no antialias), else None."""
    if mode != "bilinear" or not align_corners or antialias or input.dim() != 4:
        return None
    if size is not None:
        return (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    return tuple(math.floor(length * float(f)) for length, f in zip(input.shape[-2:], factors))
