"""The FastAPI app: the service's routes over :class:`~mlbench.service.core.Service`.

Paths and response schema are those of the real service (``/health``,
``/api/v1/{health,models,status,segment,batch-segment}``) plus ``/livez``, ``/readyz``
and ``/metrics``. Errors answer JSON ``{detail, error, message, request_id, ...}``;
validation errors keep FastAPI's 422 detail schema.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .core import Service
from .limits import Refusal, body_limit
from .logs import log_event
from .metrics import to_prometheus
from .middleware import ServiceMiddleware
from .settings import ServiceSettings

__all__ = ["create_app"]

_FORM_FIELDS = ("model", "threshold", "detect_holes")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The reference service as a FastAPI app (``app.state.service`` is its Service).

    Parameters
    ----------
    settings : ServiceSettings, optional
        Defaults to ``ServiceSettings()`` (the careful service with the bundled models);
        ``ServiceSettings.as_served()`` reproduces the historic one.
    """
    settings = settings or ServiceSettings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        log_event("startup", models=sorted(service.pipelines), settings=settings.to_dict())
        yield
        log_event("shutdown_begin", queue_depth=service.pool.depth)
        await service.stop()
        log_event("shutdown_done")

    app = FastAPI(title="mlbench reference segmentation service", version="1.0", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(ServiceMiddleware, service=service)
    _add_error_handlers(app, service)
    _add_info_routes(app, service)
    _add_segment_routes(app, service)
    return app


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(Refusal)
    async def refusal(request: Request, exc: Refusal):
        service.metrics.reject(_reason(exc))
        log_event("refused", request_id=_request_id(request), status=exc.status, error=exc.code, message=exc.message)
        return JSONResponse(exc.body(_request_id(request)), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        service.metrics.reject("validation")
        return await request_validation_exception_handler(request, exc)


def _reason(exc: Refusal) -> str:
    return {"inference_timeout": "timeout", "image_error": "validation", "empty_file": "validation",
            "unknown_model": "validation", "inference_failed": "failure"}.get(exc.code, exc.code)


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/livez")
    async def livez() -> dict[str, Any]:
        return {"alive": True}

    @app.get("/readyz")
    async def readyz():
        ready, checks = service.readiness()
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503,
                            headers={} if ready else {"Retry-After": "1"})

    @app.get("/api/v1/models")
    async def models() -> dict[str, Any]:
        return service.models_report()

    @app.get("/api/v1/status")
    async def status() -> dict[str, Any]:
        ready, checks = service.readiness()
        snapshot = service.snapshot()
        return {**service.health(), "ready": ready, "checks": checks, "queue": snapshot["queue"],
                "models": service.models_report(), "settings": service.settings.to_dict(),
                "uptime_s": round(time.monotonic() - service.started_at, 1)}

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        snapshot = service.snapshot()
        return JSONResponse(snapshot) if format == "json" else PlainTextResponse(to_prometheus(snapshot))


def _ignored_query(request: Request, service: Service) -> list[str]:
    ignored = [k for k in _FORM_FIELDS if k in request.query_params]
    return ignored if service.settings.preset == "fixed" else []


def _add_segment_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings
    limit = settings.max_body_bytes

    @app.post("/api/v1/segment", max_body_size=limit)
    async def segment(request: Request, file: UploadFile = File(...), model: str = Form(settings.default_model),
                      threshold: float = Form(0.5, ge=0.1, le=0.9), detect_holes: bool = Form(True)):
        data = await file.read()
        body = await service.segment(data, file.filename, model, threshold, detect_holes,
                                     _ignored_query(request, service))
        return Response(body, media_type="application/json")  # encoded by the worker, off the event loop

    @app.post("/api/v1/batch-segment", max_body_size=body_limit(settings, "batch-segment"))
    async def batch_segment(files: list[UploadFile] = File(...), model: str = Form(settings.default_model),
                            threshold: float = Form(0.5, ge=0.1, le=0.9), detect_holes: bool = Form(True)):
        if len(files) > settings.max_batch:
            raise Refusal(413, "too_many_files", f"{len(files)} files sent; at most {settings.max_batch} per batch "
                          "request: split the batch", sent=len(files), limit=settings.max_batch)
        results, successful = [], 0
        for upload in files:  # each item is spliced from the worker's JSON, never decoded here
            head = json.dumps({"filename": upload.filename, "status": 200})[:-1].encode()
            try:
                body = await service.segment(await upload.read(), upload.filename, model, threshold, detect_holes)
                results.append(head + b", " + body[1:])
                successful += 1
            except Refusal as exc:
                service.metrics.reject(_reason(exc))
                item = {"filename": upload.filename, "status": exc.status, "success": False, **exc.body()}
                results.append(json.dumps(item).encode())
        tail = json.dumps({"total": len(results), "successful": successful}).encode()
        return Response(b'{"results": [' + b", ".join(results) + b"], " + tail[1:], media_type="application/json")
