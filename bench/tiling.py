"""How close is a tiled mask to the whole-image mask? Measured per model, sample and tile size.

For each trained small model and each 512 px sample, the mask of ``predict_tiled`` against the
mask of one whole-image forward, as IoU, for tiles of 256, 320 and 384 px with 64 px of
overlap (the issue's target: IoU >= 0.99), in both modes:

- ``norm_stats="tile"``: every tile normalised by its own InstanceNorm statistics (one pass);
- ``norm_stats="image"``: statistics pooled over the whole image, one tile at a time, in
  passes until the output settles (``passes``; ``settled`` is False where ``max_passes`` ran
  out first).

Times are relative to the whole-image forward, measured in the same run.

    python bench/tiling.py [--models cbam_resunet hrnet ma_resunet] [--tiles 256 320 384]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.metrics import pixel_scores  # noqa: E402
from mlbench.tiling import predict_tiled  # noqa: E402

TARGET = 0.99
SAMPLES = ("spheroids_8bit", "spheroids_16bit", "spheroids_rgb", "nuclei_stardist")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(name: str, tiles: list[int], overlap: int, max_passes: int) -> list[dict]:
    model = mb.load_model(name).eval()
    rows = []
    for sample in SAMPLES:
        x = mb.Pipeline(model, input_size=512).start(mb.load_sample(sample).image).run_until("preprocess").output(
            "preprocess")
        with torch.no_grad():
            whole, whole_s = _timed(lambda: (model(x) > 0)[0, 0].numpy())
        for tile in tiles:
            per_tile, tile_s = _timed(lambda: predict_tiled(model, x, tile=tile, overlap=overlap))
            marks: list[str] = []
            with mock.patch("mlbench.tiling.note", side_effect=marks.append), \
                    warnings.catch_warnings(record=True) as unsettled:
                warnings.simplefilter("always")
                pooled, pooled_s = _timed(lambda: predict_tiled(model, x, tile=tile, overlap=overlap,
                                                                norm_stats="image", max_passes=max_passes))
            rows.append({"model": name, "sample": sample, "tile": tile,
                         "iou_tile": round(pixel_scores(whole, (per_tile > 0)[0, 0].numpy()).iou, 4),
                         "iou_image": round(pixel_scores(whole, (pooled > 0)[0, 0].numpy()).iou, 4),
                         "passes": len(marks), "settled": not unsettled,
                         "time_tile": round(tile_s / whole_s, 1), "time_image": round(pooled_s / whole_s, 1)})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--tiles", nargs="+", type=int, default=[256, 320, 384])
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--max-passes", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import pandas as pd

    rows = [row for name in args.models for row in measure(name, args.tiles, args.overlap, args.max_passes)]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160):
        print(table.to_string(index=False))
    lowest = table.groupby(["model", "tile"])[["iou_tile", "iou_image"]].min().unstack()
    print(f"\nlowest IoU over the samples (target >= {TARGET}):")
    print(lowest.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
