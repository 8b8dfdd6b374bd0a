"""Tiled inference with overlap and blending: ``predict_tiled(model, x, tile, overlap)``.

The image is cut into ``tile`` x ``tile`` windows that overlap by at least ``overlap`` pixels
(the last one along an axis is shifted back to end at the border); each window runs through the
model (padded to the model's ``input_multiple`` when needed). Each tile owns the pixels nearer
to it than to its neighbours, and the outputs are blended with weights that cross over linearly
around the boundaries between owners, over half the overlap: the quarter of the overlap next to
a tile's inner edge (where zero padding distorts the output) gets no weight, so seams vanish and
a model with a receptive field under ``overlap / 4`` is reproduced exactly.
Norms that average over their input (``InstanceNorm``, ``GroupNorm``) pool their statistics over
the whole image by default (``norm_stats="image"``, :mod:`mlbench.probes.pooled_norms`), in passes.
Out of memory (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate memory"),
the policy is: free, halve the tile, retry; below ``min_tile`` fall back to the CPU once;
every retry is a mark on the memory timeline being recorded (``mb.record_memory``).
"""

from __future__ import annotations

import gc
import inspect
import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import MlbenchError, OptionsError
from mlbench.probes.pooled_norms import Box, PooledNorms
from mlbench.probes._hooks import check_module
from mlbench.probes.memory import note
from mlbench.probes.shapes import shape_text, shape_of

__all__ = ["predict_tiled", "run_tiled", "TiledRun", "POOLED_TOLERANCE", "pad_to_multiple", "tile_starts", "owned_spans", "TilingOutOfMemory"]


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


def _forward_tile(model: nn.Module, tile: torch.Tensor, device: torch.device, state: dict | None,
                  pooled: PooledNorms | None = None, index: int = 0, box: Box = (0, 0, 0, 0)) -> torch.Tensor:
    padded, (height, width) = pad_to_multiple(tile.to(device), int(getattr(model, "input_multiple", 1)))
    with pooled.tile(index, box, tuple(padded.shape[-2:])) if pooled is not None else nullcontext():
        if state is None:
            out = model(padded)
        else:  # CPU fallback: parameters copied to the CPU, the model itself is not moved
            out = torch.func.functional_call(model, state, (padded,))
    return map_output(model, out)[..., :height, :width].to("cpu", torch.float32)


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


POOLED_TOLERANCE = 0.01
"""``norm_stats="image"`` stops when a pass changed the output by at most this fraction of it
(L2 norm of the change over L2 norm of the output). The passes converge geometrically, about
halving the change each pass, so the output is then about this far from where the passes settle:
0.05 left HRNet's nuclei mask at IoU 0.987 against the whole image, 0.01 reaches 0.993."""


class TiledRun(NamedTuple):
    """What ``run_tiled`` did: the output and how it was reached."""

    output: torch.Tensor
    """(N, C_out, H, W) float32 on the CPU."""
    tile: int
    """The tile side that produced it (smaller than asked when the out-of-memory policy halved it)."""
    overlap: int
    device: torch.device
    """Where the tiles ran (the fallback device after a fallback)."""
    passes: int
    """Tiled passes run: 1 with ``norm_stats="tile"``."""
    settled: bool
    """False when ``norm_stats="image"`` ran out of ``max_passes`` before the output settled."""


def _pooled_passes(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, device: torch.device,
                   state: dict | None, max_passes: int, tolerance: float) -> tuple[torch.Tensor, int, bool]:
    """Tiled passes with pooled norm statistics until the output settles: the last pass's output,
    the number of passes and whether it settled."""
    pooled = PooledNorms(model)
    one_tile = len(tile_starts(x.shape[-2], tile, overlap)) == len(tile_starts(x.shape[-1], tile, overlap)) == 1
    if not pooled.norms or one_tile:  # nothing to pool, or the one tile is the whole image
        return _blend(model, x, tile, overlap, device, state), 1, True
    previous, change = None, float("inf")
    for done in range(1, max_passes + 1):
        out = _blend(model, x, tile, overlap, device, state, pooled)
        if previous is not None:
            change = float((out - previous).norm() / out.norm().clamp_min(1e-12))
        note(f"pooled norm statistics, pass {done}: output changed by {change:.3g}")
        if change <= tolerance:
            return out, done, True
        previous = out
    if max_passes > 1:
        warnings.warn(f"predict_tiled(norm_stats='image'): the last of {max_passes} passes at tile {tile} still "
                      f"changed the output by {change:.3g} (> {tolerance}), so it may differ from the whole "
                      "image; raise max_passes or use a larger tile (mb.tile_fidelity measures both).",
                      RuntimeWarning, stacklevel=4)
    return out, max_passes, False


def _warn_training(model: nn.Module) -> None:
    """Warn when layers in training mode make tiles differ from the whole image (and change the model)."""
    training = sorted({type(m).__name__ for m in model.modules() if m.training and isinstance(
        m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))})
    if training:
        warnings.warn(f"predict_tiled: {', '.join(training)} in training mode: each tile gets its own batch statistics "
                      "or random dropout, and BatchNorm's running statistics are updated by every tile; call "
                      "model.eval() first.", RuntimeWarning, stacklevel=4)


def run_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where the model's parameters are (the CPU for a model without any)."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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


def predict_tiled(model: nn.Module, x: torch.Tensor, tile: int = 512, overlap: int = 64, **options) -> torch.Tensor:
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
        (one pass, fast, further from the whole image). ``"image"`` (default): statistics pooled
        over the whole image, gathered one tile at a time in repeated passes until a pass changes the output by at most ``tolerance``
        (:mod:`mlbench.probes.pooled_norms`); each pass is a mark on the memory timeline, and a warning
        says so when ``max_passes`` end before that. Costs that many tiled passes, not memory.
    max_passes : int
        The most passes ``norm_stats="image"`` runs.
    tolerance : float
        ``norm_stats="image"`` stops once a pass changes the output by at most this fraction of
        its L2 norm (default ``POOLED_TOLERANCE``, 0.01).

    Returns
    -------
    Tensor
        (N, C_out, H, W) float32 on the CPU. ``run_tiled`` also says which tile size and device
        produced it and how many passes it took; ``mb.tile_fidelity`` measures how close it is to
        the whole image for a list of tile sizes.

    Raises
    ------
    TilingOutOfMemory
        If every tile size and the fallback ran out of memory.

    Notes
    -----
    Every norm of the three models is an ``InstanceNorm2d``, which normalises by the statistics of
    what it sees. With ``norm_stats="tile"`` each tile is normalised by its own statistics and
    departs from the whole image, the more the smaller the tile: ``bench/tiling.py`` (mask IoU
    against one whole-image forward, four 512 px samples, 64 px overlap, tiles of 256 to 448 px)
    measured 0.915 to 0.9996 for the two ResUNets and 0.69 to 0.995 for HRNet, lowest on the
    cluttered nuclei sample.

    ``norm_stats="image"`` (the default) pools every norm's statistics over the whole image, in one
    tile's memory: each tile contributes sums over the part of the image it owns, and because a
    norm's input depends on the norms before it, the tiles run again until a pass changes the output
    by at most ``tolerance`` (6 to 12 passes; one when a single tile covers the image). The same
    bench measured 0.996 to 0.9999 for the two ResUNets at every tile size and sample, and 0.993 to
    0.9999 for HRNet with 384 and 448 px tiles. With 256 and 320 px tiles HRNet reaches 0.993 to
    0.9995 on the spheroid samples but only 0.90 and 0.94 on the nuclei sample, converged: its 1/32
    branch has 8 x 8 (10 x 10) positions per tile, all within 4 (5) positions of a tile border, and
    a larger overlap does not help (0.88 at 124 px). ``mb.tile_fidelity`` measures the smallest
    faithful tile for a model and image. The passes cost about 11 to 54 times the whole-image
    forward for the ResUNets and 49 to 171 times for HRNet on 2 shared cores, against 1.1 to 12 for
    plain tiles. Freezing all statistics from the previous pass instead diverged, pooling exactly in
    one pass would need every tile in memory at once, alternating the tile order between passes
    slowed the convergence, and Anderson mixing of the statistics saved at most one pass in ten.
    Other reductions over a whole tile (CBAM's channel attention, MA-ResUNet's self-attention) are
    not pooled.
    """
    return run_tiled(model, x, tile, overlap, **options).output


def run_tiled(
    model: nn.Module,
    x: torch.Tensor,
    tile: int = 512,
    overlap: int = 64,
    *,
    device: str | torch.device | None = None,
    min_tile: int | None = None,
    fallback: str | None = "cpu",
    norm_stats: str = "image",
    max_passes: int = 20,
    tolerance: float = POOLED_TOLERANCE,
) -> TiledRun:
    """``predict_tiled`` (the arguments are documented there), returning the output with how it was
    reached: the tile size and device that produced it after any out-of-memory retries, and the
    passes it took."""
    model = check_module(model)
    multiple, tile = _check_args(model, x, tile, overlap)
    _warn_training(model)
    if (norm_stats not in ("tile", "image") or not isinstance(max_passes, int) or max_passes < 1
            or not isinstance(tolerance, (int, float)) or not tolerance > 0):
        raise OptionsError(f"norm_stats must be 'tile' or 'image', max_passes a positive int and tolerance a positive "
                           f"number, got norm_stats={norm_stats!r}, max_passes={max_passes!r}, "
                           f"tolerance={tolerance!r}; e.g. norm_stats='image', max_passes=20, tolerance=0.01.")
    device = run_device(model, device)
    min_tile = min_tile or max(64, multiple)
    current, state = tile, None
    while True:
        current_overlap = overlap if overlap < current // 2 else current // 4  # only a halved tile changes it
        try:
            with torch.no_grad():
                if norm_stats == "tile":
                    out, passes, settled = _blend(model, x, current, current_overlap, device, state), 1, True
                else:
                    out, passes, settled = _pooled_passes(model, x, current, current_overlap, device, state,
                                                          max_passes, tolerance)
            return TiledRun(out, current, current_overlap, device, passes, settled)
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


predict_tiled.__signature__ = inspect.signature(run_tiled).replace(return_annotation=torch.Tensor)  # for help()
