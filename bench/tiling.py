"""How close is a tiled mask to the whole-image mask? Measured per model, sample and tile size.

For each trained small model and each 512 px sample: the mask of ``predict_tiled`` (every
tile normalised by its own InstanceNorm statistics, the only way to keep one tile's memory)
against the mask of one whole-image forward, as IoU, for tiles of 256, 320 and 384 px with
64 px of overlap. The target of the issue is IoU >= 0.99.

A second column shows what a fix of the statistics alone could reach: the same tiles run as
one batch whose norms pool their statistics over all tiles (each tile counted over the part
of the image it owns, like a SyncBatchNorm across tiles). It is the bound, not an option:
it needs every tile's activations at once, as much memory as the whole image or more.

    python bench/tiling.py [--models cbam_resunet hrnet ma_resunet] [--tiles 256 320 384]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.metrics import pixel_scores  # noqa: E402
from mlbench.models.blocks import InstanceNorm2d  # noqa: E402
from mlbench.tiling import predict_tiled, tile_starts  # noqa: E402

TARGET = 0.99
SAMPLES = ("spheroids_8bit", "spheroids_16bit", "spheroids_rgb", "nuclei_stardist")


def _owned(starts: list[int], length: int, tile: int) -> list[tuple[int, int]]:
    """The part of each tile (in tile coordinates) nearest to it: the tiles partition the image."""
    bounds = []
    for i, start in enumerate(starts):
        first = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        last = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        bounds.append((first - start, last - start))
    return bounds


@contextmanager
def _pooled_norms(model: torch.nn.Module, owned: list[tuple[tuple[int, int], tuple[int, int]]], tile: int):
    """Make every InstanceNorm2d of ``model`` normalise a batch of tiles by statistics pooled over
    the owned parts of all tiles (float64 sums)."""

    def forward(norm: InstanceNorm2d, z: torch.Tensor) -> torch.Tensor:
        height, width = z.shape[-2:]
        mask = torch.zeros(z.shape[0], 1, height, width, dtype=torch.float64)
        for index, ((top, bottom), (left, right)) in enumerate(owned):
            mask[index, :, top * height // tile:bottom * height // tile, left * width // tile:right * width // tile] = 1
        wide, count = z.double(), mask.sum()
        mean = (wide * mask).sum((0, 2, 3)) / count
        var = ((wide - mean[None, :, None, None]) ** 2 * mask).sum((0, 2, 3)) / count
        scale = (norm.weight.double() / torch.sqrt(var + norm.eps))[None, :, None, None]
        return ((wide - mean[None, :, None, None]) * scale + norm.bias.double()[None, :, None, None]).float()

    norms = [m for m in model.modules() if isinstance(m, InstanceNorm2d)]
    for norm in norms:
        norm.forward = forward.__get__(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def pooled_tiled(model: torch.nn.Module, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """All tiles in one batch with pooled norm statistics; each pixel from the tile that owns it."""
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    row_own, col_own = _owned(rows, height, tile), _owned(cols, width, tile)
    places = [(top, left, r, c) for top, r in zip(rows, row_own) for left, c in zip(cols, col_own)]
    batch = torch.cat([x[..., top:top + tile, left:left + tile] for top, left, _, _ in places])
    with _pooled_norms(model, [(r, c) for _, _, r, c in places], tile), torch.no_grad():
        y = model(batch)
    out = torch.zeros(1, y.shape[1], height, width)
    for index, (top, left, (r0, r1), (c0, c1)) in enumerate(places):
        out[0, :, top + r0:top + r1, left + c0:left + c1] = y[index, :, r0:r1, c0:c1]
    return out


def measure(name: str, tiles: list[int], overlap: int) -> list[dict]:
    model = mb.load_model(name).eval()
    rows = []
    for sample in SAMPLES:
        x = mb.Pipeline(model, input_size=512).start(mb.load_sample(sample).image).run_until("preprocess").output(
            "preprocess")
        with torch.no_grad():
            start = time.perf_counter()
            whole = (model(x) > 0)[0, 0].numpy()
            whole_s = time.perf_counter() - start
        for tile in tiles:
            start = time.perf_counter()
            tiled = predict_tiled(model, x, tile=tile, overlap=overlap)
            tiled_s = time.perf_counter() - start
            pooled = pooled_tiled(model, x, tile, overlap)
            rows.append({"model": name, "sample": sample, "tile": tile,
                         "iou_per_tile_stats": round(pixel_scores(whole, (tiled > 0)[0, 0].numpy()).iou, 4),
                         "iou_pooled_stats": round(pixel_scores(whole, (pooled > 0)[0, 0].numpy()).iou, 4),
                         "time_vs_whole": round(tiled_s / whole_s, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--tiles", nargs="+", type=int, default=[256, 320, 384])
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import pandas as pd

    table = pd.DataFrame([row for name in args.models for row in measure(name, args.tiles, args.overlap)])
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False))
    summary = table.groupby(["model", "tile"])["iou_per_tile_stats"].min().unstack()
    print(f"\nlowest IoU over the samples, per-tile statistics (target >= {TARGET}):")
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
