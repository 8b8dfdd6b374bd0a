"""How close is a tiled mask to the whole-image mask? Measured per model, sample and tile size.

For each trained small model and each 512 px sample, ``mb.tile_fidelity`` compares the mask of
``predict_tiled`` with the mask of one whole-image forward, as IoU, for tiles of 256, 320, 384
and 448 px with 64 px of overlap (the issue's target: IoU >= 0.99), in both modes:

- ``norm_stats="tile"``: every tile normalised by its own InstanceNorm statistics (one pass);
- ``norm_stats="image"``: statistics pooled over the whole image, one tile at a time, in
  passes until the output settles (``passes``; ``settled`` is False where ``max_passes`` ran
  out first).

``time_ratio`` is the tiled time over the whole-image forward, measured in the same run. The
last table is the smallest faithful tile per model and sample (``TileFidelity.smallest``).

    python bench/tiling.py [--models cbam_resunet hrnet ma_resunet] [--tiles 256 320 384 448]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402

TARGET = 0.99
SAMPLES = ("spheroids_8bit", "spheroids_16bit", "spheroids_rgb", "nuclei_stardist")


def measure(name: str, tiles: list[int], overlap: int) -> tuple[list, dict]:
    """Every sample's fidelity table for one model, and its smallest faithful tile per sample and mode."""
    model = mb.load_model(name).eval()
    tables, smallest = [], {}
    for sample in SAMPLES:
        x = mb.Pipeline(model, input_size=512).start(mb.load_sample(sample).image).run_until("preprocess").output(
            "preprocess")
        fidelity = mb.tile_fidelity(model, x, tiles, overlap, target=TARGET)
        print(f"{name}, {sample}: {fidelity!r}", flush=True)
        tables.append(fidelity.table.assign(model=name, sample=sample))
        smallest[(name, sample)] = {mode: fidelity.smallest(mode) for mode in ("tile", "image")}
    return tables, smallest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--tiles", nargs="+", type=int, default=[256, 320, 384, 448])
    parser.add_argument("--overlap", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    import pandas as pd

    tables, smallest = [], {}
    for name in args.models:
        model_tables, model_smallest = measure(name, args.tiles, args.overlap)
        tables += model_tables
        smallest.update(model_smallest)
    table = pd.concat(tables, ignore_index=True)[["model", "sample", "tile", "norm_stats", "iou", "passes", "settled",
                                                  "time_ratio"]]
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(table.to_string(index=False))
    lowest = table.groupby(["model", "norm_stats", "tile"])["iou"].min().unstack()
    print(f"\nlowest IoU over the samples (target >= {TARGET}):")
    print(lowest.to_string())
    faithful = pd.DataFrame([{"model": model, "sample": sample, **modes} for (model, sample), modes in smallest.items()],
                            dtype=object)  # None stays None, tiles stay ints
    print("\nsmallest faithful tile (None: not even the largest measured):")
    print(faithful.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
