"""The five sections of :func:`mlbench.report`, as Markdown, for a case or an exception."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbench.paths import cut_machine_paths

__all__ = ["case_sections", "exception_sections", "short_traceback"]


def short_traceback(text: str, last: int = 10) -> str:
    """The last ``last`` lines of a traceback, machine paths cut."""
    return "\n".join(cut_machine_paths(text.rstrip()).splitlines()[-last:])


def _analysis(diagnosis: dict[str, Any], traceback_text: str, extra: list[str]) -> str:
    lines = [f"**{diagnosis['failure_class']}**: {diagnosis['explanation']}", ""]
    if diagnosis.get("evidence"):
        lines += [f"- deciding line: `{diagnosis['evidence'][:300]}`"]
    lines += [f"- {e}" for e in extra]
    lines += [f"- also found: {o['failure_class']}: `{o['evidence'][:160]}`" for o in diagnosis.get("others", [])]
    if traceback_text:
        lines += ["", "```", short_traceback(traceback_text), "```"]
    return "\n".join(lines)


def _resources(doc: dict[str, Any], stages: dict[str, Any] | None) -> str:
    torch, gpu, cpu = doc.get("torch", {}), doc.get("gpu", {}), doc.get("cpu", {})
    lines = [f"- Python {doc.get('python')} on {doc.get('platform')}; torch {torch.get('version')}, "
             f"CUDA build {torch.get('cuda_build') or 'none (CPU-only)'}, CUDA usable: {torch.get('cuda_available')}",
             f"- GPU: {gpu.get('summary')}",
             f"- CPU: {cpu.get('cores')} core(s); RAM {cpu.get('ram_total_gib')} GiB total, {cpu.get('ram_available_gib')} GiB available"]
    lines += [f"  - GPU {d['index']} {d['name']}: {d['memory_used_mib']:.0f} of {d['memory_total_mib']:.0f} MiB used"
              for d in gpu.get("devices", [])]
    if stages:
        lines += ["", f"Stages as recorded when the case was saved (times of that run, total {_total_ms(stages.values())}):",
                  "", "| stage | status | time | output |", "|---|---|---|---|"]
        for name, s in stages.items():
            took = "" if s.get("seconds") is None else f"{_ms(s['seconds'])} ms"
            lines.append(f"| {name} | {s['status']} | {took} | {(s.get('summary') or '').replace('|', '/')[:120]} |")
    return "\n".join(lines)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _total_ms(stages: Any) -> str:
    """The sum of the stage times as shown (whole ms each), so a table's total adds up."""
    return f"{sum(_ms(s['seconds']) for s in stages if s.get('seconds') is not None)} ms"


def _model(meta: dict[str, Any]) -> str:
    m, stages = meta["model"], meta["stages"]
    shape_in = (stages.get("preprocess", {}).get("stats") or {}).get("shape")
    shape_out = (stages.get("forward", {}).get("stats") or {}).get("shape")
    lines = [f"- model `{m['name']}` ({m.get('size') or 'custom'} size), {m['parameters']:,} parameters, {m['weights']}",
             f"- weights: state sha256 `{m['state_sha256'][:16]}`" + (f", file sha256 `{m['weights_file_sha256'][:16]}`" if m.get("weights_file_sha256") else ""),
             f"- model input {shape_in} -> output {shape_out if shape_out else '(forward did not complete)'}"]
    multiple = m.get("input_multiple")
    if multiple and shape_in and (shape_in[-1] % multiple or shape_in[-2] % multiple):
        lines.append(f"- input sides {shape_in[-2]}x{shape_in[-1]} are not multiples of {multiple}, which this model needs")
    return "\n".join(lines)


def _solution(meta: dict[str, Any], fix_preset: str) -> str:
    from mlbench.cases.manifest import recorded_card
    from mlbench.pipeline.options import make_options

    recorded, fixed = meta["options"], make_options(fix_preset).resolved(recorded_card(meta)).to_dict()
    changes = [f"- `{k}`: {recorded[k]!r} -> {fixed[k]!r}" for k in recorded if k in fixed and recorded[k] != fixed[k] and k != "device"]
    lines = [meta["diagnosis"].get("fix", ""), "", f"Options that the `{fix_preset}` preset changes:"]
    lines += changes or ["- none: the options were already those of the preset"]
    lines += ["", "```python", "import mlbench as mb", f"case = mb.load_case({meta['name']!r} + '...')  # the case folder or zip",
              f"run = case.start(preset={fix_preset!r}).run()  # the same image and model, fixed options",
              f"# in the service: mb.Pipeline(model, preset={fix_preset!r})", "```"]
    return "\n".join(lines)


def _truth_for(image_sha: str) -> np.ndarray | None:
    from mlbench.errors import MlbenchError
    from mlbench.samples.bundled import load_sample, sample_index

    try:
        name = next((n for n, e in sample_index().items() if e.get("sha256") == image_sha), None)
        return None if name is None else load_sample(name).mask
    except MlbenchError:
        return None


def _iou(mask: np.ndarray | None, truth: np.ndarray | None) -> str:
    if truth is None or mask is None:
        return "n/a"
    mask, ref = np.asarray(mask, bool), truth > 0
    union = (mask | ref).sum()
    return f"{(mask & ref).sum() / union:.3f}" if union else "1.000"


def _column(outcome: dict[str, Any], stages: Any, mask: np.ndarray | None, truth: np.ndarray | None) -> dict[str, str]:
    forward = next((s.get("seconds") for name, s in stages if name == "forward"), None)
    return {"outcome": outcome["status"] + (f" at {outcome['failed_stage']}" if outcome.get("failed_stage") else ""),
            "polygons": str(outcome.get("polygons", "-")),
            "mask coverage": f"{outcome['mask_fraction']:.1%}" if "mask_fraction" in outcome else "-",
            "IoU vs ground truth": _iou(mask, truth), "total time": _total_ms(s for _, s in stages),
            "forward time": "-" if forward is None else f"{_ms(forward)} ms"}


def _replayed(replay: Any, truth: np.ndarray | None) -> dict[str, str]:
    run = replay.run
    stages = [(name, {"seconds": r.seconds}) for name, r in run.records.items()]
    return _column(replay.observed, stages, run.output("postprocess").mask if run.done else None, truth)


def _best_of_two(case: Any, preset: str | None) -> Any:
    """The faster of two replays: the first run of a preset in a process pays one-time costs (thread pools,
    kernels, imports) that would otherwise be counted against whichever column happened to run first."""
    runs = [case.rerun(preset=preset) for _ in range(2)]
    return min(runs, key=lambda r: sum(rec.seconds or 0.0 for rec in r.run.records.values()))


def _impact(case: Any, replay: bool, fix_preset: str) -> str:
    if not replay:
        return "Not measured (replay disabled)."
    before, after = _best_of_two(case, None), _best_of_two(case, fix_preset)
    truth = _truth_for(case.meta["image"]["sha256"])
    columns = [_column(case.meta["outcome"], list(case.meta["stages"].items()), case.recorded_mask, truth),
               _replayed(before, truth), _replayed(after, truth)]
    lines = [f"The run as recorded in the case (its times are those of section 2), replayed here with the recorded "
             f"options ({'same outcome as recorded' if before.same else 'DIFFERENT from the record'}) and with the "
             f"`{fix_preset}` preset. The two replays are timed alike (the faster of two runs each), so their times "
             "compare with each other; the recorded times come from another session, often another machine.",
             "", "| | recorded | replayed here | with the fix, here |", "|---|---|---|---|"]
    lines += [f"| {key} | {columns[0][key]} | {columns[1][key]} | {columns[2][key]} |" for key in columns[0]]
    return "\n".join(lines)


def case_sections(case: Any, replay: bool, fix_preset: str) -> list[tuple[str, str]]:
    """The five (title, markdown) sections for a loaded case."""
    meta = case.meta
    outcome = meta["outcome"]
    extra = [f"failed at stage `{outcome['failed_stage']}` on input {meta['stages'][outcome['failed_stage']].get('input')}"
             ] if outcome["status"] == "failed" else [f"the run completed: {outcome['polygons']} polygon(s), mask covers {outcome['mask_fraction']:.1%}"]
    if meta.get("note"):
        extra.append(f"note: {meta['note']}")
    integrity = getattr(case, "integrity", None)
    if integrity is not None and integrity.code in ("foreign", "unsigned"):
        extra.append(f"integrity: {integrity.message}")
    return [("Error analysis", _analysis(meta["diagnosis"], meta.get("traceback", ""), extra)),
            ("Resource status", _resources(meta.get("doctor", {}), meta["stages"])),
            ("Model diagnostics", _model(meta)), ("Solution", _solution(meta, fix_preset)),
            ("Performance impact", _impact(case, replay, fix_preset))]


def exception_sections(exc: BaseException) -> list[tuple[str, str]]:
    """The five sections for a bare exception (no case: model and impact are not known)."""
    import traceback

    from mlbench.checks.environment import doctor
    from mlbench.failures import triage

    diagnosis = triage(exc).to_dict()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    solution = f"{diagnosis['fix']}\n\nWalk-through: `notebooks/{diagnosis['notebook']}`."
    return [("Error analysis", _analysis(diagnosis, text, [])),
            ("Resource status", _resources(doctor(imports=False).to_dict(), None) + "\n- (measured now, not when the error happened)"),
            ("Model diagnostics", "No case attached: save the failing run with `mb.save_case(run, path)` to record the model, weights and shapes."),
            ("Solution", solution),
            ("Performance impact", "Not measured: an exception alone cannot be replayed; save a case to measure the fix.")]
