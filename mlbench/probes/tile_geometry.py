"""Where the tiles of :func:`mlbench.probes.tiling.predict_tiled` lie and how their outputs blend.

Pure geometry, kept apart from running a model so it can be read and tested on its own: the
tiles are ``tile`` x ``tile`` windows that overlap by at least ``overlap`` pixels, as few as that
needs and spread evenly, so they overlap by as much as their count allows (:func:`tile_starts`); each tile owns the
pixels nearer to it than to its neighbours (:func:`owned_spans`, together :func:`lay_out_tiles`);
and the outputs are blended with weights that cross over linearly around the boundaries between
owners, over half the overlap (:func:`blend_ramp`). The quarter of the overlap next to a tile's
inner edge, where zero padding distorts the output, gets no weight, so seams vanish and a model
with a receptive field under ``overlap / 4`` is reproduced exactly. :func:`pad_to_multiple` pads
a window to the model's ``input_multiple``.

>>> tile_starts(300, 128, 32)
[0, 86, 172]
>>> owned_spans([0, 86, 172], 300, 128)
[(0, 107), (21, 107), (21, 128)]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mlbench.probes.pooled_norms import Box

__all__ = ["TileLayout", "blend_ramp", "lay_out_tiles", "owned_spans", "pad_to_multiple", "tile_starts"]


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


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` overlap.

    As few tiles as that overlap needs, spread evenly: at the same cost every neighbour overlaps
    by as much as the count allows, so a tile's owned part lies further from its inner edges
    (more context than stepping by ``tile - overlap`` and shifting the last tile back, which left
    one seam ``overlap`` wide). Starts are multiples of ``align`` (where a step that is one still
    keeps the overlap; the last ends at ``length``), so that a model's strided layers see the
    same pixel phase in every tile as in the whole image.
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    count = len(range(0, length - tile, step)) + 1
    even = -(-(length - tile) // (count - 1))  # the gap when spread evenly, rounded up: <= step
    aligned = -(-even // align) * align
    step = aligned if aligned <= step else even
    return [i * step for i in range(count - 1)] + [length - tile]


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


def blend_ramp(length: int, overlap: int, span: tuple[int, int], start: bool, end: bool) -> torch.Tensor:
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


class TileLayout(NamedTuple):
    """Where the tiles of one pass lie: per tile (top, left) in the image and the owned box in its
    pixels; the common (h, w) of every tile (all tiles have one size, so they can run as a batch)."""

    places: list[tuple[int, int, Box]]
    size: tuple[int, int]


def lay_out_tiles(height: int, width: int, tile: int, overlap: int, align: int = 1) -> TileLayout:
    """The tiles of side ``tile`` (overlapping by at least ``overlap``, starts on multiples of ``align``,
    :func:`tile_starts`) covering a ``height`` x ``width`` image, row by row, each with the box of its
    pixels that it owns."""
    rows, cols = tile_starts(height, tile, overlap, align), tile_starts(width, tile, overlap, align)
    row_spans, col_spans = owned_spans(rows, height, tile), owned_spans(cols, width, tile)
    places = [(top, left, rs + cs) for top, rs in zip(rows, row_spans) for left, cs in zip(cols, col_spans)]
    return TileLayout(places, (min(tile, height), min(tile, width)))
