"""Run the hostile corpus in child processes with a memory and a time limit.

The child (``python tests/hostile_run.py FAMILY FOLDER [VARIANT]``) builds each variant of the
family in its own folder, probes it with the public API and prints one JSON line per variant:
``{"variant", "outcome", "detail", "seconds", "peak_mb"}``. A variant is ``clean`` when every
call refused it with the right error (``WeightsError``/``ImageError``, or a report with
``ok`` False), the message matches the variant's pattern and never advises
``weights_only=False``, the payload's marker file does not exist, and it stayed within
``SECONDS`` and ``PEAK_MB``. The parent (:func:`run_family`) adds ``crash`` (the child died)
and ``hang`` (it ran past its timeout). Used by ``tests/test_hostile.py`` and ``bench/hostile.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import hostile_cases  # noqa: E402
import hostile_checkpoints  # noqa: E402
import hostile_images  # noqa: E402
import hostile_special  # noqa: E402

FAMILIES = {**hostile_checkpoints.FAMILIES, **hostile_images.FAMILIES, **hostile_special.FAMILIES,
            **hostile_cases.FAMILIES}
PROBES = {**dict.fromkeys(hostile_checkpoints.FAMILIES, "weights"), **dict.fromkeys(hostile_images.FAMILIES, "image"),
          **dict.fromkeys(hostile_special.FAMILIES, "both"), **dict.fromkeys(hostile_cases.FAMILIES, "case")}
MEMORY_LIMIT = 3 << 30
"""RLIMIT_AS of the child: torch and the decoders take about 1.2 GB of address space at rest."""
SECONDS = 10.0
PEAK_MB = 900
OUTCOMES = ("clean", "wrong error", "crash", "hang", "over budget")


class Wrong(Exception):
    """A probe found the file accepted, or refused with the wrong error or message."""


def _expect(text: str, pattern: str, call: str) -> None:
    if not re.search(pattern, text):
        raise Wrong(f"{call}: message does not match {pattern!r}: {text[:300]}")
    if "weights_only=False" in text:
        raise Wrong(f"{call}: the message advises weights_only=False: {text[:300]}")


def _raises(call, error, pattern: str, name: str) -> str:
    try:
        call()
    except error as exc:
        _expect(str(exc), pattern, name)
        return str(exc)
    raise Wrong(f"{name}: accepted the file")


def probe_weights(path: Path, pattern: str) -> str:
    """check_weights, read_checkpoint, load_model and ``mlbench check-weights`` all refuse ``path``."""
    from mlbench.checks.weights import check_weights, read_checkpoint, run_check_weights
    from mlbench.errors import WeightsError
    from mlbench.models.checkpoint_io import BLOCKING
    from mlbench.models.loading import load_model

    report = check_weights(path)
    if not any(problem.code in BLOCKING for problem in report.problems):
        raise Wrong(f"check_weights: no blocking problem: {report}")
    _expect(str(report), pattern, "check_weights")
    _raises(lambda: read_checkpoint(path), WeightsError, pattern, "read_checkpoint")
    _raises(lambda: load_model(path), WeightsError, r".", "load_model")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = run_check_weights(argparse.Namespace(path=str(path), model=None, json=True))
    if status != 1 or json.loads(out.getvalue())["ok"]:
        raise Wrong(f"mlbench check-weights: exit {status}, {out.getvalue()[:200]}")
    return report.problems[0].message


def probe_image(path: Path, pattern: str) -> str:
    """read_image raises ImageError (or reports a problem) and check_image reports ``ok`` False."""
    from mlbench.checks.image import check_image
    from mlbench.errors import ImageError
    from mlbench.image.read import read_image

    try:
        _, report = read_image(path)
    except ImageError as exc:
        message = str(exc)
    else:
        if report.ok:
            raise Wrong(f"read_image: ok, shape {report.shape}")
        message = str(report)
    _expect(message, pattern, "read_image")
    checked = check_image(path)
    if checked.ok:
        raise Wrong(f"check_image: ok, shape {checked.shape}")
    _expect(str(checked), pattern, "check_image")
    return message


def _peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _one(family: str, name: str, builder, pattern: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = builder(folder)
    probe = PROBES[family]
    _reset_peak()
    base, started = _peak_mb(), time.monotonic()
    try:
        if probe in ("weights", "both"):
            detail = probe_weights(path, pattern)
        if probe in ("image", "both"):
            detail = probe_image(path, pattern)
        if probe == "case":  # load_case refuses it with a CaseError (hostile_cases.probe_case)
            detail = hostile_cases.probe_case(path, pattern, _raises, Wrong)
        outcome = "clean"
    except Wrong as exc:
        outcome, detail = "wrong error", str(exc)
    except MemoryError as exc:
        outcome, detail = "over budget", f"MemoryError {exc}"
    except BaseException as exc:  # noqa: BLE001 - every escape is a finding
        outcome, detail = "wrong error", f"{type(exc).__name__}: {str(exc)[:300]}"
    seconds, peak = time.monotonic() - started, _peak_mb() - base
    if outcome == "clean" and (seconds > SECONDS or peak > PEAK_MB):
        outcome = "over budget"
    if (folder / hostile_checkpoints.MARKER).exists():
        outcome, detail = "wrong error", f"the payload ran: {folder / hostile_checkpoints.MARKER} exists"
    return {"variant": name, "outcome": outcome, "detail": detail[:400], "seconds": round(seconds, 2),
            "peak_mb": round(peak)}


def child(family: str, folder: Path, only: str | None) -> None:
    """Build and probe every variant of ``family`` (or ``only``), one JSON line each."""
    variants, _ = FAMILIES[family]
    import mlbench.checks.image  # noqa: F401  imported once, outside the measured calls
    import mlbench.cases.casefile  # noqa: F401
    import mlbench.checks.weights  # noqa: F401
    import mlbench.models.loading  # noqa: F401
    for name, (builder, pattern) in variants().items():
        if only in (None, name):
            print(json.dumps({"variant": name, "outcome": "started"}), flush=True)
            print(json.dumps(_one(family, name, builder, pattern, folder / name)), flush=True)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_family(family: str, folder: Path, only: str | None = None, timeout: float = 120) -> list[dict]:
    """Run ``family`` in a child with the memory limit; one result per variant, crashes and hangs included."""
    env = {**os.environ, **FAMILIES[family][1], "MALLOC_MMAP_THRESHOLD_": "4294967296",
           "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    command = [sys.executable, str(Path(__file__).resolve()), family, str(folder)] + ([only] if only else [])
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit)
        out, end = done.stdout, ("crash", f"exit {done.returncode}: {done.stderr[-600:]}")
    except subprocess.TimeoutExpired as exc:
        out, end = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), \
            ("hang", f"still running after {timeout} s")
    results, started = [], None
    for line in out.splitlines():
        record = json.loads(line)
        if record["outcome"] == "started":
            started = record["variant"]
        else:
            results.append(record)
            started = None
    if started is not None:
        results.append({"variant": started, "outcome": end[0], "detail": end[1], "seconds": None, "peak_mb": None})
    return results


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
