"""Tiled inference against one whole-image forward: mask IoU and time ratio per model, sample, tile and method.

For each trained small model, each 512 px sample and each tile size (64 px overlap), every
method runs next to a whole-image forward, ``--repeats`` times, the methods interleaved
(whole, method, whole, method, ...), and the table gives the median of the per-pair time
ratios (method time / whole-image forward time of the same pair) with the mask IoU against
the whole-image mask, the mask IoU against ``image/all`` when it runs (the same tiles with exact
whole-image statistics: what the statistics cost apart from the context a tile lacks), and the
relative L2 error of the logits. Time is this process's CPU time
with one thread by default: on a shared machine, wall-clock ratios of the same run swung from
0.6 to 14 (``--clock wall --threads 2`` measures those). Methods:

- ``tile``: each tile normalised by its own InstanceNorm statistics (one pass);
- ``image``: whole-image statistics, the default: exact in one pass when every tile fits in
  one batch (``tile_batch``, 4 here), else a prior plus one pass: the image itself where it
  fits in a batch's pixels (its statistics then serve every tile), else a downsampled copy;
- ``image/all``: the same with every tile in one batch (exact statistics, more memory);
- ``image/own-profiles``: ``image`` with each tile's own means over one axis (triplet attention's
  row and column profiles) instead of the whole image's: what pooling the profiles costs and gains;
- ``pooled``: the iterative method, passes until the output changes by at most 1%;
- ``monai``: MONAI's ``sliding_window_inference`` (Gaussian blending, per-tile statistics),
  when monai is installed (it is not a dependency).

``--size 1024`` runs each sample mirrored 2 x 2 into a 1024 px image (objects keep their size):
the case tiling is for, with more tiles than one batch holds at ``--tiles 512``. ``--device cuda``
runs model and image on the GPU and times wall-clock with ``torch.cuda.synchronize`` around each
call (a CPU clock would not see the GPU's work); the CPU ratios do not carry over to a GPU, where a
batch of tiles is cheap and on this CPU it is not.

    python bench/tiling.py [--models cbam_resunet hrnet ma_resunet] [--tiles 256 384] [--repeats 3]
    python bench/tiling.py --size 1024 --tiles 512 --methods tile image image/all
    python bench/tiling.py --device cuda --size 1024 --tiles 512 --methods tile image image/all
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.checks.environment_probes import no_cuda_reason  # noqa: E402
from mlbench.probes.pooled_norms import PooledNorms  # noqa: E402
from mlbench.probes.tiling import tile_starts  # noqa: E402
from mlbench.studies._tile_fidelity import logits_to_mask, mask_iou  # noqa: E402

SAMPLES = ("spheroids_8bit", "spheroids_16bit", "spheroids_rgb", "nuclei_stardist")
METHODS = ("tile", "image", "image/all", "image/own-profiles", "pooled", "monai")


def method_runner(name: str, model: torch.nn.Module, x: torch.Tensor, tile: int, overlap: int,
                  batch: int) -> Callable[[], tuple[torch.Tensor, int, int]] | None:
    """A call that runs one method and returns (output, tile_batch, passes); None if unavailable."""
    if name == "monai":
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            return None
        return lambda: (sliding_window_inference(x, (tile, tile), batch, model, overlap=overlap / tile,
                                                 mode="gaussian"), batch, 1)
    norm_stats, _, variant = name.partition("/")
    tiles = len(tile_starts(x.shape[-2], tile, overlap)) * len(tile_starts(x.shape[-1], tile, overlap))
    own_profiles = mock.patch.object(PooledNorms, "_profile", lambda self, reduction, n: None)

    def run() -> tuple[torch.Tensor, int, int]:
        with own_profiles if variant == "own-profiles" else nullcontext():
            result = mb.run_tiled(model, x, tile, overlap, norm_stats=norm_stats,
                                  tile_batch=tiles if variant == "all" else batch)
        return result.output, result.tile_batch, result.passes
    return run


def model_input(model: torch.nn.Module, sample: str, size: int) -> torch.Tensor:
    """The sample preprocessed at 512 px; for ``size`` 1024, mirrored 2 x 2 (no seams, objects keep their size)."""
    x = mb.Pipeline(model, input_size=512).start(mb.load_sample(sample).image).run_until("preprocess").output(
        "preprocess")
    if size == 512:
        return x
    return torch.cat([torch.cat([x, x.flip(-1)], -1), torch.cat([x.flip(-2), x.flip(-2, -1)], -1)], -2)


def measure(model_name: str, sample: str, tiles: list[int], overlap: int, methods: list[str], repeats: int,
            batch: int, clock: Callable[[], float] = time.process_time, size: int = 512,
            device: str = "cpu") -> list[dict]:
    """Rows of one model and sample: every tile size and method, timed in interleaved pairs."""
    model = mb.load_model(model_name).eval()
    x = model_input(model, sample, size).to(device)
    model.to(device)
    with torch.no_grad():
        whole = model(x).float().cpu()
    runners = {(tile, m): method_runner(m, model, x, tile, overlap, batch) for tile in tiles for m in methods}
    runners = {key: run for key, run in runners.items() if run is not None}
    ratios: dict[tuple, list[float]] = {key: [] for key in runners}
    outputs = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an unsettled 'pooled' run shows in its IoU
        for _ in range(repeats):
            for key, run in runners.items():
                start = clock()
                model(x)
                whole_s = clock() - start
                start = clock()
                outputs[key] = run()
                ratios[key].append((clock() - start) / whole_s)
    rows = []
    for (tile, method), (output, used_batch, passes) in outputs.items():
        output = output.float().cpu()
        exact = outputs.get((tile, "image/all"))  # the same tiles with exact whole-image statistics
        iou_exact = round(mask_iou(logits_to_mask(exact[0].float().cpu()), logits_to_mask(output)), 4) if exact else None
        rows.append({"model": model_name, "sample": sample, "size": size, "tile": tile, "method": method, "tile_batch": used_batch,
                     "passes": passes, "iou": round(mask_iou(logits_to_mask(whole), logits_to_mask(output)), 4),
                     "iou_exact_stats": iou_exact,
                     "l2_error": round(float((output - whole).norm() / whole.norm()), 4),
                     "time_ratio": round(statistics.median(ratios[(tile, method)]), 2)})
    return rows


def clock_for(kind: str, device: str) -> Callable[[], float]:
    """This process's CPU time, or wall time; on a GPU wall time after the queued kernels finish."""
    if device.startswith("cuda"):
        def gpu_clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return gpu_clock
    return time.process_time if kind == "cpu" else time.perf_counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--samples", nargs="+", default=list(SAMPLES))
    parser.add_argument("--tiles", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, choices=[512, 1024],
                        help="image side: 512 (the samples) or 1024 (each mirrored 2 x 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tile-batch", type=int, default=4, help="tiles per forward (default 4, predict_tiled's)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing pairs per method (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: this process's CPU time (default: steady on a shared machine); wall: elapsed time")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda: on cuda the clock is wall time, synchronised around each call")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        reason = no_cuda_reason()
        if reason is not None:
            print(f"SKIP bench/tiling.py --device {args.device}: {reason}; nothing to measure (without --device "
                  "it measures the CPU)")
            return 0
        args.clock = "wall"
    torch.set_num_threads(args.threads)
    import pandas as pd

    try:
        import monai  # noqa: F401
    except ImportError:
        print("monai is not installed: its sliding-window rows are skipped")
    rows = []
    for name in args.models:
        for sample in args.samples:
            measured = measure(name, sample, args.tiles, args.overlap, args.methods, args.repeats, args.tile_batch,
                               clock_for(args.clock, args.device), args.size, args.device)
            print(pd.DataFrame(measured).to_string(index=False), flush=True)
            rows += measured
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(f"\nall rows ({args.repeats} interleaved pairs per method, {args.threads} thread(s), {args.clock} time, "
              f"{args.overlap} px overlap, time_ratio = median of method / whole-image forward):")
        print(table.to_string(index=False))
        summary = table.groupby(["model", "size", "tile", "method"], sort=False).agg(
            lowest_iou=("iou", "min"), median_iou=("iou", "median"), lowest_iou_exact_stats=("iou_exact_stats", "min"),
            highest_ratio=("time_ratio", "max"),
            median_ratio=("time_ratio", "median"))
        print("\nper model, tile and method, over the samples:")
        print(summary.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
