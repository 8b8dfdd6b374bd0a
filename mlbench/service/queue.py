"""A bounded queue of inference jobs served by worker threads, with stoppable runs.

Each worker thread may own a worker object (``make_worker``), e.g. the worker process of
``executor="process"`` (:mod:`mlbench.service.work`), which it asks to recover between jobs.

The event loop never runs a model: a request becomes a :class:`Job`, waits at most
``max_wait_s`` for a worker (else 503), then at most ``timeout_s`` for its result (else
504). A timed-out job is *cancelled*, not forgotten: its :class:`CancelToken` is checked
between pipeline stages and before every layer of the model (forward pre-hooks
installed by :func:`install_cancel_hooks`), so the forward stops at the next layer and
the model is released. Until it has stopped the job counts as a *zombie* in
``/metrics`` and its model reads as busy, so nothing holds the model silently.
"""

from __future__ import annotations

import asyncio
import os
import queue as _queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mlbench.errors import MlbenchError

__all__ = ["CancelToken", "InferenceCancelled", "Job", "WorkerPool", "QueueFull", "QueueWaitExpired",
           "InferenceTimeout", "install_cancel_hooks", "set_current_token", "current_worker", "lower_priority"]

_local = threading.local()


class InferenceCancelled(MlbenchError, RuntimeError):
    """Raised inside a forward pass whose request has timed out (the run stops there)."""


class QueueFull(MlbenchError, RuntimeError):
    """The queue holds ``queue_size`` jobs already (the service answers 429)."""


class QueueWaitExpired(MlbenchError, TimeoutError):
    """No worker picked the job up within ``max_wait_s`` (the service answers 503)."""


class InferenceTimeout(MlbenchError, TimeoutError):
    """The job started but did not finish within ``timeout_s`` (the service answers 504)."""


class CancelToken:
    """A flag a worker checks between stages and layers; set when the request gave up.

    ``event`` may be a ``multiprocessing`` Event, so a worker process sees the cancel too.
    """

    def __init__(self, event: Any = None) -> None:
        self._event = event if event is not None else threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, where: str = "") -> None:
        """Raise :class:`InferenceCancelled` if cancelled."""
        if self._event.is_set():
            raise InferenceCancelled(f"inference cancelled after its request timed out{' at ' + where if where else ''}")


def _cancel_pre_hook(module: torch.nn.Module, args: Any) -> None:
    token = getattr(_local, "token", None)
    if token is not None and token.cancelled:
        token.check(type(module).__name__)


def set_current_token(token: CancelToken | None) -> None:
    """The token the layer hooks of this thread check (None: the hooks do nothing)."""
    _local.token = token


def current_worker() -> Any:
    """The per-worker object (e.g. its worker process) of the pool thread running this job."""
    return getattr(_local, "worker", None)


def install_cancel_hooks(model: torch.nn.Module) -> list:
    """Add a forward pre-hook to every submodule that stops a cancelled run; returns the handles.

    Outside a worker (no current token) the hook does nothing, so the model behaves as before.
    Remove the hooks with ``for h in handles: h.remove()``.
    """
    return [module.register_forward_pre_hook(_cancel_pre_hook) for module in model.modules()]


@dataclass(eq=False)
class Job:
    """One request's work: ``work(token)`` runs in a worker thread holding ``lock``."""

    model_id: str
    work: Callable[[CancelToken], Any]
    lock: threading.Lock
    token: CancelToken = field(default_factory=CancelToken)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    state: str = "queued"  # queued -> running -> done, or queued -> abandoned
    started: Future = field(default_factory=Future)
    result: Future = field(default_factory=Future)
    _state_lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, target: str, expected: str) -> bool:
        """Atomically move from ``expected`` to ``target``; False when someone moved it first."""
        with self._state_lock:
            if self.state != expected:
                return False
            self.state = target
            return True

    @property
    def zombie(self) -> bool:
        """Cancelled but still running: the model is held by work nobody waits for."""
        return self.token.cancelled and self.state == "running"


class WorkerPool:
    """``workers`` threads taking jobs from a queue of at most ``queue_size`` jobs."""

    def __init__(self, workers: int, queue_size: int, nice: int = 0, make_worker: Callable[[], Any] | None = None) -> None:
        self.workers, self.queue_size, self.nice, self.make_worker = workers, queue_size, nice, make_worker
        self.worker_objects: list = []
        self._queue: _queue.Queue[Job | None] = _queue.Queue()
        self._threads: list[threading.Thread] = []
        self._waiting = self._busy = 0
        self._count_lock = threading.Lock()
        self.running: set[Job] = set()
        self.stopped_after_cancel: list[float] = []

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker (not counting running ones)."""
        return self._waiting

    @property
    def zombies(self) -> int:
        return sum(job.zombie for job in list(self.running))

    def start(self) -> None:
        """Start the worker threads (first making each one's worker object, e.g. its process)."""
        if self._threads:
            return
        if self.make_worker is not None and not self.worker_objects:
            self.worker_objects = [self.make_worker() for _ in range(self.workers)]
        for i in range(self.workers):
            worker = self.worker_objects[i] if self.worker_objects else None
            thread = threading.Thread(target=self._loop, args=(worker,), name=f"mlbench-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float) -> bool:
        """Let queued jobs finish (up to ``timeout_s``), then end the workers; True if all ended."""
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = any(t.is_alive() for t in self._threads)
        for worker in self.worker_objects if alive else []:  # a thread stuck in a job: end its process too
            worker.stop(1.0)
        self._threads, self.worker_objects = [], []  # dropped, so their pipes and semaphores are freed
        return not alive

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises :class:`QueueFull` when ``queue_size`` jobs already wait."""
        with self._count_lock:  # an idle worker about to take a job is a free place, not a queue slot
            if self._waiting + self._busy >= self.queue_size + self.workers:
                raise QueueFull(f"the queue already holds {self._waiting} of {self.queue_size} requests "
                                f"({self._busy} of {self.workers} worker(s) busy)")
            self._waiting += 1
        self._queue.put(job)
        return job

    def _loop(self, worker: Any = None) -> None:
        lower_priority(self.nice)
        _local.worker = worker
        while True:
            job = self._queue.get()
            if job is None:
                if worker is not None:
                    worker.stop()
                return
            with self._count_lock:
                self._waiting -= 1
                self._busy += 1
            try:
                if job.state == "queued":
                    self._run(job)
                if worker is not None:
                    _recover(worker)
            finally:
                with self._count_lock:
                    self._busy -= 1

    def _acquire(self, job: Job) -> bool:
        """Wait for the model's lock (a zombie may hold it) unless the request gives up."""
        while not job.lock.acquire(timeout=0.02):
            if job.state != "queued":
                return False
        if job.claim("running", "queued"):
            return True
        job.lock.release()
        return False

    def _run(self, job: Job) -> None:
        if not self._acquire(job):
            return
        job.started_at = time.monotonic()
        self.running.add(job)
        job.started.set_result(job.started_at)
        set_current_token(job.token)
        try:
            job.result.set_result(job.work(job.token))
        except BaseException as exc:  # handed to the waiting request
            job.result.set_exception(exc)
        finally:
            set_current_token(None)
            job.finished_at = time.monotonic()
            if job.token.cancelled:
                self.stopped_after_cancel.append(job.finished_at - job.started_at)
            job.state = "done"
            self.running.discard(job)
            job.lock.release()

    async def run(self, job: Job, max_wait_s: float, timeout_s: float) -> Any:
        """Submit ``job`` and await its result within the two limits (raises on either)."""
        self.submit(job)
        started = asyncio.wrap_future(job.started)
        await asyncio.wait({started}, timeout=max_wait_s)
        if not started.done() and job.claim("abandoned", "queued"):
            raise QueueWaitExpired(f"no worker was free within {max_wait_s:g} s")
        await started
        result = asyncio.wrap_future(job.result)
        await asyncio.wait({result}, timeout=timeout_s)
        if not result.done():
            job.token.cancel()
            result.add_done_callback(_consume)
            raise InferenceTimeout(f"inference did not finish within {timeout_s:g} s")
        return result.result()


def _recover(worker: Any) -> None:
    """Let the worker replace a killed or dead process between jobs (a failure waits for the next job)."""
    try:
        worker.recover()
    except MlbenchError:  # the next run() tries again and reports it to its request
        pass


def lower_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (Linux schedules threads, so the event loop
    thread keeps its priority and wins the CPU over the workers); a no-op elsewhere."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:  # not permitted here: keep the default priority
            pass


def _consume(future: asyncio.Future) -> None:
    """Read a late result of a cancelled job so asyncio does not warn about it."""
    if not future.cancelled():
        future.exception()
