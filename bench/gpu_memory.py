"""Prediction vs ``torch.cuda.max_memory_allocated`` on a real GPU (runs only where CUDA is).

For each full-size model at 1024 and 2048 px (by default), the prediction of
``mb.estimate_memory(model, side, device="cuda")`` is compared with the peak the CUDA caching
allocator reports for the same forward pass (parameters and input included, after a warm-up
that creates the cuDNN/cuBLAS workspaces); the table shows each ratio. Target: within 15%.
Every CUDA call is guarded: a measurement that fails (out of memory, a driver error) is a row
saying so, not a crash. Without a usable CUDA device it prints one line saying why it skipped
and exits 0.

    python bench/gpu_memory.py [--size full] [--sides 1024 2048] [--dtype float32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.checks.environment_probes import no_cuda_reason  # noqa: E402

TOLERANCE = 0.15
_MIB = 1024**2


def _free_bytes() -> int | None:
    """Free GPU memory, or None where ``mem_get_info`` fails (the CPU build raises AssertionError)."""
    try:
        return int(torch.cuda.mem_get_info()[0])
    except (RuntimeError, AssertionError):
        return None


def _peak_of_forward(name: str, size: str, side: int, dtype: torch.dtype) -> int:
    """``torch.cuda.max_memory_allocated`` over one forward pass after a warm-up one (bytes)."""
    model = mb.build_model(name, size, device="cuda").to(dtype).eval()
    x = torch.rand(1, 3, side, side, device="cuda", dtype=dtype)
    with torch.no_grad():
        model(x)  # warm-up: cuDNN autotuning and cuBLAS workspaces
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(x)
        torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def measure(name: str, size: str, side: int, dtype: torch.dtype) -> dict:
    """One table row: predicted and measured peak (MiB) and their ratio, or a note saying why not."""
    predicted = mb.estimate_memory(mb.build_model(name, size, device="meta"), side, dtype=dtype, device="cuda")
    row = {"model": name, "side": side, "predicted_MiB": round(predicted.peak_bytes / _MIB, 1)}
    free = _free_bytes()
    if free is not None and predicted.peak_bytes > 0.8 * free:
        return {**row, "note": f"skipped: needs more than 80% of the {free / _MIB:.0f} MiB free"}
    try:
        measured = _peak_of_forward(name, size, side, dtype)
    except (RuntimeError, AssertionError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        return {**row, "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        _empty_cache()
    return {**row, "measured_MiB": round(measured / _MIB, 1), "pred/measured": round(predicted.peak_bytes / measured, 4),
            "note": ""}


def _empty_cache() -> None:
    try:
        torch.cuda.empty_cache()
    except (RuntimeError, AssertionError):
        pass


def _device_name() -> str:
    try:
        return torch.cuda.get_device_name(0)
    except (RuntimeError, AssertionError) as exc:
        return f"unknown ({type(exc).__name__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    reason = no_cuda_reason()
    if reason is not None:
        print(f"SKIP bench/gpu_memory.py: {reason}; nothing to measure (bench/memory.py checks the same "
              "prediction against a CPU run)")
        return 0
    import pandas as pd

    dtype = getattr(torch, args.dtype)
    rows = [measure(name, args.size, side, dtype) for name in args.models for side in args.sides]
    table = pd.DataFrame(rows)
    print(f"GPU: {_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    print(table.to_string(index=False))
    ratios = table["pred/measured"].dropna() if "pred/measured" in table else pd.Series(dtype=float)
    worst = float((ratios - 1).abs().max()) if len(ratios) else float("nan")
    failed = [f"{r['model']}@{r['side']}" for r in rows if r["note"].startswith("failed")]
    ok = len(ratios) > 0 and worst <= TOLERANCE and not failed
    print(f"\nlargest |prediction / max_memory_allocated - 1| = {worst:.4f} over {len(ratios)}/{len(rows)} measured, "
          f"failed: {', '.join(failed) or 'none'} "
          f"(target <= {TOLERANCE}): {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
