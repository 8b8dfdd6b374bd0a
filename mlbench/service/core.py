"""The service's state and behaviour, independent of FastAPI: models, one Pipeline per
model, breakers, the worker pool, metrics, readiness and the ``segment`` operation.

Every failure becomes a :class:`~mlbench.service.limits.Refusal` with a status, a code
and a message that says what happened and what to do.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import torch

from mlbench.errors import MlbenchError
from mlbench.pipeline.run import Pipeline
from mlbench.pipeline.stages import default_input_size
from mlbench.service.answers import BATCH_ITEM_KEYS
from mlbench.service.breaker import CircuitBreaker
from mlbench.service.failures import served_open, stage_refusal, timeout_refusal, unknown_model
from mlbench.service.limits import Refusal, check_upload
from mlbench.service.metrics import Metrics
from mlbench.service.logs import log_event
from mlbench.service.monitoring import GpuMonitor
from mlbench.service.queue import (InferenceTimeout, Job, QueueFull, QueueWaitExpired, WorkerPool, current_worker,
                    install_cancel_hooks)
from mlbench.service.settings import ServiceSettings, resolve_models
from mlbench.service.uploads import uploads_full
from mlbench.service.work import Outcome, WorkerDied, freeze_heap, pickle_models, process_worker_factory, run_pipeline, warm_up

__all__ = ["Service"]


def _load(settings: ServiceSettings) -> dict[str, torch.nn.Module]:
    """Import the lazily imported readers now (an import in a request would hold the GIL) and load models."""
    import cv2  # noqa: F401
    import tifffile  # noqa: F401
    from PIL import Image, TiffImagePlugin  # noqa: F401

    return resolve_models(settings)


def _extra_fields(model_id: str, threshold: float, ignored_query: tuple[str, ...]) -> dict[str, Any]:
    """Fields the service adds to the pipeline's response (the worker encodes them with it)."""
    extra: dict[str, Any] = {"model_used": model_id}
    if ignored_query:
        extra["warnings"] = [f"query parameter(s) {', '.join(ignored_query)} ignored: send them as multipart form "
                             f"fields; used model={model_id}, threshold={threshold}"]
    return extra


class Service:
    """The reference segmentation service behind the HTTP routes.

    Parameters
    ----------
    settings : ServiceSettings
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.monitor = GpuMonitor(settings.metrics_export_dir)
        self.pool = WorkerPool(settings.workers, settings.queue_size, settings.worker_nice)
        self.pipelines: dict[str, Pipeline] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.warm: dict[str, str] = {}
        self.parameters: dict[str, int] = {}
        self.loaded = self.warmed = self.draining = self._stopped = False
        self.admitted = self.uploading = 0
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
            if self.settings.executor == "process":  # pickle now, so an unpicklable model fails start-up
                self.pool.make_worker = process_worker_factory(self.settings, pickle_models(models))
            for model_id, model in models.items():
                self.pipelines[model_id] = Pipeline(model, self.settings.preset, **dict(self.settings.options))
                self.locks[model_id] = threading.Lock()
                self.parameters[model_id] = int(sum(p.numel() for p in model.parameters()))
                clock = self.settings.clock or time.monotonic
                self.breakers[model_id] = CircuitBreaker(self.settings.breaker_failures,
                                                         self.settings.breaker_cooldown_s, clock, model_id)
                if self.settings.executor == "thread":
                    self._hooks += install_cancel_hooks(model)
            if self.settings.freeze_gc:
                await asyncio.to_thread(freeze_heap)
            if self.settings.executor == "thread":
                self.pool.start()
            self.loaded = True
        self._lag_task = asyncio.get_running_loop().create_task(self._watch_loop_lag())
        self._warm_task = asyncio.get_running_loop().create_task(self._warm())

    async def _watch_loop_lag(self, period_s: float = 0.05) -> None:
        """Measure how late the event loop wakes up (a blocked loop shows as lag)."""
        while not self._stopped:
            started = time.monotonic()
            await asyncio.sleep(period_s)
            self.metrics.observe_loop_lag(time.monotonic() - started - period_s)

    async def _warm(self) -> None:
        """Start the worker processes (they load and warm up the models) or warm up in-process."""
        try:
            if self.settings.executor == "process":
                await asyncio.to_thread(self.pool.start)
                self.warm = dict(self.pool.worker_objects[0].warm)
            elif self.settings.warmup:
                await asyncio.to_thread(self._warm_up)
        except MlbenchError as exc:
            self.load_error = str(exc)
            log_event("workers_failed", error=str(exc))
            return
        self.warmed = True

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until loaded and warmed up (for tests and scripts); True when ready in time."""
        deadline = time.monotonic() + timeout_s
        while not (self.loaded and self.warmed) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.loaded and self.warmed

    def _warm_up(self) -> None:
        for model_id, pipeline in self.pipelines.items():
            with self.locks[model_id]:
                self.warm.update(warm_up({model_id: pipeline}))

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
        """The served id for ``name``: an id, or under ``fixed`` also a registry name or alias.

        Raises
        ------
        Refusal
            For a model this service does not serve (500 as served, 422 under ``fixed``).
        """
        if name in self.pipelines:
            return name
        if self.settings.preset == "fixed":
            from mlbench.models import resolve_name

            try:
                canonical = resolve_name(name)
            except MlbenchError:
                canonical = None
            for model_id, pipeline in self.pipelines.items():
                if canonical is not None and pipeline.model_name == canonical:
                    return model_id
        raise unknown_model(name, list(self.pipelines), self.settings.preset)

    def input_size(self, model_id: str) -> int:
        pipeline = self.pipelines[model_id]
        return pipeline.options.input_size or default_input_size(pipeline.model)

    def retry_estimate(self) -> float:
        """Seconds until a queue slot is likely free: queued jobs x recent median latency / workers."""
        p50 = self.metrics.recent_median() or 1.0
        return max(1.0, (self.pool.depth + 1) * p50 / self.settings.workers)

    @property
    def capacity(self) -> int:
        """Most segment requests admitted at once: ``queue_size + workers``."""
        return self.settings.queue_size + self.settings.workers

    def begin_upload(self) -> Refusal | None:
        """Take an upload slot for a request body about to be read; a 503 Refusal when all
        ``max_uploads`` are taken. Every granted slot is given back with :meth:`end_upload`."""
        if self.uploading >= self.settings.max_uploads:
            return uploads_full(self.settings, self.uploading)
        self.uploading += 1
        return None

    def end_upload(self) -> None:
        """A body has arrived, or was given up."""
        self.uploading -= 1

    def admit(self) -> Refusal | None:
        """Count a segment request in once its body has arrived, before it is parsed; a Refusal when full.

        At most ``queue_size + workers`` requests are admitted (parsing, queued or running);
        more are shed with 429 at once, so a burst does not make the event loop parse uploads
        that could never get a queue slot. A body still arriving holds no admission slot (it
        holds an upload slot, bounded in time by ``body_timeout_s``), so idle or slow clients
        cannot shut the segment API. Every admitted request calls :meth:`release` at its end.
        """
        if self.draining:
            return Refusal(503, "draining", "the service is shutting down; retry on another instance", retry_after=5)
        capacity = self.capacity
        if self.admitted >= capacity and not self.settings.blocking_route:  # the historic service had no queue
            return Refusal(429, "queue_full", f"overloaded: {self.admitted} requests are already admitted (queue of "
                           f"{self.settings.queue_size} + {self.settings.workers} worker(s)); retry later",
                           retry_after=self.retry_estimate(), queue_depth=self.pool.depth,
                           queue_size=self.settings.queue_size)
        self.admitted += 1
        return None

    def release(self) -> None:
        """An admitted request has been answered."""
        self.admitted -= 1

    # ---- segment -----------------------------------------------------------------------------
    async def segment(self, data: bytes, filename: str | None, model: str, threshold: float,
                      detect_holes: bool, ignored_query: tuple[str, ...] = (), item: dict | None = None) -> Outcome:
        """One image through the model's Pipeline: an Outcome with the JSON body, or a Refusal.

        ``ignored_query`` names form fields the caller sent in the query string: the answer
        then carries a ``warnings`` entry saying they were ignored. ``item`` holds the fields
        of a batch item (filename, batch_index, ...); as served such an item carries only
        the model loader's keys (:data:`~mlbench.service.answers.BATCH_ITEM_KEYS`).
        """
        if not self.loaded:
            await self.start()
        if self.draining:
            raise Refusal(503, "draining", "the service is shutting down; retry on another instance", retry_after=5)
        settings, fixed = self.settings, self.settings.preset == "fixed"
        header, model_id = self._admit_upload(data, filename, model)
        options = {"threshold": float(threshold), "detect_holes": bool(detect_holes)}
        extra = {**_extra_fields(model_id, float(threshold), ignored_query if fixed else ()), **(item or {})}
        keys = BATCH_ITEM_KEYS if item is not None and not fixed else None
        if settings.blocking_route:  # the historic async route: the forward blocks the event loop
            started = time.monotonic()
            outcome = run_pipeline(self.pipelines[model_id], data, options, extra=extra, keys=keys)
            return self._finish(model_id, outcome, started)
        breaker = self.breakers[model_id]
        if not breaker.allow():
            raise Refusal(503, "breaker_open", f"model {model_id!r} is failing: its circuit breaker is open after "
                          f"{breaker.failures} consecutive failures; retry after the cool-down",
                          retry_after=breaker.retry_after(), model=model_id, breaker=breaker.to_dict())
        waited = (lambda: {"queue_time": round(time.monotonic() - job.enqueued_at, 3)}) if fixed else dict
        job = Job(model_id, lambda token: self._infer(model_id, data, options, token, {**extra, **waited()}, keys),
                  self.locks[model_id])
        try:
            outcome = await self.pool.run(job, settings.max_wait_s, settings.timeout_s)
        except (QueueFull, QueueWaitExpired) as exc:
            breaker.release_trial()
            full = isinstance(exc, QueueFull)
            raise Refusal(429 if full else 503, "queue_full" if full else "queue_wait",
                          f"overloaded: {exc}; retry later", retry_after=self.retry_estimate(),
                          queue_depth=self.pool.depth, queue_size=settings.queue_size) from exc
        except InferenceTimeout as exc:
            breaker.record_failure("timeout")
            self.monitor.record(model_id, settings.timeout_s, False, "timeout")
            raise timeout_refusal(settings, model_id, self.input_size(model_id), header) from exc
        except WorkerDied as exc:
            breaker.record_failure("worker died")
            self.metrics.fail(model_id)
            raise Refusal(500, "worker_died", f"Segmentation failed: model {model_id!r}: {exc}",
                          model=model_id) from exc
        return self._finish(model_id, outcome, job.enqueued_at, job.started_at)

    def _admit_upload(self, data: bytes, filename: str | None, model: str) -> tuple[tuple | None, str]:
        """The checks before any work, in the service's order: the upload's name (as served) or
        content and size (fixed), PIL's first look (as served), then the model: ``(header, model id)``."""
        settings = self.settings
        header = check_upload(data, filename, settings.allowed_extensions, settings.max_pixels,
                              settings.max_decoded_bytes)
        if settings.preset == "as_served":
            served_open(data)
        return header, self.model_id(model)

    def _infer(self, model_id: str, data: bytes, options: dict, token, extra: dict, keys) -> Outcome:
        """Run one request in this worker thread, or in the thread's worker process."""
        worker = current_worker()
        if worker is not None:
            return worker.run(model_id, data, options, token, extra, keys)
        return run_pipeline(self.pipelines[model_id], data, options, token, extra, keys)

    def _finish(self, model_id: str, outcome: Outcome, enqueued_at: float,
                started_at: float | None = None) -> Outcome:
        """A finished run's Outcome, or the Refusal its failure maps to (+ breaker, metrics, monitor)."""
        now = time.monotonic()
        start = started_at if started_at is not None else enqueued_at
        fixed = self.settings.preset == "fixed"
        if outcome.error is not None:
            refusal = stage_refusal(outcome.error, outcome.stage, model_id, self.settings.preset, now - start)
            if refusal.status >= 500 and refusal.status != 504:
                self.breakers[model_id].record_failure(f"{outcome.stage}: {type(outcome.error).__name__}")
                self.metrics.fail(model_id)
            if fixed:
                self.monitor.record(model_id, now - start, False, refusal.message)
            raise refusal
        self.breakers[model_id].record_success()
        self.metrics.observe_inference(now - start, start - enqueued_at)
        if fixed:
            self.monitor.record(model_id, now - start, True)
        return outcome
