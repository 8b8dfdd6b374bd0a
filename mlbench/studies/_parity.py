"""Works in my notebook, not in production: ``mb.parity(model, image, variants=[...])``.

The commonest cause is a difference in *how* the same model runs: half precision or autocast
(NaNs, drift), a model left in train mode (Dropout, BatchNorm), batch size, ``channels_last``,
thread count, CPU against GPU, an export to TorchScript or ONNX. ``parity`` runs the reference
(the model as given, in eval mode, float32, batch 1, the pipeline's own preprocessing) and each
variant on the same input, and says per variant: did it run (or why not), the largest logit
difference, the mask IoU against the reference, the polygons added and lost, and, from the
module trace, the first module whose output departs beyond the tolerance of the variant's dtype
(:data:`mlbench.studies.module_diff.TOLERANCES`) and the first NaN/Inf. Exported graphs
(TorchScript, ONNX) have no module trace inside: their outputs alone are compared, and their row
says so. A variant that cannot run here says why in its row; none is left out.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlbench.errors import OptionsError, StageError
from mlbench.metrics import pixel_scores
from mlbench.pipeline.run import Pipeline, Run, StageRecord
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.probes.tiling import run_device
from mlbench.studies._parity_report import ParityReport, ParityRow
from mlbench.studies._parity_variants import VARIANTS, Plan, Unavailable, main_output, parse_variants, plan_variant
from mlbench.studies.module_diff import STRIDE, TOLERANCES, Tolerance, compare_modules, max_abs_diff, record_modules, tolerance_for
from mlbench.studies.run_diff import polygon_changes

__all__ = ["ParityReport", "ParityRow", "parity", "VARIANTS", "add_parity_command"]


def _finish(run: Run, output: torch.Tensor, seconds: float) -> Run:
    """``run`` (decoded and preprocessed) completed with ``output`` as its forward: the pipeline's own
    postprocess and polygon stages."""
    forward = STAGE_NAMES.index("forward")
    records = {name: run.records[name] for name in STAGE_NAMES[:forward]}
    records["forward"] = StageRecord("forward", "done", output.detach().float().cpu(), seconds)
    records.update({name: StageRecord(name) for name in STAGE_NAMES[forward + 1:]})
    return Run(run.pipeline, run.source, records).run()


@dataclass
class _Reference:
    run: Run
    model: nn.Module
    x: torch.Tensor
    output: torch.Tensor
    record: Any
    shape: tuple[int, int]


def _reference(model: Any, image: Any, preset: str, options: dict[str, Any],
               stride: int) -> tuple[_Reference, dict[str, Any]]:
    if "train_mode" in options:
        raise OptionsError("parity sets train_mode itself: the reference runs in eval mode and the 'train_mode' "
                           "variant in train mode; drop train_mode=...")
    pipeline = Pipeline(str(model) if isinstance(model, Path) else model, preset=preset, train_mode="keep", **options)
    net, notes = pipeline.model, []
    device = run_device(net, options.get("device"))
    if any(p.dtype != torch.float32 for p in net.parameters() if p.is_floating_point()) or run_device(net) != device:
        net = copy.deepcopy(net).float().to(device)
        notes.append(f"the reference runs a float32 copy on {device}")
    run = pipeline.start(image).run_until("preprocess").raise_for_error()
    x = run.output("preprocess").to(device)
    started = time.perf_counter()
    record = record_modules(net, x, stride=stride)
    seconds = time.perf_counter() - started
    if record.error is not None:
        raise StageError(f"the reference forward failed in module {record.failed}: {type(record.error).__name__}: "
                         f"{record.error}; the model must run as given before its variants can be compared",
                         "forward") from record.error
    output = main_output(net, record.output)
    done = _finish(run, output, seconds).raise_for_error()
    scales = record.scales
    bad = next((key for key, s in zip(record.keys, scales) if not math.isfinite(s)), None)
    summary = {"device": str(device), "dtype": "float32", "input_shape": list(x.shape), "threads": torch.get_num_threads(),
               "preset": preset, "module_calls": len(record.keys), "seconds": round(seconds, 4),
               "polygons": len(done.output("polygons")), "foreground": round(float(done.output("postprocess").mask.mean()), 6),
               "first_nonfinite": bad[0] if bad else None, "stride": record.stride, "notes": notes}
    shape = tuple(done.output("decode").image.shape[:2])
    return _Reference(done, net, x, output, record, shape), summary


def _departure_fields(found: dict[str, Any] | None) -> dict[str, Any]:
    if found is None:
        return {}
    return {"first_departure": found["module"] + (f" (call {found['call'] + 1})" if found["call"] else ""),
            "departure_type": found["type"], "departure_shape": found["shape"],
            "departure_diff": found["max_abs"], "departure_rel": found["rel"]}


def _traced(plan: Plan, ref: _Reference, tolerance: Tolerance) -> tuple[Any, dict[str, Any], Any]:
    """The variant's forward compared module by module: (output or the failure text, row fields, comparison)."""
    with plan.context():
        comparison = compare_modules(plan.model, plan.x, ref.record.to(plan.x.device), eval=plan.eval)
    if comparison.error is not None:
        where = f" in module {comparison.failed}" if comparison.failed else ""
        return f"{type(comparison.error).__name__}{where}: {comparison.error}", {}, None
    fields = _departure_fields(comparison.first_departure(tolerance))
    nonfinite = comparison.first_nonfinite()
    fields["first_nonfinite"] = nonfinite["module"] if nonfinite else None
    return main_output(plan.model, comparison.output), fields, comparison


def _exported(plan: Plan, ref: _Reference) -> tuple[Any, dict[str, Any], None]:
    """An exported graph's output (or the failure text) and row fields: outputs only."""
    try:
        output = plan.run(plan.x)
    except Exception as exc:  # the exported graph's own failure, reported in the row
        return f"{type(exc).__name__}: {exc}", {}, None
    bad = not bool(torch.isfinite(output).all()) and bool(torch.isfinite(ref.output).all())
    return output, {"first_nonfinite": "(output)"} if bad else {}, None


def _run_plan(name: str, plan: Plan, ref: _Reference, tolerance: Tolerance) -> tuple[ParityRow, list | None]:
    """Run one planned variant and compare its output, mask and polygons with the reference's."""
    started = time.perf_counter()
    output, fields, comparison = _traced(plan, ref, tolerance) if plan.model is not None else _exported(plan, ref)
    seconds = round(time.perf_counter() - started, 4)
    common = {"compared": "modules" if plan.model is not None else "outputs only", "tolerance": str(tolerance),
              "seconds": seconds, "note": plan.note}
    if isinstance(output, str):
        return ParityRow(name, "failed", output, **common), None
    diff = max_abs_diff(output.detach(), ref.output)
    if diff is None:
        return ParityRow(name, "failed", f"output shape {tuple(output.shape)} cannot be compared with the reference's "
                         f"{tuple(ref.output.shape)}", **common), None
    diff, scale = float(diff), float(ref.output.abs().amax())
    done = _finish(ref.run, output[: ref.output.shape[0]], seconds)
    if done.failed:
        return ParityRow(name, "failed", f"stage {done.failed_stage} failed on the variant's output: "
                         f"{type(done.error).__name__}: {done.error}", max_logit_diff=diff, **common), None
    added, lost = polygon_changes(ref.run.output("polygons"), done.output("polygons"), ref.shape)
    departs = not (math.isfinite(diff) and tolerance.allows(diff, scale))
    iou = pixel_scores(ref.run.output("postprocess").mask, done.output("postprocess").mask).iou
    row = ParityRow(name, "ran", "", max_logit_diff=diff, output_departs=departs, mask_iou=iou,
                    polygons_added=added, polygons_lost=lost, **common, **fields)
    return row, (comparison.rows(tolerance) if comparison is not None else None)


def parity(model: nn.Module | str | Path, image: Any, variants: list[str] | tuple[str, ...] | str | None = None, *,
           preset: str = "fixed", tolerances: dict[str, Any] | None = None, seed: int = 0, stride: int = STRIDE,
           **options: Any) -> ParityReport:
    """Run the model as given and each variant on one image; where, module by module, do they part?

    Parameters
    ----------
    model : nn.Module, str or Path
        An ``nn.Module``, a bundled name ("hrnet", "cbam_resunet", "ma_resunet", or a service id)
        or a checkpoint path (loaded as :class:`mlbench.Pipeline` loads it, with its card).
    image : path, bytes or (H, W[, C]) array
        Decoded and preprocessed by the pipeline (``preset`` and ``**options``).
    variants : list of str, optional
        From :data:`VARIANTS` (default all): "bf16", "fp16" (weights and input cast), "autocast"
        (bfloat16 on the CPU, float16 on CUDA), "train_mode" (seeded), "batch<N>" (N copies of the
        input), "channels_last", "threads<N>", "repeat" (the reference again: nondeterminism),
        "torchscript" (``torch.jit.trace``), "onnx" (exported, run by onnxruntime), "cuda", "cpu".
    preset : str
        The pipeline preset for decode and preprocess ("fixed" or "as_served").
    tolerances : dict, optional
        ``(atol, rtol)`` by variant name or dtype name over :data:`~mlbench.studies.module_diff.TOLERANCES`,
        e.g. ``{"bf16": (1e-3, 5e-2), "float32": (1e-6, 1e-5)}``.
    seed : int
        Seeds the train-mode forward (Dropout) inside ``torch.random.fork_rng``: the global random
        state is left as it was.
    stride : int
        Module outputs are compared on every ``stride``-th row (:mod:`mlbench.studies.module_record`);
        1 compares every value and keeps the reference's activations until the variants are done.
    **options
        Pipeline options (``input_size``, ``threshold``, ``device``...); ``train_mode`` is parity's.

    Returns
    -------
    ParityReport
        A row per variant (``.table``, ``.row(name)``), module rows per traced variant
        (``.modules(name)``), ``.plot()``, ``.to_dict()``; its text is the report.

    Raises
    ------
    OptionsError
        An unknown variant, a bad tolerance, an unknown pipeline option.
    StageError
        The reference itself fails (the image does not decode, the model does not run as given).

    Notes
    -----
    The reference keeps every 8th row of every module's output until the variants are compared
    (an eighth of one forward's activations); a variant keeps two numbers per module call. On the CPU
    "fp16" computes convolutions in float32 on the float16 values and rounds the result to float16
    (:class:`~mlbench.studies._parity_variants.Float16ConvolutionsOnCpu`: the CPU's own float16
    kernel is 14 to 60 times slower: ``bench/parity.py --fp16-kernels``). TorchScript and ONNX
    export take 10 to 40 s on this 2-core CPU: pass the variants you need.
    """
    names = parse_variants(variants)
    for key in tolerances or {}:
        known = {*TOLERANCES, *names}
        if key not in known:
            raise OptionsError(f"tolerances has key {key!r}; expected a variant of this call or a dtype name, "
                               f"one of {sorted(known)}")
    ref, summary = _reference(model, image, preset, options, stride)
    rows, curves = [], {}
    for name in names:
        try:
            plan = plan_variant(name, ref.model, ref.x, seed)
        except Unavailable as why:
            rows.append(ParityRow(name, "unavailable", str(why)))
            continue
        except Exception as exc:  # preparing it (casting, tracing, exporting) failed: that is the finding
            rows.append(ParityRow(name, "failed", f"preparing the variant failed: {type(exc).__name__}: {exc}"))
            continue
        tolerance = tolerance_for(plan.dtype, tolerances, name)
        row, found = _run_plan(name, plan, ref, tolerance)
        rows.append(row)
        if found is not None:
            curves[name] = (found, tolerance)
    label = image.name if isinstance(image, Path) else (Path(image).name if isinstance(image, str) else "<array>")
    return ParityReport(str(ref.run.pipeline.model_name), label, summary, tuple(rows), curves)


def add_parity_command(sub) -> None:
    """Add ``parity IMAGE [--model M] [--variants ...] [--preset P] [--input-size S] [--json]``
    (``mlbench`` adds ``--weights PATH`` and ``--card JSON``)."""
    p = sub.add_parser("parity", help="run the model as given and as deployed (bf16, train mode, batch, threads, "
                                      "export, device...): where do they part, and does the mask change?")
    p.add_argument("image", help="image file, decoded and preprocessed by the pipeline")
    p.add_argument("--model", default="hrnet", help="hrnet | cbam_resunet | ma_resunet (or a service id); default "
                   "hrnet, or with --weights the architecture the checkpoint must be")
    p.add_argument("--variants", nargs="+", default=None, metavar="V",
                   help=f"variants to compare (default all): {' '.join(VARIANTS)}; batch<N> and threads<N> take any N")
    p.add_argument("--preset", default="fixed", choices=["fixed", "as_served"])
    p.add_argument("--input-size", type=int, default=None, help="model input side (default: the model's own)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_parity_cli)


def _parity_cli(args) -> int:
    """Exit 0 when every variant that ran kept the mask and the polygons, 1 when one changed them or failed."""
    import json

    report = parity(args.model, args.image, args.variants, preset=args.preset, input_size=args.input_size)
    print(json.dumps(report.to_dict(), indent=1, allow_nan=False) if args.json else report)
    changed = [r for r in report.rows if r.status == "failed" or (
        r.status == "ran" and (r.mask_iou < 1.0 or r.polygons_added or r.polygons_lost))]
    return 1 if changed else 0
