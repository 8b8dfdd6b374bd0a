"""The GPU bench scripts run everywhere: on a machine without CUDA they say so in one line and exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlbench.checks.environment_probes import no_cuda_reason

ROOT = Path(__file__).resolve().parents[1]
REASON = no_cuda_reason()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600 if REASON is None else 180, env=env)


@pytest.mark.parametrize("script", ["gpu_doctor.py", "gpu_memory.py", "tiling.py --device cuda"])
def test_gpu_script_runs(script):
    if REASON is None and script.startswith("tiling.py"):
        pytest.skip("CUDA is available: bench/tiling.py --device cuda measures for minutes (run it by hand)")
    proc = _run(*script.split())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    if REASON is None:
        pytest.skip(f"CUDA is available, so bench/{script} measured (exit 0) instead of printing the no-GPU line")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"SKIP bench/{script}: no CUDA device: "), proc.stdout
    assert REASON in lines[0] and proc.stderr == ""
