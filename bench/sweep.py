"""Sweep throughput: N generated images x 3 small models, serially and on a 2-worker LocalCluster.

Prints both wall times, the speed-up (target >= 1.6x on 2 cores) and the per-task overhead
of the cluster (wall time x workers / tasks minus the mean in-task time). Run by hand:

    python bench/sweep.py [--images 200] [--size 128] [--workers 2] [--untrained]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mlbench.studies import sweep, sweep_executor  # noqa: E402
from mlbench.samples.synthetic import make_spheroids  # noqa: E402

MODELS = ("hrnet", "cbam_resunet", "ma_resunet")
TARGET = 1.6


def make_folder(folder: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        image, _ = make_spheroids((size, size), 4, rng)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img_{i:04d}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--untrained", action="store_true")
    args = parser.parse_args()
    weights = "untrained" if args.untrained else "trained"
    options = {"input_size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), args.images, args.size)
        sweep(folder, MODELS, weights=weights, options=options, progress=False, resume=False)  # warm-up
        start = time.perf_counter()
        serial = sweep(folder, MODELS, weights=weights, options=options, progress=False)
        serial_s = time.perf_counter() - start
        executor = sweep_executor("local", n_workers=args.workers)
        try:
            sweep(list(folder.iterdir())[:2], MODELS, weights=weights, options=options, progress=False,
                  executor=executor)  # workers import torch and load the models once
            start = time.perf_counter()
            dask = sweep(folder, MODELS, weights=weights, options=options, progress=False, executor=executor)
            dask_s = time.perf_counter() - start
        finally:
            executor.client.close()
            executor.client.cluster.close()
    tasks = len(serial)
    in_task = float(dask["t_total"].mean())
    overhead = dask_s * args.workers / tasks - in_task
    print(f"{tasks} tasks ({args.images} images x {len(MODELS)} models, {args.size} px, {weights})")
    print(f"serial: {serial_s:.1f} s ({serial_s / tasks * 1000:.0f} ms/task); "
          f"dask {args.workers} workers: {dask_s:.1f} s")
    print(f"speed-up: {serial_s / dask_s:.2f}x (target >= {TARGET}x); per-task overhead: {overhead * 1000:.0f} ms")
    print(f"statuses: serial {serial['status'].value_counts().to_dict()}, dask {dask['status'].value_counts().to_dict()}")
    return 0 if serial_s / dask_s >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
