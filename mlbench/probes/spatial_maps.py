"""Which of a model's recognised reductions reduce a spatial feature map, told by one small forward.

:mod:`mlbench.probes.pooled_reductions` recognises a mean, sum, variance or maximum over the last
two axes of any 4-D tensor, and a mean or sum over one of them. In a segmentation network most
such tensors are (N, C, H, W) feature maps, whose whole-image values the tiles may borrow; but a
user's model may reduce other 4-D tensors the same way: an attention matrix (N, heads, P, P) over
the P positions of a map, normalised by hand (``a / a.sum(-1, keepdim=True)``), or a map in
channels-last layout (N, H, W, C) averaged over its channels. Given the whole image's value of
such a reduction, a tile computes nonsense (a hand-written softmax over a 4 x 4 bottleneck gave
logits of 1e13). The shape of one tile does not tell them apart: with square tiles an attention
over 16 x 16 positions of a 256 px tile is a 256 x 256 matrix, the shape of a full-resolution map.

:func:`probe_maps` runs the model once on the image resized to another height and width
(smaller than a tile: 64 x 96 beside tiles over 96 px) and keeps the shape of every recognised
reduction's input, in call order. :meth:`MapProbe.spatial` then compares a call's shape in the
tiles' forward with the same call's in the probe: a feature map's height follows the input's height
alone and its width the input's width alone (to the rounding of strided layers), where an
attention's positions follow both and a channel axis neither. Only such calls are pooled; the rest
run unchanged on the tile. A forward that fails at the probe's size (a model with a fixed input
size) leaves no call judged spatial: the reductions then see their tile, with a warning
(:meth:`MapProbe.unknown_warning`); an out-of-memory error there propagates, to the tiles' policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mlbench.probes.pooled_reductions import Reduction, SpatialReductions
from mlbench.probes.tile_oom import is_oom

__all__ = ["MapProbe", "PROBE_SIDE", "probe_maps", "probe_size"]

PROBE_SIDE = 96
"""The probe's larger side at most where the tile allows: its width is the largest accepted side up
to this and below the tile's shorter side, its height one near two thirds of that (64 x 96 beside
tiles over 96 px), so the probe costs a fraction of one tile; beside tiles of 96 px and less it
may be larger than a tile (the sides must differ from the tile's)."""


class MapProbe(NamedTuple):
    """The input shapes of a model's recognised reductions, in call order, at a probe input size."""

    size: tuple[int, int]
    """(H, W) of the probe's input."""
    shapes: tuple[tuple[int, ...], ...] | None
    """Per recognised reduction, its input's shape; None when the probe's forward failed."""
    failure: str = ""
    """What the probe's forward raised, if it failed."""

    def path_warning(self, model_name: str, seen: int) -> str:
        """What it means that the tiles' forward made another number of recognised reductions than the probe's."""
        return (f"predict_tiled: {model_name} made {seen} whole-map reductions per tile but {len(self.shapes or ())} on "
                f"the {self.size[0]}x{self.size[1]} probe input (its forward takes another path at another size), so "
                "they were matched to the probe's in order and those whose shapes did not line up saw their own tile "
                "only (the norms were pooled)")

    def unknown_warning(self, model_name: str) -> str:
        """What a failed probe means for a model whose forward turned out to have recognised reductions."""
        return (f"predict_tiled: {model_name} failed on a {self.size[0]}x{self.size[1]} probe input ({self.failure}), "
                "so which of its whole-map reductions (means, sums, maxima over H and W) reduce feature maps is "
                "unknown; they saw their own tile only (the norms were pooled). A model that accepts that size "
                "gets them pooled.")

    def spatial(self, index: int, shape: tuple[int, ...], size: tuple[int, int]) -> bool:
        """Whether recognised reduction ``index``, with input ``shape`` in a forward of an input
        ``size`` (H, W), reduces a feature map: its channels as in the probe, its height scaled by
        the inputs' heights and its width by their widths, each within the rounding of strided
        layers (one position, plus the scale)."""
        if self.shapes is None or index >= len(self.shapes):
            return False
        probed = self.shapes[index]
        if len(probed) != 4 or len(shape) != 4 or probed[1] != shape[1]:
            return False
        for axis in (2, 3):
            scale = self.size[axis - 2] / size[axis - 2]
            if abs(probed[axis] - shape[axis] * scale) > 1 + scale:
                return False
        return True


def probe_size(tile: tuple[int, int], multiple: int, minimum: int = 1) -> tuple[int, int]:
    """The probe's (H, W): two different sides that the model accepts (multiples of its declared
    ``multiple`` and of 8; of 32 first where it declares none, as a stride-32 network needs; at
    least ``minimum``, its ``min_input_size``) and that differ from the tile's: below its shorter
    side where two fit (:data:`PROBE_SIDE`), else the smallest that do not equal a side of it
    (then larger than a small tile)."""
    steps = [math.lcm(int(multiple), 8)] if int(multiple) > 1 else [32, 8]
    for step in steps:
        lowest = -(-max(int(minimum), step) // step) * step
        below = [side for side in range(lowest, PROBE_SIDE + 1, step) if side < min(tile)]
        if len(below) >= 2:  # the height about two thirds of the width: the axes' scales far apart
            return max((side for side in below[:-1] if 3 * side <= 2 * below[-1]), default=below[-2]), below[-1]
    sides = [side for side in range(lowest, lowest + step * (max(tile) // step + 3), step) if side not in tile]
    return sides[0], sides[1]


def probe_maps(forward: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device,
               tile: tuple[int, int], multiple: int, minimum: int = 1) -> MapProbe:
    """Run ``forward`` once on the first image of ``x`` resized to :func:`probe_size` (the image
    itself, not zeros: a model may skip a blank input) and record every recognised reduction's
    input shape."""
    size = probe_size(tile, multiple, minimum)
    shapes: list[tuple[int, ...]] = []

    def record(reduction: Reduction) -> None:
        shapes.append(tuple(reduction.input.shape))

    small = F.interpolate(x[:1].to(device, torch.float32), size=size, mode="bilinear", align_corners=False)
    small = small.round().to(x.dtype) if not x.is_floating_point() else small.to(x.dtype)
    try:
        with torch.no_grad(), SpatialReductions(record):
            forward(small)
    except Exception as exc:  # the model may refuse this size only: the tiles' forward will raise what is general
        if is_oom(exc):
            raise
        return MapProbe(size, None, f"{type(exc).__name__}: {str(exc)[:200]}")
    return MapProbe(size, tuple(shapes))
