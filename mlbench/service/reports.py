"""The ``fixed`` service's own reports: per-model state, readiness and the ``/metrics`` snapshot.

They appear as extra keys of ``/api/v1/models`` and ``/api/v1/status`` and as the bodies of
``/readyz`` and ``/metrics``, routes the real service did not have.
"""

from __future__ import annotations

from typing import Any

from mlbench.service.breaker import OPEN
from mlbench.models.cards import card

__all__ = ["models_report", "readiness", "snapshot"]


def models_report(service) -> dict[str, Any]:
    """Per served model: architecture, parameters, input size, weights, warm-up, breaker, busy, zombies."""
    out = {}
    for model_id, pipeline in service.pipelines.items():
        model = pipeline.model
        out[model_id] = {
            "name": model_id, "architecture": pipeline.model_name, "loaded": True,
            "parameters": service.parameters[model_id], "input_size": service.input_size(model_id),
            "weights": card(model).source or "injected",
            "warm_up": service.warm.get(model_id, "skipped"), "breaker": service.breakers[model_id].state,
            "busy": service.locks[model_id].locked(),
            "zombies": sum(job.zombie for job in list(service.pool.running) if job.model_id == model_id),
        }
    return out


def readiness(service) -> tuple[bool, dict[str, Any]]:
    """Whether to route traffic here, and each check with its value."""
    breakers = {mid: b.state for mid, b in service.breakers.items()}
    warmed = service.warmed and all(v == "ok" for v in service.warm.values())
    checks = {"models_loaded": service.loaded, "warm_up_done": warmed,
              "breakers_closed": all(s != OPEN for s in breakers.values()),
              "queue_below_high_water": service.pool.depth < service.settings.high_water_mark,
              "not_draining": not service.draining, "workers_started": service.load_error is None}
    return all(checks.values()), {**checks, "breakers": breakers, "queue_depth": service.pool.depth,
                                  "high_water_mark": service.settings.high_water_mark}


def snapshot(service) -> dict[str, Any]:
    """The ``/metrics`` JSON: queue, rejections, breakers, latency percentiles, zombies."""
    out = service.metrics.to_dict()
    processes = [worker.to_dict() for worker in service.pool.worker_objects]
    settings, pool = service.settings, service.pool
    out["queue"] = {"depth": pool.depth, "capacity": settings.queue_size, "workers": settings.workers,
                    "executor": settings.executor, "admitted": service.admitted, "running": len(pool.running),
                    "zombies": pool.zombies, "cancelled_runs_stopped": len(pool.stopped_after_cancel),
                    "killed_after_timeout": sum(p["killed_after_timeout"] for p in processes),
                    "worker_processes": processes}
    out["models"] = {mid: {"breaker": info["breaker"], "busy": info["busy"], "zombies": info["zombies"]}
                     for mid, info in models_report(service).items()}
    out["breakers"] = {mid: b.to_dict() for mid, b in service.breakers.items()}
    return out
