"""The worker side of :func:`mlbench.sweep`: one task in, one row out, and the executors.

:func:`run_task` runs in whatever process the executor chose; it never raises (failures,
timeouts and bad ground truth become the row's ``status`` and ``error``). Each process keeps
its models in :data:`_MODELS`, so a worker loads a model once, not once per image.
A process pool whose worker dies (a native decoder segfault) is recreated and the tasks that
were in flight are re-run one at a time in a fresh single process, so the crash is recorded
against the image that caused it and only that one.

Workers die with the sweep. A ``ProcessPoolExecutor``'s workers outlive a parent killed with
``kill -9`` (each waits on a queue whose other end it holds itself), about 300 MB each once torch
is loaded. :func:`process_pool` (used by ``mlbench sweep --executor processes[:N]`` and for the
re-runs of crashed tasks) starts its workers with :func:`die_with_parent`: on Linux,
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes, so the kernel kills the worker the moment the
parent goes; and everywhere a daemon thread that checks every half second whether the worker's
parent changed (it was re-parented: its parent died) and then ends the worker with ``os._exit``.
The kernel's signal fires when the *thread* that started the worker ends: mlbench starts pools
from the thread that runs the sweep and shuts them down before it returns; a pool kept and used
from another thread has the watchdog only. Pass ``initializer=die_with_parent`` to a pool of
your own for the same.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from mlbench.errors import MlbenchError, OptionsError
from mlbench.isolation import die_with_parent

__all__ = ["SweepTask", "SweepTimeout", "run_task", "run_image", "run_tasks", "sweep_executor", "CrashIf", "process_pool",
           "die_with_parent"]

_MODELS: dict[tuple[str, str, str], Any] = {}


class SweepTimeout(MlbenchError, TimeoutError):
    """A task ran longer than the sweep's ``timeout``."""


@dataclass(frozen=True)
class SweepTask:
    """One (image, model, preset) cell of a sweep, small and picklable."""

    key: str
    path: str
    name: str
    image_sha: str
    model: str
    weights: str
    weights_sha: str
    preset: str
    options: dict = field(default_factory=dict)
    truth: str | None = None
    timeout: float | None = None
    hook: Callable[["SweepTask"], None] | None = None
    source: str = ""
    """What the worker loads when not ``model`` itself: a checkpoint file or a bundled name."""
    card: dict = field(default_factory=dict)
    """Card fields the user gave, applied when the worker loads the model."""

    def base_row(self) -> dict[str, Any]:
        """The identifying columns every row starts with."""
        return {"key": self.key, "image": self.name, "path": self.path, "image_sha": self.image_sha[:16],
                "model": self.model, "weights_sha": self.weights_sha[:16], "preset": self.preset,
                "options": json.dumps(self.options, sort_keys=True)}


@dataclass(frozen=True)
class CrashIf:
    """Fault injection for sweeps: kill the worker when the image name contains ``marker``.

    ``how="exit"`` calls ``os._exit(70)``; ``how="segfault"`` dereferences NULL through ctypes,
    which is what a crashing native decoder does. Pass as ``mb.sweep(..., hook=CrashIf("crash"))``.
    """

    marker: str
    how: str = "exit"

    def __call__(self, task: SweepTask) -> None:
        if self.marker not in task.name:
            return
        if self.how == "segfault":
            import ctypes

            ctypes.string_at(0)
        os._exit(70)


def _model(task: SweepTask):
    """The task's model: a trained model without card fields from the shared cache (reloaded when its
    weights file changes, :func:`mlbench.models.loading.shared_model`); any other from this process's
    cache, loaded on first use."""
    if task.weights == "trained" and not task.card:
        from mlbench.models.loading import shared_model

        return shared_model(task.source or task.model)
    key = (task.source or task.model, task.weights, repr(sorted(task.card.items())))
    if key not in _MODELS:
        from mlbench.models import build_model
        from mlbench.models.cards import ModelCard
        from mlbench.models.loading import load_model

        user = ModelCard.from_dict(task.card) if task.card else None
        _MODELS[key] = load_model(task.source or task.model, card=user) if task.weights == "trained" \
            else build_model(task.model, "small").eval()
    return _MODELS[key]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _alarm(seconds: float | None) -> bool:
    """Arm SIGALRM when possible (main thread of a Unix process); True when armed."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return False

    def expire(signum, frame):
        raise SweepTimeout(f"task ran longer than timeout={seconds} s; raise the timeout or skip this image")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    return True


def _error_columns(exc: BaseException, status: str, stage: str | None) -> dict[str, Any]:
    from mlbench.failures import triage

    first = (str(exc).strip().splitlines() or [""])[0]
    return {"status": status, "stage": stage, "error_type": type(exc).__name__, "error": first[:300],
            "failure_class": "queue_timeout" if status == "timeout" else triage(exc, casebook=False).failure_class}


def _metrics(task: SweepTask, mask) -> dict[str, Any]:
    """Pixel and object scores against the task's ground truth (empty without one)."""
    if task.truth is None:
        return {}
    from mlbench.image.read import read_image
    from mlbench.metrics import match_objects, pixel_scores, to_labels

    try:
        truth = to_labels(read_image(task.truth)[0])
        pixel, objects = pixel_scores(truth > 0, mask), match_objects(truth, mask > 0, table=False)
    except MlbenchError as exc:
        return {"metrics_error": str(exc)[:300]}
    return {"iou": round(pixel.iou, 4), "dice": round(pixel.dice, 4), "precision": round(objects.precision, 4),
            "recall": round(objects.recall, 4), "f1": round(objects.f1, 4), "pq": round(objects.panoptic_quality, 4),
            "n_true": objects.n_true, "n_pred": objects.n_pred}


def _image_columns(path: str) -> dict[str, Any]:
    from mlbench.checks.image import check_image

    report = check_image(path)
    return {"problems": ",".join(p.code for p in report.problems), "shape": "x".join(map(str, report.shape)),
            "bit_depth": report.bit_depth}


def _pipeline_columns(task: SweepTask) -> dict[str, Any]:
    """Run the pipeline; columns for status, per-stage seconds, polygons and metrics."""
    from mlbench.pipeline.run import Pipeline

    run = Pipeline(_model(task), preset=task.preset, **task.options).start(task.path).run()
    cols = {f"t_{n}": round(r.seconds, 4) for n, r in run.records.items() if r.seconds is not None}
    if run.failed:
        return {**cols, **_error_columns(run.error, "failed", run.failed_stage)}
    mask = run.output("postprocess").mask
    return {**cols, "status": "ok", "n_polygons": len(run.output("polygons")), **_metrics(task, mask)}


def run_task(task: SweepTask, image_columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one sweep task in this process and return its row; never raises (except a crash).

    ``image_columns`` are the image report's columns when already computed for this image.
    """
    import torch

    torch.set_num_threads(1)
    image_columns = image_columns if image_columns is not None else _image_columns(task.path)
    row, start, rss = {**task.base_row(), **image_columns}, time.perf_counter(), _rss_mb()
    armed = _alarm(task.timeout)
    try:
        if task.hook is not None:
            task.hook(task)
        row.update(_pipeline_columns(task))
    except SweepTimeout as exc:
        row.update(_error_columns(exc, "timeout", None))
    except Exception as exc:  # a model that does not load, a hook that raises: record, never stop the sweep
        row.update(_error_columns(exc, "failed", "load"))
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
    row.update({"t_total": round(time.perf_counter() - start, 4), "rss_delta_mb": round(_rss_mb() - rss, 1),
                "worker_peak_rss_mb": round(_peak_rss_mb(), 1), "worker": os.getpid()})
    return row


def run_image(tasks: list[SweepTask]) -> list[dict[str, Any]]:
    """Run the tasks of one image (every model and preset) in this process: one image check, one round trip."""
    columns = _image_columns(tasks[0].path)
    return [run_task(task, columns) for task in tasks]


def by_image(tasks: list[SweepTask]) -> list[list[SweepTask]]:
    """The tasks grouped by image, in first-seen order (a group is one unit of work for an executor)."""
    groups: dict[str, list[SweepTask]] = {}
    for task in tasks:
        groups.setdefault(task.path, []).append(task)
    return list(groups.values())


def _crashed_row(task: SweepTask, exc: BaseException) -> dict[str, Any]:
    row = {**task.base_row(), **_image_columns(task.path), "status": "crashed", "stage": None,
           "error_type": type(exc).__name__, "error": f"the worker process died running this task: {exc}"[:300],
           "failure_class": "unknown"}
    return row


def _isolated(task: SweepTask) -> dict[str, Any]:
    """Re-run a suspect alone in a fresh process: its own row, or 'crashed' if it kills that one too."""
    with process_pool(1) as single:
        try:
            return single.submit(run_task, task).result()
        except BrokenProcessPool as exc:
            return _crashed_row(task, exc)


def process_pool(workers: int = 2, mp_context=None) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes that die with this one (:func:`die_with_parent`),
    even when it is killed with ``kill -9``.

    Raises
    ------
    OptionsError
        When ``workers`` is not a positive integer.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OptionsError(f"process_pool(workers={workers!r}): the number of worker processes is a positive integer, "
                           "e.g. 2 (processes:2 on the command line)")
    import multiprocessing

    context = mp_context or multiprocessing.get_context()
    direct = context.get_start_method() in ("fork", "spawn")  # else the workers' parent is a fork server
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=die_with_parent,
                               initargs=(os.getpid() if direct else None,))


def _renew(executor: ProcessPoolExecutor) -> ProcessPoolExecutor:
    """A fresh pool like a broken one (same size, start method and initializer)."""
    return ProcessPoolExecutor(max_workers=getattr(executor, "_max_workers", 2),
                               mp_context=getattr(executor, "_mp_context", None),
                               initializer=getattr(executor, "_initializer", None),
                               initargs=getattr(executor, "_initargs", ()))


def _window(executor: Executor) -> int:
    """How many images to keep in flight: two per worker, few enough that a crash has few suspects."""
    workers = getattr(executor, "_max_workers", None)
    client = getattr(executor, "client", None)
    if workers is None and client is not None:  # Dask: the cluster's threads, as the scheduler reports them
        try:
            workers = sum(client.nthreads().values())
        except Exception:  # a client that lost its scheduler: fall back to this machine's size
            workers = None
    return 2 * int(workers or os.cpu_count() or 1)


def _collect(done: Iterable[Future], pending: dict[Future, list[SweepTask]],
             emit: Callable[[dict], None]) -> tuple[list[SweepTask], list[SweepTask]]:
    """Emit the rows of finished futures.

    Returns the tasks of a process pool that broke under them (the pool is dead) and the
    tasks whose Dask worker kept dying (``KilledWorker``; the cluster lives on).
    """
    broken, killed = [], []
    for future in done:
        group = pending.pop(future)
        try:
            rows = future.result()
        except BrokenProcessPool:
            broken += group
            continue
        except Exception as exc:
            if type(exc).__name__ not in ("KilledWorker", "CancelledError"):
                raise
            killed += group
            continue
        for row in rows:
            emit(row)
    return broken, killed


def run_tasks(tasks: list[SweepTask], executor: Executor | None, emit: Callable[[dict], None]) -> None:
    """Run every task (serially when ``executor`` is None) and pass each row to ``emit`` as it ends.

    The tasks of one image travel together (:func:`run_image`: one image check and one round
    trip for all its models). A broken process pool is replaced (the replacement is shut down
    at the end; the caller's executor stays broken) and the tasks in flight when it broke, or
    whose Dask worker was killed, are re-run one by one in a fresh process each, so a crash
    is recorded against the image and model that caused it.
    """
    groups = by_image(tasks)
    if executor is None:
        import torch

        threads = torch.get_num_threads()  # run_task uses one thread, like each worker; restore the caller's
        try:
            for group in groups:
                for row in run_image(group):
                    emit(row)
        finally:
            torch.set_num_threads(threads)
        return
    queue, pending, suspects, own, window = list(reversed(groups)), {}, [], [], _window(executor)
    try:
        while queue or pending:
            while queue and len(pending) < window:
                group = queue.pop()
                pending[executor.submit(run_image, group)] = group
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken, killed = _collect(done, pending, emit)
            suspects += killed
            if broken:
                suspects += broken + [task for group in pending.values() for task in group]
                pending.clear()
                if isinstance(executor, ProcessPoolExecutor):
                    executor = _renew(executor)
                    own.append(executor)
    finally:
        for pool in own:
            pool.shutdown(wait=True)
    for task in suspects:
        emit(_isolated(task))


# Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers. Setting any such variable turns
# off glibc's adaptive mmap threshold, so every activation tensor of a CPU forward is mmap'ed, page-
# faulted and unmapped again: measured 2.8x slower forwards (250 vs 89 ms per task). The local
# cluster's workers get thresholds large enough that activations stay on the heap.
WORKER_ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}


def sweep_executor(where: str = "local", *, n_workers: int = 2, threads_per_worker: int = 1) -> Executor:
    """A Dask ``distributed`` executor for :func:`mlbench.sweep` (extra ``mlbench[dask]``), or a process pool.

    Parameters
    ----------
    where : "local" starts a ``LocalCluster`` of ``n_workers`` processes on this machine;
        "processes" or "processes:N" gives :func:`process_pool` (``n_workers`` or N processes, no
        Dask needed); any other value is a scheduler address (``tcp://host:8786``) of a running
        cluster, e.g. one started by ``dask_jobqueue.SLURMCluster`` (pass ``cluster.scheduler_address``).
    n_workers, threads_per_worker : size of the local cluster (ignored for an address).

    Returns
    -------
    Executor
        ``client.get_executor()``; ``executor.client`` is the Dask client (close it when done). For
        "processes": a ``ProcessPoolExecutor`` (shut it down when done).

    Raises
    ------
    MlbenchError
        When ``distributed`` is not installed.
    OptionsError
        For "processes:N" whose N is not a positive integer.
    """
    if where.startswith("processes"):
        count = where.partition(":")[2]
        if count and not count.isdigit():
            raise OptionsError(f"executor {where!r}: expected 'processes' or 'processes:N' with N a positive number of "
                               "worker processes, e.g. 'processes:2'")
        return process_pool(int(count or n_workers))
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise MlbenchError("mb.sweep_executor needs Dask: pip install 'mlbench[dask]' (or pip install distributed); "
                           "without it use executor=None or a concurrent.futures.ProcessPoolExecutor") from exc
    if where == "local":
        import dask

        # before the workers start (Nanny(env=...) is applied after glibc has read its settings)
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ALLOCATOR_ENV.items()}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                   dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(where)
    executor = client.get_executor()
    executor.client = client
    return executor
