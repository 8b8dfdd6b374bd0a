"""The ``fixed`` service's own reports: per-model state, readiness and the ``/metrics`` snapshot.

They appear as extra keys of ``/api/v1/models`` and ``/api/v1/status`` and as the bodies of
``/readyz`` and ``/metrics``, routes the real service did not have.
"""

from __future__ import annotations

from typing import Any

from mlbench.service.breaker import OPEN
from mlbench.models.cards import card

__all__ = ["models_report", "readiness", "not_ready_reason", "snapshot"]


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
    """Whether to route traffic here, and each check with its value.

    Not ready while the service cannot take a request: models not loaded or warmed up, a breaker
    open, the queue at its high-water mark, every admission slot taken (``queue_size + workers``
    requests admitted) or every upload slot taken (``max_uploads`` bodies arriving), draining.
    """
    settings = service.settings
    breakers = {mid: b.state for mid, b in service.breakers.items()}
    warmed = service.warmed and all(v == "ok" for v in service.warm.values())
    checks = {"models_loaded": service.loaded, "warm_up_done": warmed,
              "breakers_closed": all(s != OPEN for s in breakers.values()),
              "queue_below_high_water": service.pool.depth < settings.high_water_mark,
              "admission_open": service.admitted < service.capacity or settings.blocking_route,
              "upload_slots_free": service.uploading < settings.max_uploads,
              "not_draining": not service.draining, "workers_started": service.load_error is None}
    return all(checks.values()), {**checks, "breakers": breakers, "queue_depth": service.pool.depth,
                                  "high_water_mark": settings.high_water_mark, "admitted": service.admitted,
                                  "admission_capacity": service.capacity, "uploading": service.uploading,
                                  "max_uploads": settings.max_uploads}


_REASONS = {
    "models_loaded": lambda c: "the models are not loaded yet",
    "warm_up_done": lambda c: "the models are not warmed up yet",
    "breakers_closed": lambda c: "circuit breaker open for "
                                 + ", ".join(m for m, s in c["breakers"].items() if s == OPEN),
    "queue_below_high_water": lambda c: f"the queue holds {c['queue_depth']} requests (high-water mark "
                                        f"{c['high_water_mark']})",
    "admission_open": lambda c: f"every admission slot is taken ({c['admitted']} of {c['admission_capacity']} "
                                "requests admitted): new segment requests are answered 429",
    "upload_slots_free": lambda c: f"every upload slot is taken ({c['uploading']} of {c['max_uploads']} request "
                                   "bodies arriving): new requests with a body are answered 503",
    "not_draining": lambda c: "the service is shutting down",
    "workers_started": lambda c: "the inference workers did not start (see /api/v1/status)",
}


def not_ready_reason(checks: dict[str, Any]) -> str:
    """Why :func:`readiness` said not ready, in words with the values ("; "-joined)."""
    return "; ".join(words(checks) for name, words in _REASONS.items() if checks.get(name) is False)


def snapshot(service) -> dict[str, Any]:
    """The ``/metrics`` JSON: queue, rejections, breakers, latency percentiles, zombies."""
    out = service.metrics.to_dict()
    processes = [worker.to_dict() for worker in service.pool.worker_objects]
    settings, pool = service.settings, service.pool
    out["queue"] = {"depth": pool.depth, "capacity": settings.queue_size, "workers": settings.workers,
                    "executor": settings.executor, "admitted": service.admitted, "admission_capacity": service.capacity,
                    "uploading": service.uploading, "max_uploads": settings.max_uploads, "running": len(pool.running),
                    "zombies": pool.zombies, "cancelled_runs_stopped": len(pool.stopped_after_cancel),
                    "killed_after_timeout": sum(p["killed_after_timeout"] for p in processes),
                    "worker_processes": processes}
    out["models"] = {mid: {"breaker": info["breaker"], "busy": info["busy"], "zombies": info["zombies"]}
                     for mid, info in models_report(service).items()}
    out["breakers"] = {mid: b.to_dict() for mid, b in service.breakers.items()}
    return out
