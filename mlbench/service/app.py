"""The FastAPI app: the real service's routes and envelopes over :class:`~mlbench.service.core.Service`.

Paths, field names and error texts are those of the real service (see
``tests/data/service_api/``): ``/``, ``/health``, ``/api/v1/{health,models,status,segment,
batch-segment,segment/{task_id}}``, ``/api/{calculate-metrics,batch-calculate-metrics,
metrics-info}``, ``/api/v1/monitoring/gpu/*``, CORS ``*`` and an ``OPTIONS /{path}``
catch-all. Under ``as_served`` every answer is the service's own; under ``fixed`` the
corrections come as extra keys (``error``, ``message``, ``request_id``, ...), other status
codes for client mistakes, and the routes ``/livez``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic.version import version_short
from starlette.exceptions import HTTPException

from mlbench.service.core import Service
from mlbench.service.limits import Refusal
from mlbench.service.logs import log_event
from mlbench.service.middleware import ServiceMiddleware
from mlbench.service.routes import add_info_routes, add_segment_routes, rejection_reason
from mlbench.service.settings import ServiceSettings
from mlbench.service.tool_routes import add_tool_routes

__all__ = ["create_app"]

CORS_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
"""What the service's ``allow_methods=["*"]`` meant in its Starlette (newer ones add QUERY)."""
PYDANTIC_VERSION = version_short()
"""The ``url`` of a 422 item names the pydantic docs of this version, as FastAPI <= 0.108 did."""


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

    app = FastAPI(title="Cell Segmentation Microservice", description="mlbench's reference segmentation service",
                  version="1.0.0", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(ServiceMiddleware, service=service)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=False, allow_methods=CORS_METHODS,
                       allow_headers=["*"])  # outermost, so refusals answered by ServiceMiddleware carry it too
    _add_error_handlers(app, service)
    add_info_routes(app, service)
    add_segment_routes(app, service)
    add_tool_routes(app, service)
    _add_preflight_route(app)
    return app


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    preset = service.settings.preset

    @app.exception_handler(Refusal)
    async def refusal(request: Request, exc: Refusal):
        service.metrics.reject(rejection_reason(exc))
        log_event("refused", request_id=_request_id(request), status=exc.status, error=exc.code, message=exc.message)
        return JSONResponse(exc.body(_request_id(request), preset), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        """FastAPI's 422 ``{"detail": [{type, loc, msg, input, ctx?, url}]}`` (+ error, message, request_id)."""
        service.metrics.reject("validation")
        detail = [{**item, "url": f"https://errors.pydantic.dev/{PYDANTIC_VERSION}/v/{item['type']}"}
                  for item in jsonable_encoder(exc.errors())]
        if preset == "as_served":
            return JSONResponse({"detail": detail}, status_code=422)
        fields = "; ".join(f"{'.'.join(str(p) for p in item['loc'][1:]) or item['loc'][0]}: {item['msg']}"
                           for item in detail)
        refusal = Refusal(422, "validation_error", f"the request does not fit the API ({fields}); see /docs for the "
                          "form fields and their ranges")
        return JSONResponse({**refusal.body(_request_id(request)), "detail": detail}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Under ``fixed`` an unknown path answers 404 (the OPTIONS catch-all made it a 405)."""
        if preset == "fixed" and exc.status_code == 405 and (exc.headers or {}).get("Allow") == "OPTIONS":
            paths = sorted({r.path for r in app.routes if getattr(r, "include_in_schema", False)} - {"/{path}"})
            refusal = Refusal(404, "not_found", f"{request.method} {request.url.path} is no route of this service; "
                              f"check the path: the routes are {', '.join(paths)}")
            return JSONResponse(refusal.body(_request_id(request)), status_code=404)
        return await http_exception_handler(request, exc)


def _add_preflight_route(app: FastAPI) -> None:
    """The service's ``OPTIONS /{path}`` catch-all (registered last, so real routes' 405s keep their Allow)."""

    @app.options("/{path:path}")
    async def options_handler(path: str) -> JSONResponse:
        return JSONResponse({}, headers={"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods":
                                         "GET, POST, OPTIONS", "Access-Control-Allow-Headers": "*",
                                         "Access-Control-Max-Age": "600"})
