"""The service's own routes: root, health, models, status, segment and batch-segment.

Bodies come from :mod:`mlbench.service.answers` (the real service's envelopes); ``fixed``
adds ``/livez``, ``/readyz`` and ``/metrics``. A segment answer is JSON-encoded by the
worker and sent as bytes, so a large polygon list never holds the event loop; the batch
route splices its items' bytes into the envelope.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from mlbench.service.answers import (ASYNC_NOT_IMPLEMENTED, api_health_body, batch_body, failed_item, health_body, models_body,
                      root_body, status_body)
from mlbench.service.core import Service
from mlbench.service.limits import Refusal, check_extension
from mlbench.service.metrics import to_prometheus
from mlbench.service.reports import not_ready_reason, readiness, snapshot

__all__ = ["add_info_routes", "add_segment_routes", "rejection_reason", "answering"]

_FORM_FIELDS = ("model", "threshold", "detect_holes")


def rejection_reason(exc: Refusal) -> str:
    """The ``/metrics`` rejection reason of a refusal."""
    return {"inference_timeout": "timeout", "image_error": "validation", "empty_file": "validation",
            "unknown_model": "validation", "inference_failed": "failure",
            "segmentation_failed": "failure"}.get(exc.code, exc.code)


def add_info_routes(app: FastAPI, service: Service) -> None:
    """``/``, ``/health``, ``/api/v1/{health,models,status,segment/{task_id}}`` (+ livez, readyz, metrics)."""
    for path, answer in (("/", root_body), ("/health", health_body), ("/api/v1/health", api_health_body),
                         ("/api/v1/models", models_body), ("/api/v1/status", status_body)):
        app.add_api_route(path, answering(answer, service), methods=["GET"], name=answer.__name__)

    @app.get("/api/v1/segment/{task_id}")
    async def segment_status(task_id: str):
        raise Refusal(501, "not_implemented", ASYNC_NOT_IMPLEMENTED, task_id=task_id)

    if service.settings.preset == "as_served":  # the real service had none of the routes below
        return

    @app.get("/livez")
    async def livez() -> dict:
        return {"alive": True}

    @app.get("/readyz")
    async def readyz():
        ready, checks = readiness(service)
        body = {"ready": ready, "checks": checks} if ready else {"ready": False, "reason": not_ready_reason(checks),
                                                                 "checks": checks}
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        report = snapshot(service)
        return JSONResponse(report) if format == "json" else PlainTextResponse(to_prometheus(report))


def answering(answer, *args):
    """An async endpoint without parameters that returns ``answer(*args)``."""
    async def endpoint() -> dict:
        return answer(*args)

    return endpoint


def _ignored_query(request: Request, service: Service) -> tuple[str, ...]:
    """Form fields sent in the query string (flagged under ``fixed``; the service ignored them silently)."""
    return tuple(k for k in _FORM_FIELDS if k in request.query_params) if service.settings.preset == "fixed" else ()


def add_segment_routes(app: FastAPI, service: Service) -> None:
    """``POST /api/v1/segment`` and ``POST /api/v1/batch-segment``."""
    settings = service.settings

    @app.post("/api/v1/segment")  # body limit, deadline and admission: ServiceMiddleware
    async def segment(request: Request, file: UploadFile = File(...), model: str = Form(settings.default_model),
                      threshold: float = Form(0.5, ge=0.1, le=0.9), detect_holes: bool = Form(True)):
        data = await file.read()
        outcome = await service.segment(data, file.filename, model, threshold, detect_holes,
                                        _ignored_query(request, service))
        return Response(outcome.body, media_type="application/json")  # encoded by the worker, off the event loop

    @app.post("/api/v1/batch-segment")
    async def batch_segment(files: list[UploadFile] = File(...), model: str = Form(settings.default_model),
                            threshold: float = Form(0.5, ge=0.1, le=0.9), detect_holes: bool = Form(True)):
        started, fixed = time.monotonic(), settings.preset == "fixed"
        model_used = service.model_id(model) if fixed else model  # fixed: an unknown model refuses the whole batch
        _check_batch(service, files, model_used)
        items, successful, polygons = [], 0, 0
        for index, upload in enumerate(files):  # each item is spliced from the worker's JSON, never decoded here
            item = {"filename": upload.filename, "batch_index": index}
            item.update({"status": 200} if fixed else {"success": True})
            try:
                outcome = await service.segment(await upload.read(), upload.filename, model, threshold, detect_holes,
                                                item=item)
            except Refusal as exc:
                service.metrics.reject(rejection_reason(exc))
                failed = failed_item(exc, upload.filename, index, model_used, float(threshold), settings.preset)
                items.append(json.dumps(failed).encode())
                continue
            items.append(outcome.body)
            successful, polygons = successful + 1, polygons + outcome.polygons
        head = batch_body(len(files), successful, polygons, model_used, float(threshold), time.monotonic() - started)
        body = json.dumps(head)[:-1].encode() + b', "results": [' + b", ".join(items) + b"]}"
        return Response(body, media_type="application/json")


def _check_batch(service: Service, files: list[UploadFile], model: str) -> None:
    """The whole batch's checks: the model's ``max_safe_batch_size`` (400), ``max_batch`` (413, fixed)
    and, as served, every file name against the allow-list (400)."""
    settings = service.settings
    limit = int(settings.batch_config(model)["max_safe_batch_size"])
    if len(files) > limit:
        raise Refusal(400, "batch_too_large", f"Batch size for {model} model cannot exceed {limit} images",
                      model=model, limit=limit, sent=len(files))
    if settings.preset == "fixed" and len(files) > settings.max_batch:
        raise Refusal(413, "too_many_files", f"{len(files)} files sent; at most {settings.max_batch} per batch "
                      "request: split the batch", sent=len(files), limit=settings.max_batch)
    for upload in files if settings.allowed_extensions is not None else ():
        check_extension(upload.filename, settings.allowed_extensions, batch=True)
