"""Overhead of looking inside a forward pass, measured side by side in one run.

For each small model and input size, times the bare forward and ``trace_shapes`` with its default
options (exact min/max of the blocks' outputs, NaN/Inf found and located), with ``stats=False``,
``stats="every"`` (every module's output) and ``stats="full"`` (the mean too); at ``--compare-size`` also ``torchinfo.summary`` and TorchLens
(``torchlens.trace``), or a SKIP line saying why one is missing (``pip install -e .[bench]``
installs both). The contenders run in turn, the order reversed every repetition, so machine
load hits all alike; the ratio judged is ``ratio_paired``, the median over repetitions of each
run's time over the bare forward's in the same repetition. On a shared machine the load changes
from second to second: a best-of ratio swung from 1.08 to 1.43 between runs a minute apart. One
torch thread by default: with two on 2 cores that other processes share, OpenMP's threads wait on
each other and the same bare forward took 0.1 s or 2.5 s from one run to the next, so the ratios
measured the machine, not the probe (``--threads 2`` on a quiet machine). Time is this process's
CPU time by default, as in ``bench/tiling.py``: a process that waits for the core is not charged for
the wait (``--clock wall`` measures wall-clock time).

Target: ``trace_shapes()`` with its defaults <= 1.15x the bare forward for every model and size.

    python bench/probes.py [--sizes 256 512] [--repeats 7] [--threads 1] [--compare-size 256] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402
from mlbench.probes import trace_shapes  # noqa: E402

TARGET = 1.15
DEFAULT = "trace_shapes()"


def _others(model: torch.nn.Module, x: torch.Tensor, notes: list[str]) -> dict[str, Callable[[], object]]:
    """torchinfo and TorchLens where installed; a SKIP line in ``notes`` for each one that is not."""
    found: dict[str, Callable[[], object]] = {}
    try:
        import torchinfo

        found["torchinfo.summary"] = lambda: torchinfo.summary(model, input_data=x, verbose=0, mode="eval")
    except ImportError:
        notes.append("SKIP torchinfo: not installed (pip install -e .[bench])")
    try:
        import torchlens
    except Exception as exc:  # any failing import: skip it and say why
        notes.append(f"SKIP TorchLens: not importable ({type(exc).__name__}: {exc}; pip install -e .[bench])")
        return found
    if hasattr(torchlens, "log_forward_pass"):  # TorchLens < 1.0
        found["torchlens.log_forward_pass"] = lambda: torchlens.log_forward_pass(model, x, vis_opt="none")
    elif hasattr(torchlens, "trace"):
        from torchlens.options import CaptureOptions

        options = CaptureOptions(cache=False)  # a cached trace would not run the model at all
        found["torchlens.trace"] = lambda: torchlens.trace(model, x, capture=options)
    else:
        notes.append(f"SKIP TorchLens {getattr(torchlens, '__version__', '?')}: neither trace nor log_forward_pass")
    return found


def measure(name: str, size: int, repeats: int, compare: bool, notes: list[str],
            clock: Callable[[], float] = time.process_time) -> list[dict]:
    model = mb.build_model(name, "small").eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def bare() -> None:
        with torch.no_grad():
            model(x)

    contenders = {"bare forward": bare, DEFAULT: lambda: trace_shapes(model, x),
                  "trace_shapes(stats=False)": lambda: trace_shapes(model, x, stats=False),
                  'trace_shapes(stats="every")': lambda: trace_shapes(model, x, stats="every"),
                  'trace_shapes(stats="full")': lambda: trace_shapes(model, x, stats="full")}
    if compare:
        contenders.update(_others(model, x, notes))
    broken: dict[str, str] = {}
    for key, fn in contenders.items():  # warm-up; a tool that fails is reported, not timed
        try:
            fn()
        except Exception as exc:
            broken[key] = f"{type(exc).__name__}: {exc}"[:80]
    order = [(k, f) for k, f in contenders.items() if k not in broken]
    times: dict[str, list[float]] = {key: [] for key, _ in order}
    for repeat in range(repeats):  # every tool right before or after the bare forward, alternately
        for key, fn in (order if repeat % 2 == 0 else order[::-1]):
            start = clock()
            fn()
            times[key].append(clock() - start)
    bare_times = times["bare forward"]
    rows = [{"model": name, "size": size, "tool": key, "note": why} for key, why in broken.items()]
    for key, spent in times.items():
        paired = statistics.median(t / b for t, b in zip(spent, bare_times))
        rows.append({"model": name, "size": size, "tool": key, "median_ms": round(statistics.median(spent) * 1000, 1),
                     "ratio_median": round(statistics.median(spent) / statistics.median(bare_times), 3),
                     "ratio_paired": round(paired, 3), "note": ""})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-size", type=int, default=256,
                        help="size at which torchinfo and TorchLens run too (TorchLens costs 10-30x a forward)")
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: this process's CPU time (default); wall: wall-clock time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    notes: list[str] = []
    rows = [row for size in args.sizes for name in args.models
            for row in measure(name, size, args.repeats, size == args.compare_size, notes,
                               time.process_time if args.clock == "cpu" else time.perf_counter)]
    for note in dict.fromkeys(notes):
        print(note)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.fillna("").to_string(index=False))
    judged = table[table["tool"] == DEFAULT]
    ok = bool((judged["ratio_paired"] <= TARGET).all())
    print(f"\n{DEFAULT} (block statistics, NaN/Inf located) over the bare forward, median of {args.repeats} "
          f"paired runs, {args.threads} threads, {args.clock} time: " + ", ".join(f"{m} {s}px {r:.3f}" for m, s, r in
                                                   zip(judged["model"], judged["size"], judged["ratio_paired"]))
          + f" (target <= {TARGET}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
