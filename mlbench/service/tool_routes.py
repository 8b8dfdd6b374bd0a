"""The service's side routes: shape metrics (``/api/*``) and GPU monitoring (``/api/v1/monitoring/gpu/*``).

Both presets answer them alike; under ``fixed`` a contour that is no polygon answers 422
(the service answered 500 ``Failed to calculate metrics: ...``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mlbench.service.core import Service
from mlbench.service.limits import Refusal, field_error
from mlbench.service.routes import answering
from mlbench.service.shape_metrics import METRICS_INFO, ContourError, shape_metrics, zero_metrics

__all__ = ["add_tool_routes", "MetricsRequest"]


class MetricsRequest(BaseModel):
    """One polygon to measure: its outline and optional holes, as ``[[x, y], ...]``."""

    contour: list[list[float]]
    holes: list[list[list[float]]] = []


def _measure(polygon: MetricsRequest, preset: str) -> dict[str, float]:
    """The metrics of one polygon, or the refusal of points that are no polygon (500 as served, 422 fixed)."""
    try:
        return shape_metrics(polygon.contour, polygon.holes)
    except ContourError as exc:
        if preset == "as_served":
            raise Refusal(500, "metrics_failed", f"Failed to calculate metrics: {exc}") from exc
        raise field_error("invalid_contour", exc.field, str(exc), getattr(polygon, exc.field)) from exc


def add_tool_routes(app: FastAPI, service: Service) -> None:
    """The metrics and monitoring routes."""
    preset, monitor = service.settings.preset, service.monitor

    @app.post("/api/calculate-metrics")
    async def calculate_metrics(request: MetricsRequest) -> dict[str, float]:
        return _measure(request, preset)

    @app.post("/api/batch-calculate-metrics")
    async def batch_calculate_metrics(polygons: list[MetricsRequest]) -> list[dict[str, float]]:
        results = []
        for polygon in polygons:  # an item that cannot be measured reads all zeros, as served
            try:
                results.append(_measure(polygon, preset))
            except Refusal:
                results.append(zero_metrics())
        return results

    @app.get("/api/metrics-info")
    async def metrics_info() -> dict[str, Any]:
        return METRICS_INFO

    prefix = "/api/v1/monitoring/gpu"
    for path, answer in (("status", monitor.status), ("summary", monitor.summary),
                         ("memory-pressure", monitor.memory_pressure)):
        app.add_api_route(f"{prefix}/{path}", answering(answer), methods=["GET"], name=f"gpu_{answer.__name__}")
    app.add_api_route(f"{prefix}/clear-cache", answering(monitor.clear_cache), methods=["POST"], name="gpu_clear_cache")

    @app.get(f"{prefix}/batch-metrics")
    async def gpu_batch_metrics(limit: int = 50) -> dict[str, Any]:
        return monitor.batch_metrics(limit)

    @app.post(f"{prefix}/export-metrics")
    async def gpu_export_metrics(filepath: str | None = None) -> dict[str, Any]:
        return monitor.export(filepath)
