"""Overhead of looking inside a forward pass, measured side by side in one run.

For each small model at one input size, times (best of N and median, interleaved so machine
load hits all alike): the bare forward, ``trace_shapes(stats=False)``, ``trace_shapes(stats=True)``,
``torchinfo.summary`` and TorchLens where they are installed. Prints ratios to the bare forward:
of the best times, of the medians, and ``ratio_paired``, the median of each run's time over the
bare forward run right next to it (the order alternates). On a shared machine the load changes
from second to second, so the paired ratio is the one judged: the target for ``trace_shapes``
without statistics is <= 1.15. The best-of ratio swung from 1.08 to 1.43 between runs a
minute apart (HRNet) because one of the two tools never met a quiet moment.

    python bench/probes.py [--size 256] [--repeats 7] [--models cbam_resunet hrnet ma_resunet]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.probes import trace_shapes  # noqa: E402

TARGET = 1.15


def _contenders(model: torch.nn.Module, x: torch.Tensor) -> dict:
    def bare():
        with torch.no_grad():
            model(x)

    found = {"bare forward": bare,
             "trace_shapes(stats=False)": lambda: trace_shapes(model, x, stats=False),
             "trace_shapes(stats=True)": lambda: trace_shapes(model, x, stats=True)}
    try:
        import torchinfo

        found["torchinfo.summary"] = lambda: torchinfo.summary(model, input_data=x, verbose=0, mode="eval")
    except ImportError:
        print("torchinfo: not installed (pip install --no-deps torchinfo)")
    try:
        import torchlens

        log = getattr(torchlens, "log_forward_pass", None)
        if log is not None:
            found["torchlens.log_forward_pass"] = lambda: log(model, x, vis_opt="none")
        else:
            print("torchlens: installed but has no log_forward_pass; skipped")
    except Exception as exc:  # an import that fails for any reason: skip, say why
        print(f"torchlens: unavailable ({type(exc).__name__}: {exc})")
    return found


def measure(name: str, size: int, repeats: int) -> list[dict]:
    model = mb.build_model(name, "small").eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    contenders = _contenders(model, x)
    times: dict[str, list[float]] = {key: [] for key in contenders}
    broken: dict[str, str] = {}
    for fn in contenders.values():  # warm-up
        try:
            fn()
        except Exception as exc:
            broken[next(k for k, v in contenders.items() if v is fn)] = f"{type(exc).__name__}: {exc}"[:80]
    order = list(contenders.items())
    for repeat in range(repeats):  # every tool right before or after the bare forward, alternately
        for key, fn in (order if repeat % 2 == 0 else order[::-1]):
            if key in broken:
                continue
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    base_best, base_median = min(times["bare forward"]), statistics.median(times["bare forward"])
    rows = []
    for key in contenders:
        if key in broken:
            rows.append({"model": name, "size": size, "tool": key, "note": broken[key]})
            continue
        best, median = min(times[key]), statistics.median(times[key])
        paired = statistics.median(t / b for t, b in zip(times[key], times["bare forward"]))
        rows.append({"model": name, "size": size, "tool": key, "best_ms": round(best * 1000, 1),
                     "median_ms": round(median * 1000, 1), "ratio_best": round(best / base_best, 3),
                     "ratio_median": round(median / base_median, 3), "ratio_paired": round(paired, 3), "note": ""})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    rows = [row for name in args.models for row in measure(name, args.size, args.repeats)]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.fillna("").to_string(index=False))
    plain = table[table["tool"] == "trace_shapes(stats=False)"]
    ok = bool((plain["ratio_paired"] <= TARGET).all())
    print(f"\ntrace_shapes without statistics, median over {args.repeats} back-to-back pairs of its time over the "
          f"bare forward's: {', '.join(f'{m} {r:.3f}' for m, r in zip(plain['model'], plain['ratio_paired']))} "
          f"(target <= {TARGET}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
