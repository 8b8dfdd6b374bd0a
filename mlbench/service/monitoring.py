"""GPU monitoring behind ``/api/v1/monitoring/gpu/*``: torch's memory counters and NVML.

The answers have the service's fields. With no CUDA device they are its "no GPU" bodies
(``status: "no_gpu"``, ``"no_data"``, ...); with one, memory comes from
``torch.cuda.memory_allocated/reserved`` and utilisation, temperature and power from
NVML (``pynvml`` of the nvidia-ml-py package; when it is missing or fails those read 0
and null, as the service did). Samples are taken when asked (the service sampled every
second in a thread), batch records when the service reports an inference.

``export`` writes only inside one configured folder: the service wrote wherever the
``filepath`` query parameter said (an arbitrary file write).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import torch

from mlbench.service.limits import Refusal

__all__ = ["GpuMonitor", "nvml_readings", "PRESSURE_THRESHOLD"]

PRESSURE_THRESHOLD = 85.0
"""Memory use (percent) above which ``memory-pressure`` says to reduce the batch size."""
_MB = 1024 ** 2


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat()


def nvml_readings(index: int = 0) -> tuple[float, float | None, float | None]:
    """``(utilisation %, temperature C, power W)`` of GPU ``index`` from NVML; ``(0.0, None, None)`` without it."""
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py not installed: the service reported 0 and nulls
        return 0.0, None, None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver or no device
        return 0.0, None, None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        utilisation = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        readings: list[float | None] = []
        for read in (lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                     lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0):
            try:
                readings.append(float(read()))
            except pynvml.NVMLError:  # not supported on this board
                readings.append(None)
        return utilisation, readings[0], readings[1]
    except pynvml.NVMLError:
        return 0.0, None, None
    finally:
        pynvml.nvmlShutdown()


def _path_refused(name: str, why: str) -> Refusal:
    return Refusal(400, "export_path_refused", f"filepath={name!r} {why}; exports are written only inside the "
                   "service's export folder: send a plain relative name such as 'gpu_metrics.json'", filepath=name)


class GpuMonitor:
    """Samples of GPU 0 and records of inferences, answered in the service's schema.

    Parameters
    ----------
    export_dir : str or None
        The only folder :meth:`export` writes into; None switches the export off.
    history : int
        How many samples and inference records are kept.
    """

    def __init__(self, export_dir: str | None = None, history: int = 100) -> None:
        self.export_dir = export_dir
        self.samples: deque[dict[str, Any]] = deque(maxlen=history)
        self.batches: deque[dict[str, Any]] = deque(maxlen=history)
        self.peak_memory_mb = self.total_inference_ms = 0.0
        self.total_images = 0
        self.first_sample_at: float | None = None

    @property
    def gpu_present(self) -> bool:
        return bool(torch.cuda.is_available())

    def sample(self) -> dict[str, Any] | None:
        """One snapshot of GPU 0 (memory in MB, utilisation), kept in the history; None without a GPU."""
        if not self.gpu_present:
            return None
        properties = torch.cuda.get_device_properties(0)
        total = properties.total_memory / _MB
        allocated, reserved = torch.cuda.memory_allocated() / _MB, torch.cuda.memory_reserved() / _MB
        usage = min(100.0, max(0.0, allocated / total * 100 if total > 0 else 0.0))
        utilisation, temperature, power = nvml_readings(0)
        snapshot = {"timestamp": _utc_now(), "device_id": 0, "device_name": properties.name,
                    "memory_allocated_mb": round(allocated, 2), "memory_reserved_mb": round(reserved, 2),
                    "memory_free_mb": round(max(0.0, total - allocated), 2), "memory_total_mb": round(total, 2),
                    "memory_usage_percent": round(usage, 2), "utilization_percent": utilisation,
                    "temperature_celsius": temperature, "power_draw_watts": power}
        self.peak_memory_mb = max(self.peak_memory_mb, allocated)
        self.first_sample_at = self.first_sample_at or time.monotonic()
        self.samples.append(snapshot)
        return snapshot

    def record(self, model: str, seconds: float, success: bool, error: str | None = None,
               memory_before: int = 0, batch_size: int = 1) -> None:
        """Record one inference (``seconds`` long, ``memory_before`` bytes allocated when it began).

        Cheap enough for the event loop: no NVML call (utilisation is the last sample's).
        """
        milliseconds = seconds * 1000
        memory_after = torch.cuda.memory_allocated() if self.gpu_present else 0
        current = self.samples[-1] if self.samples else None
        self.batches.append({
            "model": model, "batch_size": batch_size, "inference_time_ms": round(milliseconds, 2),
            "throughput_imgs_sec": round(batch_size / seconds, 2) if seconds > 0 else 0,
            "memory_delta_mb": round(max(0, memory_after - memory_before) / _MB, 2),
            "gpu_utilization": current["utilization_percent"] if current else 0, "success": success, "error": error})
        if success:
            self.total_inference_ms += milliseconds
            self.total_images += batch_size

    # ---- the endpoints' bodies -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /gpu/status``."""
        current = self.sample()
        if current is None:
            return {"status": "no_gpu", "message": "No GPU available, running on CPU", "gpu_present": False}
        return {"status": "active", "gpu_present": True,
                "device": {"id": current["device_id"], "name": current["device_name"]},
                "memory": {"allocated_mb": current["memory_allocated_mb"], "reserved_mb": current["memory_reserved_mb"],
                           "free_mb": current["memory_free_mb"], "total_mb": current["memory_total_mb"],
                           "usage_percent": current["memory_usage_percent"]},
                "utilization": {"gpu_percent": current["utilization_percent"],
                                "temperature_celsius": current["temperature_celsius"],
                                "power_watts": current["power_draw_watts"]},
                "timestamp": current["timestamp"]}

    def summary(self) -> dict[str, Any]:
        """``GET /gpu/summary``: averages over the samples (``no_data`` before the first one)."""
        self.sample()
        if not self.samples:
            return {"status": "no_data", "gpu_available": self.gpu_present}
        samples, last, done = list(self.samples), self.samples[-1], [b for b in self.batches if b["success"]]
        mean = lambda key: round(sum(s[key] for s in samples) / len(samples), 2)  # noqa: E731
        throughput = round(sum(b["throughput_imgs_sec"] for b in done) / len(done), 2) if done else 0
        return {"status": "monitoring", "gpu_available": self.gpu_present, "device_name": last["device_name"],
                "total_memory_mb": last["memory_total_mb"], "current_memory_mb": last["memory_allocated_mb"],
                "peak_memory_mb": round(self.peak_memory_mb, 2), "avg_memory_mb": mean("memory_allocated_mb"),
                "avg_utilization_percent": mean("utilization_percent"), "total_images_processed": self.total_images,
                "total_inference_time_ms": round(self.total_inference_ms, 2),
                "avg_throughput_imgs_sec": throughput,
                "batch_success_rate": len(done) / len(self.batches) * 100 if self.batches else 100,
                "monitoring_duration_seconds": round(time.monotonic() - (self.first_sample_at or time.monotonic()), 1)}

    def batch_metrics(self, limit: int = 50) -> dict[str, Any]:
        """``GET /gpu/batch-metrics``: the last ``limit`` inference records and their statistics."""
        records = list(self.batches)[-limit:] if limit > 0 else []
        done = [r for r in records if r["success"]]
        mean = lambda key: round(sum(r[key] for r in done) / len(done), 2) if done else 0  # noqa: E731
        statistics = {"total_batches": len(records), "successful": len(done), "failed": len(records) - len(done),
                      "success_rate": len(done) / len(records) * 100 if records else 100.0,
                      "avg_throughput_imgs_sec": mean("throughput_imgs_sec"),
                      "avg_inference_time_ms": mean("inference_time_ms")}
        return {"status": "active", "statistics": statistics, "metrics": records}

    def memory_pressure(self) -> dict[str, Any]:
        """``GET /gpu/memory-pressure``: above :data:`PRESSURE_THRESHOLD` percent, or 2 of the last 5 runs failed."""
        current = self.sample()
        usage = current["memory_usage_percent"] if current else 0
        recent_failures = sum(not b["success"] for b in list(self.batches)[-5:])
        under = current is not None and (usage > PRESSURE_THRESHOLD or recent_failures >= 2)
        return {"status": "active", "under_pressure": under, "memory_usage_percent": usage,
                "recommendation": "Reduce batch size" if under else "Normal operation",
                "threshold": PRESSURE_THRESHOLD}

    def clear_cache(self) -> dict[str, Any]:
        """``POST /gpu/clear-cache``: ``torch.cuda.empty_cache()`` and the memory before and after."""
        if not self.gpu_present:
            return {"status": "no_gpu", "message": "No GPU available"}
        before = torch.cuda.memory_allocated() / _MB
        torch.cuda.empty_cache()
        after = torch.cuda.memory_allocated() / _MB
        return {"status": "success", "message": "GPU cache cleared", "memory_freed_mb": round(before - after, 2),
                "memory_before_mb": round(before, 2), "memory_after_mb": round(after, 2)}

    def export(self, filepath: str | None = None) -> dict[str, Any]:
        """``POST /gpu/export-metrics``: the summary, samples and records as JSON inside ``export_dir``.

        Raises
        ------
        Refusal
            501 when no folder is configured; 400 when ``filepath`` would leave it.
        """
        target = self.export_path(filepath)
        data = {"summary": self.summary(), "metrics_history": list(self.samples)[-50:],
                "batch_metrics": list(self.batches)[-50:]}
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=2)
        return {"status": "success", "message": "Metrics exported successfully", "filepath": str(target)}

    def export_path(self, filepath: str | None) -> Path:
        """Where an export of ``filepath`` goes: always inside ``export_dir`` (see :meth:`export`)."""
        if self.export_dir is None:
            raise Refusal(501, "export_disabled", "metrics export is switched off on this service; start it with "
                          "ServiceSettings(metrics_export_dir=FOLDER) to export into FOLDER")
        folder = Path(self.export_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        name = filepath or f"gpu_metrics_{datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')}.json"
        if "\0" in name:
            raise _path_refused(name, "holds a NUL byte")
        if PurePath(name).is_absolute() or name.startswith(("/", "\\")):
            raise _path_refused(name, "is an absolute path")
        if ".." in PurePath(name.replace("\\", "/")).parts:
            raise _path_refused(name, "climbs out with '..'")
        target = (folder / name).resolve()
        if not target.is_relative_to(folder):
            raise _path_refused(name, "leaves the export folder through a symbolic link")
        if target.is_dir() or not target.parent.is_dir():
            raise _path_refused(name, "names a folder, or a file in a sub-folder that does not exist")
        return target
