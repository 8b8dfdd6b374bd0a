"""Cost of the module trace in ``mb.parity``, per variant, measured side by side in one run.

For each small model at one input size (512 by default, the 8-bit sample through the pipeline's
preprocessing) and each variant, times two things back to back, the order alternating between
repeats so machine load hits both alike:

- plain: the reference forward and the variant's forward, no hooks (what running both costs anyway);
- traced: what ``parity`` runs for them: the reference forward recording every module call
  (``record_modules``: every 8th row of each output copied), the variant's forward comparing every
  module call as it comes out (``compare_modules``), and the first departure found.

Prints per (model, variant) the median times, ``ratio_paired`` (the median of each repeat's traced
wall time over the plain wall time measured right next to it) and ``cpu_ratio_paired`` (the same
with the process's CPU time). The target is <= 1.3. The judged ratio is ``cpu_ratio_paired`` with
one thread (the default): on the 2 shared cores this runs on, other processes come and go, and the
wall time of a 2-thread forward then measures OpenMP waiting for a core more than either forward
(``--threads 2`` prints both all the same). The overhead is per module call (a copy, a subtraction
and a reduction of a few rows, in Python around PyTorch's call), so HRNet, 1,363 module calls and
cheap convolutions, is the worst case. Postprocessing and polygons are the same in both and left
out. Run with ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296`` (set by the
Makefile) or glibc's allocator dominates the 512 px forwards.

    python bench/parity.py [--size 512] [--repeats 7] [--threads 1] [--models ...] [--variants ...]

``--fp16-kernels`` measures something else: the ``fp16`` variant's forward (weights and input in
float16) with the CPU's own float16 convolutions against parity's
``Float16ConvolutionsOnCpu`` (float32 on the float16 values, rounded to float16), side by side in
CPU time, and how far each output is from the float32 forward (256 px by default: the CPU's own
kernel takes 10 s and more per forward).

    python bench/parity.py --fp16-kernels [--size 256] [--repeats 3]
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
from mlbench.studies._parity_variants import Float16ConvolutionsOnCpu, plan_variant  # noqa: E402
from mlbench.studies.module_diff import STRIDE, compare_modules, record_modules, tolerance_for  # noqa: E402

TARGET = 1.3
VARIANTS = ["repeat", "threads1", "batch2", "channels_last", "train_mode", "bf16", "fp16", "autocast"]
"""The traced variants measured by default; torchscript and onnx have no module trace, cuda needs a GPU."""


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def model_and_input(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A bundled model and the 8-bit sample through its pipeline's preprocessing at ``size`` px."""
    model = mb.load_model(name)
    run = mb.Pipeline(model, input_size=size).start(mb.load_sample("spheroids_8bit").path).run_until("preprocess")
    return model, run.raise_for_error().output("preprocess")


def measure(name: str, size: int, repeats: int, variants: list[str], stride: int = STRIDE) -> list[dict]:
    model, x = model_and_input(name, size)
    rows = []
    for variant in variants:
        plan = plan_variant(variant, model, x, seed=0)
        tolerance = tolerance_for(plan.dtype)

        def plain() -> None:
            with torch.no_grad():
                model(x)
                with plan.context():
                    plan.model(plan.x)

        def traced() -> None:
            record = record_modules(model, x, stride=stride)
            with plan.context():
                comparison = compare_modules(plan.model, plan.x, record, eval=plan.eval)
            comparison.first_departure(tolerance)

        plain(), traced()  # warm-up: one-off allocations
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "traced": []}
        for repeat in range(repeats):
            for key, fn in (("plain", plain), ("traced", traced))[:: 1 if repeat % 2 == 0 else -1]:
                times[key].append(_timed(fn))
        plain_s, traced_s = ([t[0] for t in times[k]] for k in ("plain", "traced"))
        plain_cpu, traced_cpu = ([t[1] for t in times[k]] for k in ("plain", "traced"))
        rows.append({"model": name, "size": size, "variant": variant, "stride": stride,
                     "plain_ms": round(statistics.median(plain_s) * 1000), "traced_ms": round(statistics.median(traced_s) * 1000),
                     "ratio_paired": round(statistics.median(t / p for t, p in zip(traced_s, plain_s)), 3),
                     "ratio_best": round(min(traced_s) / min(plain_s), 3),
                     "cpu_ratio_paired": round(statistics.median(t / p for t, p in zip(traced_cpu, plain_cpu)), 3)})
        print(rows[-1], flush=True)
    return rows


def fp16_kernels(name: str, size: int, repeats: int) -> dict:
    """One model's float16 forward with the CPU's own float16 convolutions and with parity's, side by side."""
    model, x = model_and_input(name, size)
    plan = plan_variant("fp16", model, x, seed=0)
    outputs: dict[str, torch.Tensor] = {}

    def native() -> None:
        outputs["native"] = plan.model(plan.x)

    def widened() -> None:
        with Float16ConvolutionsOnCpu():
            outputs["widened"] = plan.model(plan.x)

    cpu: dict[str, list[float]] = {"native": [], "widened": []}
    with torch.no_grad():
        reference = model(x).float()
        for repeat in range(repeats):
            for key, fn in (("native", native), ("widened", widened))[:: 1 if repeat % 2 == 0 else -1]:
                cpu[key].append(_timed(fn)[1])
    native_out, widened_out = (outputs[k].float() for k in ("native", "widened"))
    row = {"model": name, "size": size, "native_s": round(statistics.median(cpu["native"]), 2),
           "widened_s": round(statistics.median(cpu["widened"]), 3),
           "speed_up": round(statistics.median(n / w for n, w in zip(cpu["native"], cpu["widened"])), 1),
           "max_diff_between": round(float((native_out - widened_out).abs().max()), 4),
           "native_vs_fp32": round(float((native_out - reference).abs().max()), 4),
           "widened_vs_fp32": round(float((widened_out - reference).abs().max()), 4)}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, help="input side (default 512; 256 with --fp16-kernels)")
    parser.add_argument("--fp16-kernels", action="store_true",
                        help="time the fp16 variant with the CPU's float16 convolutions against parity's")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--stride", type=int, default=STRIDE, help=f"rows compared per module (default {STRIDE})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pandas as pd

    size = args.size or (256 if args.fp16_kernels else 512)
    if args.fp16_kernels:
        repeats = min(args.repeats, 3)
        table = pd.DataFrame([fp16_kernels(name, size, repeats) for name in args.models])
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(table.to_string(index=False))
        print(f"\nfp16 forward, {args.threads} thread(s), CPU time, median of {repeats} alternating pairs: the CPU's "
              f"float16 convolutions over parity's (float32 on float16 values, rounded): "
              f"{table['speed_up'].min()}x to {table['speed_up'].max()}x slower; outputs apart by at most "
              f"{table['max_diff_between'].max()} (each from float32: see the last two columns)")
        return 0

    table = pd.DataFrame([row for name in args.models
                          for row in measure(name, size, args.repeats, args.variants, args.stride)])
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False))
    judged = "cpu_ratio_paired" if args.threads == 1 else "ratio_paired"
    ok = bool((table[judged] <= TARGET).all())
    worst = table.loc[table[judged].idxmax()]
    print(f"\nparity's module trace, {args.threads} thread(s), median over {args.repeats} back-to-back pairs of "
          f"(traced reference + traced variant) over (plain reference + plain variant), {judged}: worst "
          f"{worst[judged]:.3f} ({worst['model']}, {worst['variant']}), target <= {TARGET}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
