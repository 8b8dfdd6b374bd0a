"""The bodies of the service's answers, in the real service's envelopes.

Every function takes the :class:`~mlbench.service.core.Service` and returns the JSON the
real service answered (same field names, types and nesting); under the ``fixed`` preset
the corrections come as extra keys (readiness, queue, breakers, request ids), never
under a recorded name.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import torch

from mlbench.service.limits import Refusal
from mlbench.service.reports import models_report, readiness, snapshot
from mlbench.models.cards import card

__all__ = ["SERVICE_NAME", "SERVICE_VERSION", "BATCH_ITEM_KEYS", "ASYNC_NOT_IMPLEMENTED", "root_body",
           "health_body", "api_health_body", "models_body", "status_body", "batch_body", "failed_item",
           "timestamp"]

SERVICE_NAME = "Cell Segmentation Microservice"
SERVICE_VERSION = "1.0.0"
BATCH_ITEM_KEYS = ("model_used", "threshold_used", "image_size", "polygons", "processing_info")
"""What the service's model loader returned, and all a successful batch item carried (as served)."""
ASYNC_NOT_IMPLEMENTED = "Async processing not implemented yet. Use /segment endpoint for synchronous processing."


def timestamp(fixed: bool) -> str:
    """Now in ISO 8601: with its UTC offset under ``fixed``, naive local time as served."""
    return datetime.now(timezone.utc).isoformat() if fixed else datetime.now().isoformat()


def _fixed(service) -> bool:
    return service.settings.preset == "fixed"


def _state(service) -> str:
    """Always "healthy" as served; "starting" or "draining" too under ``fixed``."""
    if not _fixed(service):
        return "healthy"
    return "draining" if service.draining else ("healthy" if service.loaded else "starting")


def root_body(service) -> dict[str, Any]:
    """``GET /``."""
    return {"service": SERVICE_NAME, "version": SERVICE_VERSION, "status": "running"}


def health_body(service) -> dict[str, Any]:
    """``GET /health``: ``models_loaded`` is a count (``models`` lists the ids under ``fixed``)."""
    mps = getattr(torch.backends, "mps", None)
    gpu = bool(torch.cuda.is_available()) or bool(mps is not None and mps.is_available())
    body = {"status": _state(service), "timestamp": timestamp(_fixed(service)),
            "models_loaded": len(service.pipelines), "gpu_available": gpu}
    if _fixed(service):
        body["models"] = sorted(service.pipelines)
    return body


def api_health_body(service) -> dict[str, Any]:
    """``GET /api/v1/health``: the service's name and version and the CUDA device."""
    cuda = bool(torch.cuda.is_available())
    device = {"gpu_available": cuda, "device_count": torch.cuda.device_count() if cuda else 0,
              "device_name": torch.cuda.get_device_name() if cuda else "CPU"}
    return {"status": _state(service), "timestamp": timestamp(_fixed(service)), "service": "cell-segmentation",
            "version": SERVICE_VERSION, "device": device}


def models_body(service) -> dict[str, Any]:
    """``GET /api/v1/models``: ``{"models": {id: {...}}}`` with the batch configuration."""
    extras = models_report(service) if _fixed(service) else {}
    models = {}
    for model_id in sorted(service.pipelines):
        trained = bool(card(service.pipelines[model_id].model).sha256)
        models[model_id] = {"name": model_id, "description": f"{model_id.upper()} model for spheroid segmentation",
                            "has_pretrained": trained, "has_finetuned": trained, "recommended_threshold": 0.5,
                            **service.settings.batch_config(model_id), **extras.get(model_id, {})}
    return {"models": models}


def status_body(service) -> dict[str, Any]:
    """``GET /api/v1/status``: idle or processing (and, under ``fixed``, readiness, queue and settings)."""
    busy = [model_id for model_id, lock in service.locks.items() if lock.locked()]
    body = {"status": "processing" if busy else "idle", "is_processing": bool(busy),
            "current_model": busy[0] if busy else None, "queue_length": service.pool.depth, "available": not busy,
            "timestamp": timestamp(_fixed(service))}
    if _fixed(service):
        ready, checks = readiness(service)
        body.update(ready=ready, checks=checks, queue=snapshot(service)["queue"], models=models_report(service),
                    settings=service.settings.to_dict(), uptime_s=round(time.monotonic() - service.started_at, 1))
    return body


def failed_item(refusal: Refusal, filename: str | None, index: int, model: str, threshold: float,
                preset: str) -> dict[str, Any]:
    """A batch item that failed: the service's shape, plus status, code and details under ``fixed``."""
    item = {"filename": filename, "batch_index": index, "success": False, "error": refusal.item_error,
            "polygons": [], "model_used": model, "threshold_used": threshold}
    if preset == "fixed":
        item.update(status=refusal.status, code=refusal.code, **refusal.extra)
        if refusal.errors is not None:
            item["errors"] = refusal.errors
    return item


def batch_body(count: int, successful: int, polygons: int, model: str, threshold: float,
               seconds: float) -> dict[str, Any]:
    """The batch envelope without its ``results`` (the route splices the items' JSON in)."""
    return {"success": True, "batch_size": count, "successful_count": successful, "failed_count": count - successful,
            "total_polygons": polygons, "model_used": model, "threshold_used": threshold, "processing_time": seconds}
