"""One tiled pass: run the tiles through the model a batch at a time and blend their outputs.

:func:`blend_pass` cuts the tiles that :class:`TilePass` lays out, pads them to the model's
``input_multiple``, runs ``tile_batch`` of them per forward (under the pooled statistics and the
whole-image grid when given) and blends the outputs with the ramps of
:mod:`mlbench.probes.tile_geometry`. :mod:`mlbench.probes.tiling` decides how many passes run,
with which statistics, and what happens when one runs out of memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import OptionsError
from mlbench.probes.pooled_norms import PooledNorms
from mlbench.probes.shape_trace import shape_of, shape_text
from mlbench.probes.tile_geometry import TileLayout, blend_ramp, pad_to_multiple
from mlbench.probes.tile_grid import WholeImageGrid

__all__ = ["TilePass", "blend_pass", "call_model", "map_output"]


def map_output(model: nn.Module, out: object) -> torch.Tensor:
    """``out`` if it is one (N, C, h, w) tensor; else an :class:`OptionsError` naming what came back
    (a dict of outputs such as torchvision's ``{"out": ..., "aux": ...}``, a sequence's features)."""
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return out
    got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else (
        f"a {type(out).__name__} of {shape_text(shape_of(out))}")
    raise OptionsError(f"tiling needs a model that returns one (N, C, h, w) map per input, but "
                       f"{type(model).__name__} returned {got}; wrap it in a module whose forward returns the map, "
                       "e.g. model(x)['out'] for torchvision's segmentation models.")


def call_model(model: nn.Module, x: torch.Tensor, state: dict | None) -> object:
    """``model(x)``, or on the parameters in ``state`` (the CPU fallback: the model itself is not moved)."""
    return model(x) if state is None else torch.func.functional_call(model, state, (x,))


class TilePass(NamedTuple):
    """What one tiled pass needs besides the image: where and how the tiles run."""

    model: nn.Module
    tiling: TileLayout
    overlap: int
    device: torch.device
    state: dict | None
    tile_batch: int
    grid: WholeImageGrid | None


def blend_pass(run: TilePass, x: torch.Tensor, pooled: PooledNorms | None = None) -> torch.Tensor:
    """One tiled pass, ``run.tile_batch`` tiles per forward; (N, C, H, W) -> (N, C_out, H, W) float32
    on the CPU. With ``pooled``, the tiles' norms use statistics pooled over the tiles."""
    n, _, height, width = x.shape
    (th, tw), places = run.tiling.size, run.tiling.places
    multiple = int(getattr(run.model, "input_multiple", 1))
    out, weight = None, torch.zeros(1, 1, height, width)
    for first in range(0, len(places), run.tile_batch):
        batch = list(range(first, min(first + run.tile_batch, len(places))))
        windows = torch.cat([x[..., top:top + th, left:left + tw] for top, left, _ in (places[i] for i in batch)])
        padded, _ = pad_to_multiple(windows.to(run.device), multiple)
        use_grid = run.grid is not None and run.grid.needed is not False
        with (pooled.tiles(batch) if pooled is not None else nullcontext(),
              run.grid.batch([places[i][:2] for i in batch], n) if use_grid else nullcontext()):
            y = map_output(run.model, call_model(run.model, padded, run.state))[..., :th, :tw].to("cpu", torch.float32)
        if tuple(y.shape[-2:]) != (th, tw):
            y = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
        if out is None:
            out = torch.zeros(n, y.shape[1], height, width)
        for j, (top, left, box) in enumerate(places[i] for i in batch):
            w = (blend_ramp(th, run.overlap, box[:2], top > 0, top + th < height)[:, None]
                 * blend_ramp(tw, run.overlap, box[2:], left > 0, left + tw < width))
            out[..., top:top + th, left:left + tw] += y[j * n:(j + 1) * n] * w
            weight[..., top:top + th, left:left + tw] += w
    return out / weight
