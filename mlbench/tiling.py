"""Tiled inference with overlap and blending: ``predict_tiled(model, x, tile, overlap)``.

The image is cut into ``tile`` x ``tile`` windows that overlap by at least ``overlap`` pixels
(the last one along an axis is shifted back to end at the border); each window runs through the
model (padded to the model's ``input_multiple`` when needed). Each tile owns the pixels nearer
to it than to its neighbours, and the outputs are blended with weights that cross over linearly
around the boundaries between owners, over half the overlap: the quarter of the overlap next to
a tile's inner edge (where zero padding distorts the output) gets no weight, so seams vanish and
a model with a receptive field under ``overlap / 4`` is reproduced exactly.
Out of memory (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate memory"),
the policy is: free, halve the tile, retry; below ``min_tile`` fall back to the CPU once;
every retry is a mark on the memory timeline being recorded (``mb.record_memory``).
"""

from __future__ import annotations

import gc
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import MlbenchError, OptionsError
from mlbench.pooled_norms import Box, PooledNorms
from mlbench.probes._hooks import check_module
from mlbench.probes.memory import note

__all__ = ["predict_tiled", "pad_to_multiple", "tile_starts", "owned_spans", "TilingOutOfMemory"]


class TilingOutOfMemory(MlbenchError, MemoryError):
    """Every tile size down to ``min_tile`` (and the CPU fallback) ran out of memory."""


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right so H and W are multiples of ``multiple``.

    Returns the padded tensor and the original (H, W): crop the output with ``out[..., :H, :W]``.
    Reflection needs the pad to be smaller than the side; otherwise edge replication is used.
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, (height, width)
    if mode == "reflect" and (pad_h >= height or pad_w >= width):
        mode = "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` overlap."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def owned_spans(starts: list[int], length: int, tile: int) -> list[tuple[int, int]]:
    """The part of each tile nearest to it, in the tile's own pixels: the tiles partition the image.

    Neighbours split their overlap in the middle; the first tile starts at 0 and the last ends
    at ``length``.
    """
    spans = []
    for i, start in enumerate(starts):
        first = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        last = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        spans.append((first - start, min(last, start + tile) - start))
    return spans


def _ramp(length: int, overlap: int, span: tuple[int, int], start: bool, end: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile that owns ``span`` (tile pixels) of the image.

    At a boundary shared with a neighbouring tile (the middle of their overlap) the weight falls
    linearly from 1 to 0 over ``overlap - 2 * (overlap // 4)`` pixels centred on the boundary, and
    the neighbour's rises over the same pixels, so the two sum to 1. The quarter of the overlap next
    to a tile's inner edge (which sees the tile's zero padding) gets no weight, also where a tile
    was shifted back to end at the image border and overlaps its neighbour by more than ``overlap``.
    """
    width = overlap - 2 * (overlap // 4)
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)

    def rising(boundary: int) -> torch.Tensor:
        if width <= 0:
            return (position >= boundary).float()
        return ((position - (boundary - width / 2)) / width).clamp(0, 1)

    if start:
        weight = weight * rising(span[0])
    if end:
        weight = weight * (1 - rising(span[1]))
    return weight


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except (RuntimeError, AssertionError):  # CPU build of torch
            pass


def _forward_tile(model: nn.Module, tile: torch.Tensor, device: torch.device, state: dict | None,
                  pooled: PooledNorms | None = None, index: int = 0, box: Box = (0, 0, 0, 0)) -> torch.Tensor:
    padded, (height, width) = pad_to_multiple(tile.to(device), int(getattr(model, "input_multiple", 1)))
    with pooled.tile(index, box, tuple(padded.shape[-2:])) if pooled is not None else nullcontext():
        if state is None:
            out = model(padded)
        else:  # CPU fallback: parameters copied to the CPU, the model itself is not moved
            out = torch.func.functional_call(model, state, (padded,))
    return out[..., :height, :width].to("cpu", torch.float32)


def _blend(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, device: torch.device,
           state: dict | None, pooled: PooledNorms | None = None) -> torch.Tensor:
    """One tiled pass at a fixed tile size; (N, C, H, W) -> (N, C_out, H, W) float32 on the CPU.

    With ``pooled``, every tile's norms use statistics pooled over the tiles. The tiles run in the
    same order in every pass: alternating the order was measured to slow the passes' convergence
    (HRNet, 8 passes: error 0.25 against 0.04 of the whole-image output's norm).
    """
    n, _, height, width = x.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    row_spans, col_spans = owned_spans(rows, height, tile), owned_spans(cols, width, tile)
    places = [(top, left, rs + cs) for top, rs in zip(rows, row_spans) for left, cs in zip(cols, col_spans)]
    out, weight = None, torch.zeros(1, 1, height, width)
    for index, (top, left, box) in enumerate(places):
        window = x[..., top:top + tile, left:left + tile]
        th, tw = window.shape[-2:]
        y = _forward_tile(model, window, device, state, pooled, index, box)
        if tuple(y.shape[-2:]) != (th, tw):
            y = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
        w = (_ramp(th, overlap, box[:2], top > 0, top + th < height)[:, None]
             * _ramp(tw, overlap, box[2:], left > 0, left + tw < width))
        if out is None:
            out = torch.zeros(n, y.shape[1], height, width)
        out[..., top:top + th, left:left + tw] += y * w
        weight[..., top:top + th, left:left + tw] += w
    return out / weight


POOLED_TOLERANCE = 0.05
"""``norm_stats="image"`` stops when a pass changed the output by at most this fraction of it
(L2 norm of the change over L2 norm of the output)."""


def _pooled_passes(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, device: torch.device,
                   state: dict | None, max_passes: int) -> torch.Tensor:
    """Tiled passes with pooled norm statistics until the output settles; the last pass's output."""
    pooled = PooledNorms(model)
    if not pooled.norms:
        return _blend(model, x, tile, overlap, device, state)
    previous, change = None, float("inf")
    for done in range(1, max_passes + 1):
        out = _blend(model, x, tile, overlap, device, state, pooled)
        if previous is not None:
            change = float((out - previous).norm() / out.norm().clamp_min(1e-12))
        note(f"pooled norm statistics, pass {done}: output changed by {change:.3g}")
        if change <= POOLED_TOLERANCE:
            return out
        previous = out
    if max_passes > 1:
        warnings.warn(f"predict_tiled(norm_stats='image'): the last of {max_passes} passes at tile {tile} still "
                      f"changed the output by {change:.3g} (> {POOLED_TOLERANCE}), so it may differ from the whole "
                      "image; raise max_passes or use a larger tile (bench/tiling.py measures both).",
                      RuntimeWarning, stacklevel=3)
    return out


def _check_args(model: nn.Module, x: torch.Tensor, tile: int, overlap: int) -> tuple[int, int]:
    """Validate the arguments; return the model's input multiple and the tile rounded down to it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise OptionsError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}; "
                           "add the batch axis with x[None].")
    multiple = int(getattr(model, "input_multiple", 1))
    rounded = tile // multiple * multiple if isinstance(tile, int) else 0
    if rounded < max(multiple, 2) or not isinstance(overlap, int) or not 0 <= overlap < rounded // 2:
        as_run = f" (rounded down to the model's input multiple {multiple}: {rounded})" if rounded != tile else ""
        raise OptionsError(f"need tile >= {max(multiple, 2)} and 0 <= overlap < tile / 2, got tile={tile!r}{as_run}, "
                           f"overlap={overlap!r}; e.g. tile=512, overlap=64.")
    return multiple, rounded


def predict_tiled(
    model: nn.Module,
    x: torch.Tensor,
    tile: int = 512,
    overlap: int = 64,
    *,
    device: str | torch.device | None = None,
    min_tile: int | None = None,
    fallback: str | None = "cpu",
    norm_stats: str = "tile",
    max_passes: int = 10,
) -> torch.Tensor:
    """Run ``model`` on ``x`` tile by tile and blend: the same output as ``model(x)``, in less memory.

    Parameters
    ----------
    model : nn.Module
        Maps (N, C, h, w) to (N, C_out, h, w); ``input_multiple`` is respected by padding.
        Run it in the mode you want (``model.eval()``); it is not changed.
    x : Tensor
        (N, C, H, W) input on any device.
    tile, overlap : int
        Tile side and overlap in pixels (``0 <= overlap < tile / 2``); the tile is rounded down to
        the model's ``input_multiple``.
    device : str or torch.device, optional
        Where tiles run; default: the model's device.
    min_tile : int, optional
        Smallest tile the out-of-memory policy halves down to (default ``max(64, input_multiple)``).
    fallback : str or None
        Device to fall back to once the tile cannot shrink further (``None``: raise instead).
    norm_stats : {"tile", "image"}
        ``"tile"``: each tile's ``InstanceNorm``/``GroupNorm`` layers use that tile's statistics
        (one pass). ``"image"``: statistics pooled over the whole image, gathered one tile at a
        time in repeated passes until a pass changes the output by at most ``POOLED_TOLERANCE``
        (:mod:`mlbench.pooled_norms`); each pass is a mark on the memory timeline, and a warning
        says so when ``max_passes`` end before that. Costs that many tiled passes, not memory.
    max_passes : int
        The most passes ``norm_stats="image"`` runs.

    Returns
    -------
    Tensor
        (N, C_out, H, W) float32 on the CPU.

    Raises
    ------
    TilingOutOfMemory
        If every tile size and the fallback ran out of memory.

    Notes
    -----
    ``InstanceNorm2d`` (all three models) normalises each tile by that tile's own statistics,
    so with ``norm_stats="tile"`` a tile that is small against the image departs from the
    whole-image output; the larger the tile, the closer. ``bench/tiling.py`` measures it (mask
    IoU against one whole-image forward, four 512 px samples, 64 px overlap): with 256 px tiles
    0.92 to 0.998 for the two ResUNets and 0.69 to 0.986 for HRNet, lowest on the nuclei sample.

    ``norm_stats="image"`` pools every norm's statistics over the whole image, in one tile's
    memory: each tile contributes sums over the part of the image it owns, and because a norm's
    input depends on the norms before it, the tiles are run again until a pass changes the output
    by at most ``POOLED_TOLERANCE``. Measured with 256 and 384 px tiles, every run settled in 4
    to 10 passes: CBAM-ResUNet 0.998 to 0.9998 and MA-ResUNet 0.994 to 0.9996 on every sample,
    HRNet 0.991 to 0.998 on the spheroid samples and 0.987 on the nuclei sample with 384 px tiles,
    but 0.90 with 256 px tiles: there its 1/32 branch (8 x 8 positions per tile) loses context at
    the tile borders, and exact pooling (all tiles in one batch, measured as a bound) gets no
    further. The passes cost about 9 to 30 times the whole-image forward for the ResUNets and up
    to 220 times for HRNet, against 2 to 8 for plain tiles. Freezing all statistics from the
    previous pass instead diverged, pooling exactly in one pass would need every tile in memory
    at once, and alternating the tile order between passes slowed the convergence. Other
    reductions over a whole tile (CBAM's channel attention, MA-ResUNet's self-attention) are not
    pooled. For HRNet on cluttered images, use the largest tile that fits.
    """
    model = check_module(model)
    multiple, tile = _check_args(model, x, tile, overlap)
    if norm_stats not in ("tile", "image") or not isinstance(max_passes, int) or max_passes < 1:
        raise OptionsError(f"norm_stats must be 'tile' or 'image' and max_passes a positive int, got "
                           f"norm_stats={norm_stats!r}, max_passes={max_passes!r}; "
                           "e.g. norm_stats='image', max_passes=10.")
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    min_tile = min_tile or max(64, multiple)
    current, state = tile, None
    while True:
        current_overlap = overlap if overlap < current // 2 else current // 4  # only a halved tile changes it
        try:
            with torch.no_grad():
                if norm_stats == "tile":
                    return _blend(model, x, current, current_overlap, device, state)
                return _pooled_passes(model, x, current, current_overlap, device, state, max_passes)
        except Exception as exc:  # only out-of-memory is handled; anything else propagates
            if not _is_oom(exc):
                raise
            _free(device)
            smaller = current // 2 // multiple * multiple
            if smaller >= min_tile:
                shrunk = "" if overlap < smaller // 2 else f", overlap {smaller // 4} (was {overlap})"
                note(f"out of memory at tile {current} on {device}: retry at tile {smaller}{shrunk}")
                current = smaller
            elif fallback is not None and state is None:
                note(f"out of memory at tile {current} on {device}: fall back to {fallback} at tile {tile}")
                device = torch.device(fallback)
                state = {k: v.detach().to(device, copy=True) for k, v in [*model.named_parameters(), *model.named_buffers()]}
                current = tile
            else:
                raise TilingOutOfMemory(
                    f"out of memory at every tile size from {tile} down to {current} on {device}"
                    f"{' and after falling back to ' + fallback if state is not None else ''}; "
                    "estimate the need with mb.estimate_memory(model, (1, C, tile, tile)) and free memory, "
                    "or use a smaller min_tile."
                ) from exc
