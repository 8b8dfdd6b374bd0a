"""Tiled inference with overlap and blending: ``predict_tiled(model, x, tile, overlap)``.

The image is cut into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels; each
window runs through the model (padded to the model's ``input_multiple`` when needed) and the
outputs are blended with weights that are zero on the quarter of the overlap next to a tile's
inner edge (where zero padding distorts the output) and ramp linearly across the middle, so
seams vanish and a model with a receptive field under ``overlap / 4`` is reproduced exactly.
Out of memory (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate memory"),
the policy is: free, halve the tile, retry; below ``min_tile`` fall back to the CPU once;
every retry is a mark on the memory timeline being recorded (``mb.record_memory``).
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import MlbenchError, OptionsError
from mlbench.probes._hooks import check_module
from mlbench.probes.memory import note

__all__ = ["predict_tiled", "pad_to_multiple", "tile_starts", "TilingOutOfMemory"]


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


def _ramp(length: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile.

    At an inner edge (one shared with a neighbouring tile) the weight is 0 for the first
    ``overlap // 4`` pixels (they see the tile's zero padding), then rises linearly so that the
    two tiles' weights sum to 1 across the middle of the overlap; elsewhere it is 1.
    """
    weight = torch.ones(length)
    if overlap <= 0:
        return weight
    margin = overlap // 4
    distance = torch.arange(min(overlap, length), dtype=torch.float32)
    ramp = ((distance - margin + 1) / (overlap - 2 * margin + 1)).clamp(0, 1)
    if start:
        weight[: ramp.numel()] = ramp
    if end:
        weight[-ramp.numel():] = torch.minimum(weight[-ramp.numel():], ramp.flip(0))
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


def _forward_tile(model: nn.Module, tile: torch.Tensor, device: torch.device, state: dict | None) -> torch.Tensor:
    padded, (height, width) = pad_to_multiple(tile.to(device), int(getattr(model, "input_multiple", 1)))
    if state is None:
        out = model(padded)
    else:  # CPU fallback: parameters copied to the CPU, the model itself is not moved
        out = torch.func.functional_call(model, state, (padded,))
    return out[..., :height, :width].to("cpu", torch.float32)


def _blend(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, device: torch.device,
           state: dict | None) -> torch.Tensor:
    """One tiled pass at a fixed tile size; (N, C, H, W) -> (N, C_out, H, W) float32 on the CPU."""
    n, _, height, width = x.shape
    out, weight = None, torch.zeros(1, 1, height, width)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            window = x[..., top:top + tile, left:left + tile]
            th, tw = window.shape[-2:]
            y = _forward_tile(model, window, device, state)
            if tuple(y.shape[-2:]) != (th, tw):
                y = F.interpolate(y, size=(th, tw), mode="bilinear", align_corners=False)
            w = _ramp(th, overlap, top > 0, top + th < height)[:, None] * _ramp(tw, overlap, left > 0, left + tw < width)
            if out is None:
                out = torch.zeros(n, y.shape[1], height, width)
            out[..., top:top + th, left:left + tw] += y * w
            weight[..., top:top + th, left:left + tw] += w
    return out / weight


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
    so a tile that is small against the image departs from the whole-image output; the larger
    the tile, the closer. ``bench/tiling.py`` measures it (mask IoU against one whole-image
    forward, 512 px samples, 64 px overlap). Lowest over four samples, tiles of 256 / 384 px:
    MA-ResUNet 0.92 / 0.95, CBAM-ResUNet 0.92 / 0.95, HRNet 0.69 / 0.78; on the spheroid
    samples alone 0.998, 0.988 and 0.962 at 256 px. Use the largest tile that fits
    (``mb.max_input_size``) and compare one tiled and one whole run before trusting tiles.

    Whole-image statistics are not emulated. Pooling each norm's statistics over all tiles
    reaches 0.99 to 0.9999 (HRNet 0.90 on the nuclei sample) but needs every tile's activations
    at once, as much memory as the whole image; gathering them one tile at a time needs one
    tiled pass per norm layer (measured 25x the time for CBAM-ResUNet's 41; HRNet has 306), and
    cheaper fixed-point passes either diverged (all statistics frozen) or converged slowly and
    not for every model (each tile's own statistics live, the other tiles' from their last run,
    256 px tiles: CBAM-ResUNet 0.93 -> 0.998 and MA-ResUNet 0.93 -> 0.993 in 6 to 7 passes on
    the nuclei sample; HRNet stalled at 0.985 on a spheroid sample and 0.63 to 0.71 on nuclei).
    """
    model = check_module(model)
    multiple, tile = _check_args(model, x, tile, overlap)
    first = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    min_tile = min_tile or max(64, multiple)
    current, state = tile, None
    while True:
        current_overlap = overlap if overlap < current // 2 else current // 4  # only a halved tile changes it
        try:
            with torch.no_grad():
                return _blend(model, x, current, current_overlap, device, state)
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
