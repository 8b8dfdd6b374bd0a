"""The service's state and behaviour, independent of FastAPI: models, one Pipeline per
model, breakers, the worker pool, metrics, readiness and the ``segment`` operation.

Every failure becomes a :class:`~mlbench.service.limits.Refusal` with a status, a code
and a message that says what happened and what to do.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ..errors import MlbenchError
from ..pipeline import Pipeline, Run
from ..segment import build_response
from ..stages import default_input_size
from .breaker import OPEN, CircuitBreaker
from .limits import Refusal, check_upload, field_error
from .metrics import Metrics
from .queue import (InferenceCancelled, InferenceTimeout, Job, QueueFull, QueueWaitExpired, WorkerPool,
                    install_cancel_hooks)
from .settings import ServiceSettings, resolve_models

__all__ = ["Service"]


def _load(settings: ServiceSettings) -> dict[str, torch.nn.Module]:
    """Import the lazily imported readers now (an import in a request would hold the GIL) and load models."""
    import cv2  # noqa: F401
    import tifffile  # noqa: F401
    from PIL import Image, TiffImagePlugin  # noqa: F401

    return resolve_models(settings)


class Service:
    """The reference segmentation service behind the HTTP routes.

    Parameters
    ----------
    settings : ServiceSettings
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = WorkerPool(settings.workers, settings.queue_size)
        self.pipelines: dict[str, Pipeline] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.warm: dict[str, str] = {}
        self.parameters: dict[str, int] = {}
        self.loaded = self.warmed = self.draining = self._stopped = False
        self.load_error: str | None = None
        self._hooks: list = []
        self._start_lock = asyncio.Lock()
        self._warm_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self.started_at = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models, start the workers and warm up (idempotent)."""
        async with self._start_lock:
            if self.loaded:
                return
            try:
                models = await asyncio.to_thread(_load, self.settings)
            except MlbenchError as exc:
                self.load_error = str(exc)
                raise
            for model_id, model in models.items():
                self.pipelines[model_id] = Pipeline(model, self.settings.preset, **dict(self.settings.options))
                self.locks[model_id] = threading.Lock()
                self.parameters[model_id] = int(sum(p.numel() for p in model.parameters()))
                clock = self.settings.clock or time.monotonic
                self.breakers[model_id] = CircuitBreaker(self.settings.breaker_failures,
                                                         self.settings.breaker_cooldown_s, clock, model_id)
                self._hooks += install_cancel_hooks(model)
            self.pool.start()
            self.loaded = True
        self._lag_task = asyncio.get_running_loop().create_task(self._watch_loop_lag())
        if self.settings.warmup:
            self._warm_task = asyncio.get_running_loop().create_task(self._warm())
        else:
            self.warmed = True

    async def _watch_loop_lag(self, period_s: float = 0.05) -> None:
        """Measure how late the event loop wakes up (a blocked loop shows as lag)."""
        while not self._stopped:
            started = time.monotonic()
            await asyncio.sleep(period_s)
            self.metrics.observe_loop_lag(time.monotonic() - started - period_s)

    async def _warm(self) -> None:
        await asyncio.to_thread(self._warm_up)
        self.warmed = True

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until loaded and warmed up (for tests and scripts); True when ready in time."""
        deadline = time.monotonic() + timeout_s
        while not (self.loaded and self.warmed) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.loaded and self.warmed

    def _warm_up(self) -> None:
        from ..synthetic import make_spheroids

        image, _ = make_spheroids((64, 64), 2, np.random.default_rng(0))
        for model_id, pipeline in self.pipelines.items():
            with self.locks[model_id]:
                run = pipeline.start((image * 255).astype(np.uint8)).with_options(input_size=64).run()
            self.warm[model_id] = "ok" if run.done else f"failed at {run.failed_stage}: {run.error}"

    async def stop(self) -> None:
        """Turn ``/readyz`` off, let queued work finish (bounded), stop the workers, remove hooks."""
        self.draining = self._stopped = True
        for task in (self._warm_task, self._lag_task):
            if task is not None:
                await task
        await asyncio.to_thread(self.pool.stop, self.settings.drain_timeout_s)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- lookups and reports -----------------------------------------------------------------
    def model_id(self, name: str) -> str:
        """The served id for ``name`` (an id, a registry name or an alias); 422 when unknown."""
        if name in self.pipelines:
            return name
        from ..models import resolve_name

        try:
            canonical = resolve_name(name)
        except MlbenchError:
            canonical = None
        for model_id, pipeline in self.pipelines.items():
            if canonical is not None and pipeline.model_name == canonical:
                return model_id
        message = f"unknown model {name!r}; this service serves {sorted(self.pipelines)}"
        if self.settings.preset == "as_served":
            raise Refusal(500, "unknown_model", f"Model {name} not available")
        raise field_error("unknown_model", "model", message, name, models=sorted(self.pipelines))

    def input_size(self, model_id: str) -> int:
        pipeline = self.pipelines[model_id]
        return pipeline.options.input_size or default_input_size(pipeline.model)

    def models_report(self) -> dict[str, Any]:
        out = {}
        for model_id, pipeline in self.pipelines.items():
            model = pipeline.model
            out[model_id] = {
                "name": model_id, "architecture": pipeline.model_name, "loaded": True,
                "parameters": self.parameters[model_id], "input_size": self.input_size(model_id),
                "weights": "bundled" if hasattr(model, "mlbench_weights_sha256") else "injected",
                "warm_up": self.warm.get(model_id, "skipped"), "breaker": self.breakers[model_id].state,
                "busy": self.locks[model_id].locked(),
                "zombies": sum(job.zombie for job in list(self.pool.running) if job.model_id == model_id),
            }
        return out

    def health(self) -> dict[str, Any]:
        return {"status": "healthy" if self.loaded and not self.draining else ("draining" if self.draining else "starting"),
                "timestamp": datetime.now(timezone.utc).isoformat(), "models_loaded": sorted(self.pipelines),
                "gpu_available": bool(torch.cuda.is_available())}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether to route traffic here, and each check with its value."""
        breakers = {mid: b.state for mid, b in self.breakers.items()}
        checks = {"models_loaded": self.loaded, "warm_up_done": self.warmed and all(v == "ok" for v in self.warm.values()),
                  "breakers_closed": all(s != OPEN for s in breakers.values()),
                  "queue_below_high_water": self.pool.depth < self.settings.high_water_mark,
                  "not_draining": not self.draining}
        return all(checks.values()), {**checks, "breakers": breakers, "queue_depth": self.pool.depth,
                                      "high_water_mark": self.settings.high_water_mark}

    def snapshot(self) -> dict[str, Any]:
        """The ``/metrics`` JSON: queue, rejections, breakers, latency percentiles, zombies."""
        out = self.metrics.to_dict()
        out["queue"] = {"depth": self.pool.depth, "capacity": self.settings.queue_size, "workers": self.settings.workers,
                        "running": len(self.pool.running), "zombies": self.pool.zombies,
                        "cancelled_runs_stopped": len(self.pool.stopped_after_cancel)}
        out["models"] = {mid: {"breaker": info["breaker"], "busy": info["busy"], "zombies": info["zombies"]}
                         for mid, info in self.models_report().items()}
        out["breakers"] = {mid: b.to_dict() for mid, b in self.breakers.items()}
        return out

    def retry_estimate(self) -> float:
        """Seconds until a queue slot is likely free: queued jobs x median latency / workers."""
        p50 = self.metrics.to_dict()["latency_s"]["p50"] or 1.0
        return max(1.0, (self.pool.depth + 1) * p50 / self.settings.workers)

    # ---- segment -----------------------------------------------------------------------------
    async def segment(self, data: bytes, filename: str | None, model: str, threshold: float,
                      detect_holes: bool) -> dict[str, Any]:
        """One image through the model's Pipeline; the service's response body, or a Refusal."""
        if not self.loaded:
            await self.start()
        if self.draining:
            raise Refusal(503, "draining", "the service is shutting down; retry on another instance", retry_after=5)
        settings = self.settings
        header = check_upload(data, filename, settings.allowed_extensions, settings.max_pixels)
        model_id = self.model_id(model)
        options = {"threshold": float(threshold), "detect_holes": bool(detect_holes)}
        if settings.blocking_route:  # the historic async route: the forward blocks the event loop
            return self._finish(model_id, self._infer(model_id, data, options), time.monotonic())
        breaker = self.breakers[model_id]
        if not breaker.allow():
            raise Refusal(503, "breaker_open", f"model {model_id!r} is failing: its circuit breaker is open after "
                          f"{breaker.failures} consecutive failures; retry after the cool-down",
                          retry_after=breaker.retry_after(), model=model_id, breaker=breaker.to_dict())
        job = Job(model_id, lambda token: self._infer(model_id, data, options, token), self.locks[model_id])
        try:
            run = await self.pool.run(job, settings.max_wait_s, settings.timeout_s)
        except (QueueFull, QueueWaitExpired) as exc:
            breaker.release_trial()
            full = isinstance(exc, QueueFull)
            raise Refusal(429 if full else 503, "queue_full" if full else "queue_wait",
                          f"overloaded: {exc}; retry later", retry_after=self.retry_estimate(),
                          queue_depth=self.pool.depth, queue_size=settings.queue_size) from exc
        except InferenceTimeout as exc:
            breaker.record_failure("timeout")
            raise self._timeout_refusal(model_id, header) from exc
        return self._finish(model_id, run, job.enqueued_at, job.started_at)

    def _infer(self, model_id: str, data: bytes, options: dict, token=None) -> Run:
        """Run every stage, checking the cancel token between stages (worker thread)."""
        run = self.pipelines[model_id].start(data).with_options(**options)
        while run.next_stage is not None:
            if token is not None:
                token.check(f"before stage {run.next_stage}")
            run.step()
        return run

    def _timeout_refusal(self, model_id: str, header: tuple[str, int, int] | None) -> Refusal:
        size = f"{header[2]}x{header[1]}" if header else "unknown size"
        timeout = self.settings.timeout_s
        return Refusal(504, "inference_timeout",
                       f"model {model_id!r} did not finish a {size} image (model input {self.input_size(model_id)} px) "
                       f"within the {timeout:g} s inference timeout; the run was cancelled and stops at the next "
                       "layer (see /metrics zombies). Send a smaller image, pick a faster model, or raise timeout_s",
                       model=model_id, timeout_s=timeout, image_size=size, input_size=self.input_size(model_id))

    def _finish(self, model_id: str, run: Run, enqueued_at: float, started_at: float | None = None) -> dict[str, Any]:
        """Response body of a finished run, or the Refusal its failure maps to (+ breaker)."""
        breaker = self.breakers[model_id]
        if run.failed:
            exc, stage = run.error, run.failed_stage
            if isinstance(exc, InferenceCancelled):
                raise Refusal(504, "inference_timeout", str(exc), model=model_id)
            if stage == "decode" and self.settings.preset == "fixed":
                raise field_error("image_error", "file", f"the image cannot be decoded: {exc}", "upload")
            breaker.record_failure(f"{stage}: {type(exc).__name__}")
            self.metrics.fail(model_id)
            raise Refusal(500, "inference_failed", f"stage {stage!r} failed for model {model_id!r}: "
                          f"{type(exc).__name__}: {exc}", model=model_id, stage=stage)
        breaker.record_success()
        now = time.monotonic()
        start = started_at if started_at is not None else enqueued_at
        self.metrics.observe_inference(now - start, start - enqueued_at)
        response = build_response(run)
        response["model_used"] = model_id
        response["queue_time"] = round(start - enqueued_at, 3)
        return response
