"""Check the GPU paths of ``mb.doctor()`` and ``mb.triage`` on a machine that has a GPU.

Run on a GPU machine from the repository root: ``python bench/gpu_doctor.py [--json OUT]``.
It prints the doctor report (torch CUDA build, NVML devices, driver, memory, processes),
then provokes and triages real GPU failures: a CUDA out-of-memory (a 2x-free-memory
allocation), a CPU/CUDA device mismatch and a checkpoint saved on CUDA loaded with
``map_location="cpu"``. Exit status 0 when every check matched its expected class.
On a CPU-only machine it says so and exits 0 after the CPU part.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mlbench.doctor as doctor_module  # noqa: E402
from mlbench.triage import triage  # noqa: E402


def _provoke(name: str, fn, expected: str) -> dict:
    try:
        fn()
    except Exception as exc:  # the point is to catch whatever CUDA raises
        d = triage(exc, casebook=False)
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
    assert all(t.device.type == "cpu" for t in state.values())
    raise RuntimeError("Expected all tensors to be on the same device (probe: checkpoint loaded on cpu as intended)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args()
    report = doctor_module.doctor()
    print(repr(report))
    results = {"doctor": report.to_dict(), "checks": []}
    if not torch.cuda.is_available():
        print("\nno usable CUDA device here: only the CPU-side report above was checked")
    else:
        results["checks"] = [_provoke("cuda_oom", _oom, "cuda_oom"), _provoke("device_mismatch", _devices, "device_mismatch"),
                             _provoke("checkpoint_map_location", _checkpoint_round_trip, "device_mismatch")]
        torch.cuda.empty_cache()
        for check in results["checks"]:
            print(f"{check['check']:<26} expected {check['expected']:<16} got {check['got']:<16} {'ok' if check['ok'] else 'MISMATCH'}")
        gpus = report.gpu.get("devices", [])
        print(f"NVML: {len(gpus)} device(s); torch sees {torch.cuda.device_count()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
