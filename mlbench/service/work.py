"""Where one request's inference runs: in the worker thread itself, or in a worker process.

:func:`run_pipeline` runs every stage of one request, checking the cancel token between
stages, and returns an :class:`Outcome` (the response body, or the failed stage and its
error): the same function runs in a worker thread (``executor="thread"``) and inside a
worker process (``executor="process"``).

A :class:`ProcessWorker` is one child process (forked from a fork server) that loads the
models once at start-up, warms them up, freezes its heap and then serves jobs over a pipe. A timed-out
job is first cancelled cooperatively (a shared event the child's layer hooks check); if
the child has not answered ``grace_s`` later (a single long operation, a hang in C code)
it is killed and a fresh child is started: the model is never held by work nobody waits
for. The request is answered at once; the pool thread starts a fresh child before it takes
the next job. Kills, deaths and re-spawn times are counted for ``/metrics``.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

from mlbench.errors import MlbenchError, OptionsError
from mlbench.service.queue import CancelToken, InferenceCancelled, install_cancel_hooks, lower_priority, set_current_token

__all__ = ["Outcome", "run_pipeline", "warm_up", "pickle_models", "ProcessWorker", "WorkerDied",
           "process_worker_factory", "freeze_heap"]

# forkserver: one clean server process imports torch and mlbench once (5-15 s here), then every
# worker, and every replacement of a killed one, is forked from it in a fraction of a second
# (a spawned worker paid the whole import again). Nothing is forked from the threaded server.
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["mlbench.service.work"])


class WorkerDied(MlbenchError, RuntimeError):
    """The worker process ended in the middle of a request (crash, out-of-memory kill)."""


@dataclass(frozen=True)
class Outcome:
    """What one request's run produced: the JSON ``body`` and its polygon count when it
    finished, else ``stage`` + ``error``."""

    body: bytes | None = None
    stage: str | None = None
    error: BaseException | None = None
    polygons: int = 0


def run_pipeline(pipeline, data: bytes, options: dict, token: CancelToken | None = None,
                 extra: dict | None = None, keys: tuple[str, ...] | None = None) -> Outcome:
    """Run every stage of ``pipeline`` on ``data``, checking ``token`` between stages.

    The response body (only ``keys`` of it when given, then the ``extra`` fields) is
    JSON-encoded here, in the worker: a large answer (1.8 MB of polygons took 130 ms to
    encode, measured) never holds the event loop.
    """
    from mlbench.pipeline.result import build_response

    run = pipeline.start(data).with_options(**options)
    while run.next_stage is not None:
        if token is not None:
            token.check(f"before stage {run.next_stage}")
        run.step()
    if run.failed:
        return Outcome(stage=run.failed_stage, error=run.error)
    response = build_response(run)
    body = {key: response[key] for key in keys} if keys is not None else response
    return Outcome(body=json.dumps({**body, **(extra or {})}).encode(), polygons=len(response["polygons"]))


def _portable(outcome: Outcome) -> Outcome:
    """The outcome with an error that survives pickling (else a RuntimeError carrying its text)."""
    try:
        pickle.loads(pickle.dumps(outcome.error))
        return outcome
    except Exception:  # an exception class that cannot cross the pipe
        error = RuntimeError(f"{type(outcome.error).__name__}: {outcome.error}")
        return Outcome(stage=outcome.stage, error=error)


def warm_up(pipelines: dict) -> dict[str, str]:
    """Run one small synthetic image through each pipeline: ``{id: 'ok' or 'failed at ...'}``."""
    import numpy as np

    from mlbench.samples.synthetic import make_spheroids

    image, _ = make_spheroids((64, 64), 2, np.random.default_rng(0))
    data = (image * 255).astype(np.uint8)
    report = {}
    for model_id, pipeline in pipelines.items():
        run = pipeline.start(data).with_options(input_size=64).run()
        report[model_id] = "ok" if run.done else f"failed at {run.failed_stage}: {run.error}"
    return report


def _child_main(conn, cancel, spec: dict) -> None:
    """The worker process: load, warm, freeze the heap, then serve jobs until told to stop."""
    import torch

    from mlbench.pipeline.run import Pipeline

    torch.set_num_threads(spec["threads"])
    lower_priority(spec["nice"])
    models = pickle.loads(spec["models"])
    pipelines = {mid: Pipeline(model.eval(), spec["preset"], **spec["options"]) for mid, model in models.items()}
    warm = warm_up(pipelines) if spec["warmup"] else {}
    for model in models.values():
        install_cancel_hooks(model)
    token = CancelToken(cancel)
    set_current_token(token)
    freeze_heap()
    if spec["memory"]:
        from mlbench.isolation import limit_address_space

        limit_address_space(spec["memory"])
    conn.send(("ready", os.getpid(), warm))
    while True:
        job = conn.recv()
        if job is None:
            return
        model_id, data, options, extra, keys = job
        conn.send(_portable(run_pipeline(pipelines[model_id], data, options, token, extra, keys)))


def pickle_models(models: dict) -> bytes:
    """The models as bytes for the worker processes; OptionsError when they cannot be pickled."""
    try:
        return pickle.dumps(models)
    except Exception as exc:  # lambdas, locks, local classes
        raise OptionsError(f"executor='process' sends the models to worker processes by pickling, and "
                           f"{sorted(models)} cannot be pickled ({type(exc).__name__}: {exc}); define model "
                           "classes at module level or use executor='thread'") from exc


class ProcessWorker:
    """One worker process holding its own copy of the models.

    Parameters
    ----------
    payload : the models (dict id -> nn.Module) from :func:`pickle_models`, loaded by every
        (re)started child.
    preset, options : the pipeline preset and options.
    threads : torch threads in the child (workers x threads should not exceed the cores).
    nice : how much lower the child's CPU priority is.
    warmup : run one small image through every model before reporting ready.
    memory_bytes : address space the child may add once ready (None: no limit).
    grace_s : after a cancel, how long the child may take to stop before it is killed.
    """

    def __init__(self, payload: bytes, preset: str, options: dict, threads: int = 1, nice: int = 0,
                 warmup: bool = True, grace_s: float = 1.0, start_timeout_s: float = 120.0,
                 memory_bytes: int | None = None) -> None:
        self.spec = {"models": payload, "preset": preset, "options": dict(options), "threads": threads,
                     "nice": nice, "warmup": warmup, "memory": memory_bytes}
        self.grace_s, self.start_timeout_s = grace_s, start_timeout_s
        self.kills = self.deaths = 0
        self.respawn_s: list[float] = []
        self.warm: dict[str, str] = {}
        self.process = self.conn = None
        self._spawn()

    def _spawn(self) -> None:
        parent, child = _CTX.Pipe()
        self.cancel = _CTX.Event()
        self.process = _CTX.Process(target=_child_main, args=(child, self.cancel, self.spec), daemon=True,
                                    name="mlbench-inference")
        self.process.start()
        child.close()
        self.conn = parent
        deadline = time.monotonic() + self.start_timeout_s
        while not parent.poll(0.05) and self.process.is_alive() and time.monotonic() < deadline:
            pass
        try:
            _, self.pid, self.warm = parent.recv() if parent.poll() else (None, None, None)
        except (EOFError, OSError):  # the child died before it was ready
            self.pid = None
        if self.pid is None:
            self.process.join(2)  # a child that failed is exiting: let it report its own exit code
            self.process.kill()
            self.process.join(5)
            raise WorkerDied(f"the worker process did not start (exit code {self.process.exitcode}, "
                             f"{self.start_timeout_s:g} s allowed); a script that starts the service needs an "
                             "`if __name__ == '__main__':` guard (worker processes import it); executor='thread' "
                             "shows the error in-process")

    def recover(self) -> None:
        """Start a fresh child if the last job killed or lost this one (the pool calls it between jobs)."""
        if self.process.is_alive():
            return
        started = time.monotonic()
        self.process.join(5)
        self.conn.close()
        self._spawn()
        self.respawn_s.append(round(time.monotonic() - started, 3))

    def run(self, model_id: str, data: bytes, options: dict, token: CancelToken, extra: dict | None = None,
            keys: tuple[str, ...] | None = None) -> Outcome:
        """Run one request in the child; cancel, then kill after ``grace_s``, when ``token`` is cancelled."""
        self.recover()
        self.cancel.clear()
        self.conn.send((model_id, data, options, extra, keys))
        cancelled_at = None
        while not self.conn.poll(0.02):
            if not self.process.is_alive():
                self._died()
            if token.cancelled and cancelled_at is None:
                cancelled_at = time.monotonic()
                self.cancel.set()
            elif cancelled_at is not None and time.monotonic() - cancelled_at > self.grace_s:
                self.process.kill()
                self.process.join(5)
                self.kills += 1
                raise InferenceCancelled(f"inference did not stop within {self.grace_s:g} s of its cancel; the "
                                         "worker process was killed (a fresh one starts before the next job)")
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # the child closed the pipe by dying
            self._died()

    def _died(self) -> None:
        self.process.join(5)
        self.deaths += 1
        raise WorkerDied(f"the worker process died during the request (exit code {self.process.exitcode}, e.g. a "
                         "crash or a kill for memory); a fresh one starts before the next job")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to end, then kill it if it does not within ``timeout_s``."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):  # the pipe is already closed
            pass
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.process.is_alive(), "killed_after_timeout": self.kills,
                "died": self.deaths, "respawn_s": list(self.respawn_s)}


def process_worker_factory(settings, payload: bytes):
    """Makes one :class:`ProcessWorker`; torch threads default to cores // workers."""
    threads = settings.worker_threads or max(1, (os.cpu_count() or 1) // settings.workers)

    def make() -> ProcessWorker:
        return ProcessWorker(payload, settings.preset, dict(settings.options), threads, settings.worker_nice,
                             settings.warmup, settings.kill_grace_s, memory_bytes=settings.worker_memory_bytes)

    return make


def freeze_heap() -> None:
    """Collect once, then move every live object to the permanent generation (``gc.freeze``).

    The start-up heap (torch, FastAPI, the models) holds millions of objects; without this,
    the first full collection came during the first burst and held the GIL for 0.5 s
    (measured), stalling ``/health``. Frozen objects are never scanned again.
    """
    gc.collect()
    gc.freeze()
