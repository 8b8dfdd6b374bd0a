"""How good is ``estimate_memory``? Prediction vs a real CPU run, side by side.

For each small model at three sizes: the prediction (meta device, nothing allocated), the
measured peak of live tensors in a real CPU forward (``record_memory``: every tensor the
forward creates, counted when it is created and when it dies, plus parameters and input),
and the growth of the process RSS during that forward (allocator slack, workspaces and
caches on top of the tensors). Target: prediction within 5% of the measured live peak.
RSS growth depends on what the allocator already holds; it is shown for scale only.

    python bench/memory.py [--sizes 128 192 256] [--models cbam_resunet hrnet ma_resunet]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.probes import estimate_memory, record_memory  # noqa: E402

TOLERANCE = 0.05
_MIB = 1024**2


def measure(name: str, side: int) -> dict:
    model = mb.build_model(name, "small").eval()
    started = time.perf_counter()
    predicted = estimate_memory(model, side, device="cpu")
    predict_s = time.perf_counter() - started
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record_memory(model, interval=0.002) as timeline:
        model(x)
    peak = timeline.peak
    measured = peak.bytes + x.numel() * x.element_size()
    return {
        "model": name, "side": side,
        "predicted_MiB": round(predicted.peak_bytes / _MIB, 2),
        "measured_live_MiB": round(measured / _MIB, 2),
        "pred/live": round(predicted.peak_bytes / measured, 4),
        "rss_growth_MiB": round(peak.rss_growth_bytes / _MIB, 1),
        "rss/live_activations": round(peak.rss_growth_bytes / max(1, peak.bytes - timeline.baseline_bytes), 2),
        "peak_where_pred": predicted.peak_where, "peak_where_real": peak.module,
        "predict_s": round(predict_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=3, default=[128, 192, 256])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    rows = [measure(name, side) for name in args.models for side in args.sizes]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    worst = float((table["pred/live"] - 1).abs().max())
    ok = worst <= TOLERANCE
    print(f"\nlargest |prediction / measured live peak - 1| = {worst:.4f} (target <= {TOLERANCE}): "
          f"{'PASS' if ok else 'FAIL'}")
    print("RSS growth is the process view (allocator, caches, first-touch pages); the first runs also pay "
          "for warming the allocator. Report both; budget GPU memory with the live-tensor number plus margin.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
