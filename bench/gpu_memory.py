"""Prediction vs ``torch.cuda.max_memory_allocated`` on a real GPU (runs only where CUDA is).

For each model at each size that fits the GPU's free memory, the prediction of
``estimate_memory(..., device="cuda")`` is compared with the peak the CUDA caching allocator
reports for the same forward pass (parameters and input included, after a warm-up that
creates the cuDNN/cuBLAS workspaces). Target: within 15%. Without CUDA it prints why it
skips and exits 0.

    python bench/gpu_memory.py [--size full] [--sides 512 1024 2048] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.probes import estimate_memory  # noqa: E402

TOLERANCE = 0.15
_MIB = 1024**2


def cuda_ready() -> str | None:
    """None when a CUDA device can be used, else the reason it cannot."""
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU build (no CUDA compiled in)"
    try:
        if not torch.cuda.is_available():
            return "CUDA is compiled in but no GPU is visible (driver, CUDA_VISIBLE_DEVICES)"
    except (RuntimeError, AssertionError) as exc:
        return f"torch.cuda.is_available() failed: {exc}"
    return None


def measure(name: str, size: str, side: int, dtype: torch.dtype) -> dict:
    predicted = estimate_memory(mb.build_model(name, size, device="meta"), side, dtype=dtype, device="cuda")
    free, _ = torch.cuda.mem_get_info()
    row = {"model": name, "side": side, "predicted_MiB": round(predicted.peak_bytes / _MIB, 1)}
    if predicted.peak_bytes > 0.8 * free:
        return {**row, "note": f"skipped: needs more than 80% of the {free / _MIB:.0f} MiB free"}
    model = mb.build_model(name, size, device="cuda").to(dtype).eval()
    x = torch.rand(1, 3, side, side, device="cuda", dtype=dtype)
    with torch.no_grad():
        model(x)  # warm-up: cuDNN autotuning and cuBLAS workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(x)
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    del model, x
    torch.cuda.empty_cache()
    return {**row, "measured_MiB": round(measured / _MIB, 1), "pred/measured": round(predicted.peak_bytes / measured, 4),
            "note": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    reason = cuda_ready()
    if reason is not None:
        print(f"SKIP bench/gpu_memory.py: {reason}. Run it on a machine with an NVIDIA GPU and a CUDA build "
              "of torch; bench/memory.py checks the same prediction against a CPU run.")
        return 0
    import pandas as pd

    dtype = getattr(torch, args.dtype)
    rows = [measure(name, args.size, side, dtype) for name in args.models for side in args.sides]
    table = pd.DataFrame(rows)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, dtype {args.dtype}")
    print(table.to_string(index=False))
    ratios = table["pred/measured"].dropna() if "pred/measured" in table else pd.Series(dtype=float)
    worst = float((ratios - 1).abs().max()) if len(ratios) else float("nan")
    ok = len(ratios) > 0 and worst <= TOLERANCE
    print(f"\nlargest |prediction / max_memory_allocated - 1| = {worst:.4f} (target <= {TOLERANCE}): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
