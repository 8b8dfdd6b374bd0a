"""Tiled inference with overlap and blending: ``predict_tiled(model, x, tile, overlap)``.

The image is cut into ``tile`` x ``tile`` windows that overlap by at least ``overlap`` pixels;
the windows run through the model ``tile_batch`` at a time (padded to the model's
``input_multiple`` when needed) and their outputs are blended so that seams vanish and a model
with a receptive field under ``overlap / 4`` is reproduced exactly. This module decides which
passes run; one pass over the tiles is :mod:`mlbench.probes.tile_pass`, where the tiles lie and
how they blend :mod:`mlbench.probes.tile_geometry`, and what happens when a pass runs out of
memory :mod:`mlbench.probes.tile_oom` (free, halve the batch, then the tile, retry; below
``min_tile`` fall back to the CPU once; every retry a mark on the memory timeline being recorded,
``mb.record_memory``). Their public names are importable from here too. Bilinear resizes with
``align_corners=True`` (HRNet's) are computed on the whole image's grid
(:mod:`mlbench.probes.tile_grid`). Norms that average over their input (``InstanceNorm``,
``GroupNorm``), reductions of a whole map (a squeeze-and-excitation's mean, SimAM) and means
over one axis (triplet attention's row and column profiles) use statistics of the whole image by
default (``norm_stats="image"``, :mod:`mlbench.probes.pooled_norms`,
:mod:`mlbench.probes.pooled_reductions`, :mod:`mlbench.probes.pooled_profiles`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import MlbenchError, ModelError, OptionsError
from mlbench.models.cards import input_multiple
from mlbench.probes.pooled_norms import NormPrior, PooledNorms, pooled_norm_modules
from mlbench.models.materialised import check_materialised
from mlbench.probes._hooks import check_module
from mlbench.probes.memory import note
from mlbench.probes.spatial_maps import MapProbe, probe_maps
from mlbench.probes.tile_geometry import lay_out_tiles, owned_spans, pad_to_multiple, tile_starts
from mlbench.probes.tile_grid import WholeImageGrid
from mlbench.probes.tile_oom import Attempt, TilingOutOfMemory, after_oom, free_memory, is_oom
from mlbench.probes.tile_pass import TilePass, blend_pass, call_model, map_output

__all__ = ["predict_tiled", "run_tiled", "TiledRun", "NORM_STATS", "POOLED_TOLERANCE", "pad_to_multiple", "tile_starts",
           "owned_spans", "TilingOutOfMemory", "run_device", "map_output"]


NORM_STATS = ("image", "pooled", "tile")
"""The ``norm_stats`` modes of ``predict_tiled``."""

POOLED_TOLERANCE = 0.01
"""``norm_stats="pooled"`` stops when a pass changed the output by at most this fraction of it
(L2 norm of the change over L2 norm of the output)."""


TILE_ALIGN = 32
"""Tile starts are multiples of this (and of the model's ``input_multiple``) where the even spread
allows: five halvings, the total stride of the bundled models and of most encoders, so that strided
layers see the same pixel phase in a tile as in the whole image."""


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
    """Tiled passes run: 1 with ``norm_stats="tile"`` and ``"image"``."""
    settled: bool
    """False when ``norm_stats="pooled"`` ran out of ``max_passes`` before the output settled."""
    tile_batch: int = 1
    """Tiles per forward (smaller than asked when the out-of-memory policy halved it)."""


def _prior_input(model: nn.Module, x: torch.Tensor, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` downsampled (antialiased, aspect kept) to fit ``side``, for the prior's forward, and the
    (H, W) of the image in it; ``x`` itself (padded to the model's multiple) when it fits."""
    multiple = int(getattr(model, "input_multiple", 1))
    if side >= max(x.shape[-2:]):
        return pad_to_multiple(x, multiple)
    smallest = -(-int(getattr(model, "min_input_size", 1)) // multiple) * multiple
    scale = side / max(x.shape[-2:])
    size = [max(smallest, multiple, int(length * scale) // multiple * multiple) for length in x.shape[-2:]]
    small = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return small, tuple(size)


def prior_side(tile: int, tile_batch: int) -> int:
    """The prior's side: as many pixels as one batch of tiles (``sqrt(tile_batch)`` tiles a side), so
    its forward needs no more memory than a batch does."""
    return int(tile * tile_batch ** 0.5)


def _record_prior(run: TilePass, x: torch.Tensor, side: int, maps: MapProbe) -> NormPrior:
    """The statistics of one forward of ``x`` downsampled to ``side`` over each tile's part of it;
    of ``x`` itself, where it fits in ``side``, over the whole image (one part: all that is used)."""
    small, (height, width) = _prior_input(run.model, x, side)
    small = small.to(run.device)
    full_scale = (height, width) == tuple(x.shape[-2:])
    rows, cols = height / x.shape[-2], width / x.shape[-1]
    parts = [(0, height, 0, width)] if full_scale else [
        ((top + t) * rows, (top + b) * rows, (left + l) * cols, (left + r) * cols) for top, left, (t, b, l, r) in run.tiling.places]
    return PooledNorms.record(run.model, small, parts, partial(call_model, run.model, state=run.state),
                              full_scale=full_scale, maps=maps)


def _image_stats(run: TilePass, x: torch.Tensor, tile: int, norm_stats: str, max_passes: int,
                 tolerance: float) -> tuple[torch.Tensor, int, bool]:
    """Tiled passes with whole-image norm statistics: the output, the passes and whether it settled.

    All tiles in one batch: one exact pass. Otherwise the tiles start from a prior recorded on the
    image, downsampled to a batch's pixels where it does not fit them; ``"image"`` runs one pass,
    ``"pooled"`` repeats passes until one changes the output by at most ``tolerance`` (not after a
    prior of the image itself: its statistics are the whole image's and final).
    """
    boxes = [box for _, _, box in run.tiling.places]
    multiple = int(getattr(run.model, "input_multiple", 1))
    size = tuple(-(-side // multiple) * multiple for side in run.tiling.size)  # as padded for the model
    maps = probe_maps(partial(call_model, run.model, state=run.state), x, run.device, size, multiple,
                      int(getattr(run.model, "min_input_size", 1)))
    if maps.shapes is not None and not pooled_norm_modules(run.model) and not any(
            maps.spatial(index, shape, maps.size) for index, shape in enumerate(maps.shapes)):
        return blend_pass(run, x), 1, True  # no norm and no whole-map reduction of a feature map: nothing to pool
    prior = None
    if len(boxes) > run.tile_batch:
        prior = _record_prior(run, x, prior_side(tile, run.tile_batch), maps)
        note(f"norm statistics of the whole {prior.size[0]}x{prior.size[1]} image (it fits in a batch)" if prior.full_scale
             else f"norm statistics prior from a {prior.size[0]}x{prior.size[1]} copy of the image")
    pooled = PooledNorms(run.model, boxes, size, prior, [(top, left) for top, left, _ in run.tiling.places], maps)
    result = _passes(run, x, pooled, tile, norm_stats, max_passes, tolerance)
    if maps.shapes is None and pooled.reduces:
        warnings.warn(maps.unknown_warning(type(run.model).__name__), RuntimeWarning, stacklevel=4)
    elif pooled.reductions_seen not in (None, len(maps.shapes or ())):
        warnings.warn(maps.path_warning(type(run.model).__name__, pooled.reductions_seen), RuntimeWarning, stacklevel=4)
    return result


def _passes(run: TilePass, x: torch.Tensor, pooled: PooledNorms, tile: int, norm_stats: str, max_passes: int,
            tolerance: float) -> tuple[torch.Tensor, int, bool]:
    """The tiled passes of :func:`_image_stats` under ``pooled``: one, or for ``"pooled"`` after a
    downsampled prior as many as it takes to settle."""
    prior = pooled.prior
    previous, change = None, float("inf")
    for done in range(1, max_passes + 1):
        out = blend_pass(run, x, pooled)
        if norm_stats == "image" or prior is None or prior.full_scale:  # a full-scale prior's statistics are final
            return out, done, True
        if previous is not None:
            change = float((out - previous).norm() / out.norm().clamp_min(1e-12))
        note(f"pooled norm statistics, pass {done}: output changed by {change:.3g}")
        if change <= tolerance:
            return out, done, True
        previous = out
    if max_passes > 1:
        warnings.warn(f"predict_tiled(norm_stats='pooled'): the last of {max_passes} passes at tile {tile} still "
                      f"changed the output by {change:.3g} (> {tolerance}), so it may differ from the whole "
                      "image; raise max_passes or use a larger tile (mb.tile_fidelity measures both).",
                      RuntimeWarning, stacklevel=5)
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
    multiple = input_multiple(model)
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
    tile_batch : int
        Tiles per forward (default 4): faster than one at a time, and ``tile_batch`` times one
        tile's memory. When every tile fits in one batch, ``norm_stats="image"`` is exact.
    norm_stats : {"image", "tile", "pooled"}
        How ``InstanceNorm``/``GroupNorm`` layers, which normalise by the statistics of what they
        see, and reductions of a whole map (``x.mean((2, 3))``, ``nn.AdaptiveAvgPool2d(1)``,
        ``amax``, ``var``, ``std``: squeeze-and-excitation, channel attention, SimAM) and means
        over one axis (``x.mean(dim=3)``: triplet attention's row profile) treat a tile
        (:mod:`mlbench.probes.pooled_norms`, :mod:`mlbench.probes.pooled_reductions`,
        :mod:`mlbench.probes.pooled_profiles`):

        - ``"image"`` (default): statistics of the whole image, one pass. Each tile contributes
          its owned part's statistics. With every tile in one batch they are exact; otherwise a
          forward of the image at the pixels of one batch (``tile_batch`` tiles: no more memory
          than a batch) gives a prior (a mark on the memory timeline). Where the image fits in
          those pixels the prior is the image itself, and its statistics, the whole image's,
          normalise every tile; else it is a downsampled copy that stands in for the tiles not
          run yet.
        - ``"tile"``: each tile's own statistics; one pass, furthest from the whole image.
        - ``"pooled"``: like ``"image"``, then more passes until one changes the output by at most
          ``tolerance``: where ``"image"`` is not exact, the same as all tiles in one batch, in one
          batch's memory, at several times the cost. Each pass is a mark on the memory timeline,
          and a warning says so when ``max_passes`` end first.
    device : str or torch.device, optional
        Where tiles run; default: the model's device.
    min_tile : int, optional
        Smallest tile the out-of-memory policy halves down to (default ``max(64, input_multiple)``).
    fallback : str or None
        Device to fall back to once the tile cannot shrink further (``None``: raise instead).
    max_passes : int
        The most passes ``norm_stats="pooled"`` runs.
    tolerance : float
        ``norm_stats="pooled"`` stops once a pass changes the output by at most this fraction of
        its L2 norm (default ``POOLED_TOLERANCE``, 0.01).

    Returns
    -------
    Tensor
        (N, C_out, H, W) float32 on the CPU. ``run_tiled`` also says which tile size, batch and
        device produced it and how many passes it took; ``mb.tile_fidelity`` measures how close it
        is to the whole image for a list of tile sizes.

    Raises
    ------
    TilingOutOfMemory
        If every batch and tile size and the fallback ran out of memory.

    Notes
    -----
    ``bench/tiling.py`` measured the mask IoU against one whole-image forward and the time over
    it (CPU time, one thread) for the three small models, four 512 px samples, 64 px overlap:

    - 384 px tiles (4 tiles, one batch), ``"image"``: IoU 0.988 to 1.0 at 2.0 to 2.8 times
      the whole-image forward (``"tile"``: 0.59 to 0.999).
    - 256 px tiles (9 tiles, at 0, 128 and 256 px a side), ``"image"`` in batches of 4: 0.885
      to 1.0 at 3.1 to 4.4 times (CBAM-ResUNet 0.9993 and more, MA-ResUNet 0.9977 and more,
      HRNet 0.885 to 0.996; the prior is the image itself here, it fits in a batch's pixels,
      and its statistics serve every tile); with ``tile_batch=9`` (exact pooling of the tiles'
      own statistics): 0.871 to 1.0 at 2.7 to 3.2 times; ``"pooled"`` is ``"image"`` here (one
      pass); ``"tile"``: 0.35 to 0.999.
    - 1024 px images (``--size 1024``), 512 px tiles (9, at 0, 256 and 512 px a side) in
      batches of 4, ``"image"``: 0.986 to 1.0 at 3.1 to 4.1 times (CBAM-ResUNet 0.9999 and more,
      MA-ResUNet 0.9989 and more, HRNet 0.986 to 0.9998; the prior is the image itself); with
      ``tile_batch=9``: 0.9835 to 1.0 at 2.2 to 3.6 times. MA-ResUNet's rows are with its
      triplet attention's means over one axis given the whole image's profiles (0.9936 and
      0.9973 without them, which cost 4 to 8 % of the tiled pass here).

    The tiles are spread evenly (:func:`~mlbench.probes.tile_geometry.tile_starts`): as many as
    ``overlap`` needs, overlapping their neighbours by as much as their count allows, so a tile's
    owned part lies further from its inner edges at the same cost. Stepping by ``tile - overlap``
    and shifting the last tile back put 1024 px in 512 px tiles at 0, 448 and 512, 32 px from an
    edge: HRNet's 1024 px nuclei were 0.920, its spheroids 0.996 to 0.998 (now 0.986 and 0.9989
    to 0.9998); MA-ResUNet's nuclei 0.9983 (0.9973 at first: its attention sees the whole tile, of
    which the owned part is a smaller share; 0.9989 with the whole image's profiles). Starts are
    multiples of ``TILE_ALIGN`` (32) and the model's ``input_multiple`` where the spread allows,
    so strided layers see the whole image's pixel phase.

    Pooled are the norms' moments and the whole-map reductions over the spatial dims (means,
    sums, variances, maxima, ``adaptive_*_pool2d(x, 1)``: CBAM's channel attention, SimAM,
    squeeze-and-excitation), and means over one spatial axis (triplet attention's profiles: each
    tile gets its slice of the whole image's, where all tiles share a batch or the prior ran the
    image itself). Only reductions of feature maps are pooled, told from other 4-D tensors
    reduced the same way (an attention matrix normalised by hand, a channels-last map) by one
    forward of a small input of another height and width (:mod:`mlbench.probes.spatial_maps`);
    those run on the tile. They are exact in one pass with every tile in one batch: raise
    ``tile_batch`` to the number of tiles where memory allows, else use ``"pooled"`` where the
    prior is not close enough (cluttered images far larger than a batch, where the prior is a
    small copy: HRNet's nuclei with 512 px tiles gave 0.84 against all tiles in one batch from a
    prior at half their scale, with the stepped tiles). On this CPU a batch of tiles costs more
    than the same tiles one by one (cache), which the ratios above include.

    What remains after exact statistics is context: a tile sees less of the image than the
    whole (HRNet's 1/32 branch is 8 x 8 positions in a 256 px tile: 0.83 on the cluttered
    nuclei; its differences lie along the seams between tiles' owned parts).
    ``mb.tile_fidelity`` measures the smallest faithful tile for a model and image. HRNet's
    ``align_corners=True`` resizes are computed on the whole image's grid
    (:mod:`mlbench.probes.tile_grid`); on each tile's own grid its masks were 0.965 (256 px) and
    0.918 (384 px, nuclei) instead of 0.989 and 0.988. Exactness needs tile offsets on the
    model's total stride (16 or 32 px here; the starts are on 32 px where the spread allows).
    """
    return run_tiled(model, x, tile, overlap, **options).output


def run_tiled(
    model: nn.Module,
    x: torch.Tensor,
    tile: int = 512,
    overlap: int = 64,
    *,
    tile_batch: int = 4,
    norm_stats: str = "image",
    device: str | torch.device | None = None,
    min_tile: int | None = None,
    fallback: str | None = "cpu",
    max_passes: int = 20,
    tolerance: float = POOLED_TOLERANCE,
) -> TiledRun:
    """``predict_tiled`` (the arguments are documented there), returning the output with how it was
    reached: the tile size, batch and device that produced it after any out-of-memory retries, and
    the passes it took."""
    model = check_module(model)
    check_materialised(model)
    multiple, tile = _check_args(model, x, tile, overlap)
    _warn_training(model)
    if (norm_stats not in NORM_STATS or not isinstance(tile_batch, int) or tile_batch < 1
            or not isinstance(max_passes, int) or max_passes < 1
            or not isinstance(tolerance, (int, float)) or not tolerance > 0):
        raise OptionsError(f"norm_stats must be one of {', '.join(map(repr, NORM_STATS))}, tile_batch and max_passes "
                           f"positive ints and tolerance a positive number, got norm_stats={norm_stats!r}, "
                           f"tile_batch={tile_batch!r}, max_passes={max_passes!r}, tolerance={tolerance!r}; "
                           "e.g. norm_stats='image', tile_batch=4, max_passes=20, tolerance=0.01.")
    min_tile = min_tile or max(64, multiple)
    asked = attempt = Attempt(tile, tile_batch, run_device(model, device), None)
    while True:
        overlap_now = overlap if overlap < attempt.tile // 2 else attempt.tile // 4  # only a halved tile changes it
        tiling = lay_out_tiles(*x.shape[-2:], attempt.tile, overlap_now, math.lcm(multiple, TILE_ALIGN))
        batch = min(attempt.batch, len(tiling.places))
        grid = WholeImageGrid(tuple(x.shape[-2:]), tiling.size) if len(tiling.places) > 1 else None
        run = TilePass(model, tiling, overlap_now, attempt.device, attempt.state, batch, grid)
        try:
            with torch.no_grad():
                if norm_stats == "tile" or len(tiling.places) == 1:
                    out, passes, settled = blend_pass(run, x), 1, True  # nothing to pool, or one tile is the image
                else:
                    out, passes, settled = _image_stats(run, x, attempt.tile, norm_stats, max_passes, tolerance)
            return TiledRun(out, attempt.tile, overlap_now, attempt.device, passes, settled, batch)
        except Exception as exc:  # only out-of-memory is retried; anything else is explained
            if isinstance(exc, MlbenchError):
                raise
            if not is_oom(exc):
                raise _tiles_failed(model, exc, (batch, x.shape[1], attempt.tile, attempt.tile), x.dtype) from exc
            free_memory(attempt.device)
            attempt = after_oom(model, exc, asked, attempt, batch, multiple, min_tile, overlap, fallback)


def _tiles_failed(model: nn.Module, exc: Exception, shape: tuple[int, ...], dtype: torch.dtype) -> ModelError:
    """The model's own error on a batch of tiles, with :func:`mlbench.explain_error`'s cause and fix."""
    from mlbench.failures.forward_errors import explain_error

    why = explain_error(exc, model=model, input_shape=shape, input_dtype=dtype)
    hints = ("; if the model takes one input size only, tile at that size (tile=that side); "
             "mb.trace_shapes(model, x).table shows every module's shapes" if why.failure_class == "unknown" else
             why.hints())
    return ModelError(f"the model fails on a batch of tiles {shape} {str(dtype).replace('torch.', '')} "
                      f"({type(exc).__name__}: {str(exc)[:300]}){hints}")


predict_tiled.__signature__ = inspect.signature(run_tiled).replace(return_annotation=torch.Tensor)  # for help()
