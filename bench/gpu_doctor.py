"""Check the GPU paths of ``mb.doctor()`` and ``mb.triage`` on a machine that has a GPU.

Run on a GPU machine from the repository root: ``python bench/gpu_doctor.py [--json OUT]``.
It prints the doctor report (torch CUDA build, NVML devices, driver, memory, processes), checks
that NVML and torch see the same GPUs, then provokes and triages real GPU failures: a CUDA
out-of-memory (a 2x-free-memory allocation), a CPU/CUDA device mismatch and a checkpoint saved
on CUDA loaded with ``map_location="cpu"``. Exit status 0 when every check matched.
Without a usable CUDA device it prints one line saying what it skipped and why, and exits 0.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mlbench as mb  # noqa: E402
from mlbench.checks.environment_probes import no_cuda_reason  # noqa: E402

GPU_CHECKS = "NVML devices vs torch, CUDA out-of-memory, device mismatch, checkpoint map_location"


def _provoke(name: str, fn, expected: str) -> dict:
    try:
        fn()
    except Exception as exc:  # the point is to catch whatever CUDA raises
        d = mb.triage(exc, casebook=False)
        return {"check": name, "expected": expected, "got": d.failure_class, "ok": d.failure_class == expected,
                "evidence": d.evidence, "numbers": d.numbers}
    return {"check": name, "expected": expected, "got": "no error", "ok": False}


def _oom() -> None:
    free, _ = torch.cuda.mem_get_info()
    torch.empty(int(free * 2), dtype=torch.uint8, device="cuda")


def _devices() -> None:
    torch.nn.Conv2d(3, 4, 3).cuda()(torch.zeros(1, 3, 8, 8))


def _checkpoint_round_trip() -> None:
    buffer = io.BytesIO()
    torch.save(torch.nn.Conv2d(3, 4, 3).cuda().state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    if not all(t.device.type == "cpu" for t in state.values()):
        raise RuntimeError("map_location='cpu' left tensors on the GPU")
    raise RuntimeError("Expected all tensors to be on the same device (probe: checkpoint loaded on cpu as intended)")


def _nvml_check(report) -> dict:
    """NVML (through the doctor) and torch must count the same GPUs, and the doctor must report no GPU problem."""
    nvml = len(report.gpu.get("devices", []))
    try:
        seen = torch.cuda.device_count()
    except (RuntimeError, AssertionError) as exc:
        seen = f"{type(exc).__name__}: {exc}"
    ok = nvml == seen and nvml > 0 and not report.gpu.get("problems")
    return {"check": "nvml_devices", "expected": f"{nvml} (NVML)", "got": str(seen), "ok": ok,
            "evidence": report.gpu.get("summary", ""), "numbers": {}}


def _empty_cache() -> None:
    try:
        torch.cuda.empty_cache()
    except (RuntimeError, AssertionError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    reason = no_cuda_reason()
    if reason is not None:
        print(f"SKIP bench/gpu_doctor.py: {reason}; the GPU checks ({GPU_CHECKS}) need one "
              "(`mlbench doctor` reports this machine)")
        return 0
    report = mb.doctor()
    print(report.text())
    checks = [_nvml_check(report), _provoke("cuda_oom", _oom, "cuda_oom"),
              _provoke("device_mismatch", _devices, "device_mismatch"),
              _provoke("checkpoint_map_location", _checkpoint_round_trip, "device_mismatch")]
    _empty_cache()
    for check in checks:
        print(f"{check['check']:<26} expected {check['expected']:<16} got {check['got']:<16} {'ok' if check['ok'] else 'MISMATCH'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"doctor": report.to_dict(), "checks": checks}, indent=1, default=str))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
