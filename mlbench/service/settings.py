"""The service's settings: one frozen dataclass, with ``fixed`` defaults and ``as_served``.

``ServiceSettings()`` is the careful reference service (bounded queue, timeouts, breaker,
size limits, inference off the event loop). ``ServiceSettings.as_served()`` reproduces
the historic service: the ``as_served`` pipeline preset, the extension allow-list that
forgot ``.tif``, the async route that ran the forward on the event loop, and none of
the queue, breaker or size limits it claimed to have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mlbench.errors import OptionsError
from mlbench.pipeline.options import PRESET_NAMES

__all__ = ["ServiceSettings", "SERVICE_MODEL_IDS", "AS_SERVED_EXTENSIONS", "SERVED_BATCH_SIZES"]

SERVICE_MODEL_IDS = ("hrnet", "resunet_small", "resunet_advanced")
"""The ids the real service exposes (``resunet_*`` are aliases of the registry names)."""
AS_SERVED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tiff", ".bmp")
"""The historic allow-list, checked on the file name only: ``.tiff`` passes, ``.tif`` does not."""
SERVED_BATCH_SIZES: dict[str, dict[str, float]] = {
    "hrnet": {"optimal_batch_size": 12, "max_safe_batch_size": 16, "expected_throughput": 17.79},
    "resunet_small": {"optimal_batch_size": 3, "max_safe_batch_size": 16, "expected_throughput": 6.55},
    "resunet_advanced": {"optimal_batch_size": 1, "max_safe_batch_size": 1, "expected_throughput": 2.34},
}
"""The service's ``config/batch_sizes.json`` (measured on an RTX A5000): what ``/api/v1/models``
reports and ``max_safe_batch_size`` caps ``batch-segment`` at (400 above it)."""


@dataclass(frozen=True)
class ServiceSettings:
    """Every knob of the reference service.

    Attributes
    ----------
    models : mapping id -> nn.Module or zero-argument factory, optional
        The served models. None loads, under the service ids ``hrnet``, ``resunet_small``
        and ``resunet_advanced``, the checkpoints of ``weights_dir`` or else the bundled small
        models (:func:`mlbench.load_model`).
    weights_dir : a folder laid out like the service's ``weights/``: ``<id>_best_model.pth``
        for each id (its training dicts load safely, at the widths their tensors say, with the
        service's 1024 px input). Ids without a file are not served; no file at all is an error.
    default_model : the ``model`` form field's default (the service used ``hrnet``).
    preset : pipeline preset, ``"fixed"`` or ``"as_served"``.
    options : extra pipeline options for every request (e.g. ``{"input_size": 128}``).
    executor : ``"thread"`` runs inference in the worker threads of this process (fast to
        start; what tests and notebooks use); ``"process"`` gives each worker a child
        process that loads the models once and can be killed when a cancelled run does
        not stop (measured on 2 busy cores: the first worker 5-15 s, as a fork server
        imports torch and mlbench once; each later or replacement worker about 0.5 s).
    workers : inference workers (each model still runs one forward at a time).
    worker_nice : how much lower the workers' CPU priority is than the event loop's
        (Linux nice increment per thread; 0 keeps it equal). On a shared machine a
        niced worker also loses the CPU to every other process: bursts took 4x longer.
    worker_threads : torch threads in each worker process (default cores // workers).
    worker_memory_bytes : with ``executor="process"``, the address space a worker process may add
        after loading and warming its models (``RLIMIT_AS``, :func:`mlbench.isolation.limit_address_space`);
        a request past it fails with 500 ``out_of_memory`` and the worker goes on. Default 4 GiB
        (``max_decoded_bytes`` bounds a request's pre-processing at about 0.7 GB); None: no limit.
    kill_grace_s : with ``executor="process"``, seconds a cancelled run may take to stop
        before its worker process is killed and re-started.
    freeze_gc : at start-up, collect garbage once and ``gc.freeze()`` the heap so no full
        collection of it (0.2-0.5 s holding the GIL, measured) lands in the middle of a
        burst. Process-wide: objects alive at start-up are never collected afterwards, so it is
        off by default (a notebook or test process hosts the app) and on in ``mlbench serve``
        and ``bench/service_load.py``, where the process is the service's own.
    queue_size : most requests waiting for a worker; more answer 429.
    max_wait_s : most seconds a request waits for a worker; longer answers 503.
    timeout_s : per-request inference timeout; longer answers 504 and the run is cancelled.
    high_water : queue depth at or above which ``/readyz`` reports not ready.
    breaker_failures, breaker_cooldown_s : consecutive failures that open a model's
        breaker (0 disables it) and how long it stays open.
    max_body_bytes : request body limit (413), None for no limit.
    max_pixels : decoded pixel limit checked from the header (413), None for no limit. The
        fixed pipeline's pre-processing peaks at about 36 bytes per pixel whatever the image's
        type (measured: +600 MB for a 4096x4096 8-bit PNG, grey or RGB), so this bounds a
        worker's memory per request: the default 4096x4096 about 0.7 GB.
    max_decoded_bytes : limit on the decoded image, pixels x channels x bytes per sample, read
        from the header before decoding (413), None for no limit. Decoding peaks at about three
        times this (float64 and 16-bit data, many channels); the default 64 MiB is an 8-bit RGB
        image of 22 megapixels, a 16-bit RGB one of 11, a float64 RGB one of 2.8.
    body_timeout_s : seconds a request body may go without a byte (408, connection closed), and
        the allowance of the rate rule below; None waits for ever (the historic behaviour).
    min_upload_rate : bytes per second a body must average: it must be complete within
        ``body_timeout_s + size / min_upload_rate`` seconds of its headers, else 408. None: no
        rate rule. The defaults give a 20 MB upload 410 s; a client sending one byte a second
        is cut after ``body_timeout_s``.
    header_timeout_s : seconds a connection has to send a complete request head (request line and
        headers), from its accept and again from the end of each response; then it is closed
        (:mod:`mlbench.service.connections`). None waits for ever (uvicorn's own behaviour).
    max_uploads : most request bodies being received at once; more answer 503 at once. Bodies are
        read whole before a segment request is admitted (a client that sends headers and no body
        holds no admission slot), so buffered bodies take at most ``max_uploads`` x the body
        limit of memory; a body that does not arrive frees its slot after ``body_timeout_s``.
    max_batch : most files in one ``batch-segment`` request.
    allowed_extensions : None sniffs the type from the content; a tuple reproduces the
        historic extension allow-list (400 for anything else).
    blocking_route : run the pipeline on the event loop, as the historic async route did.
    warmup : run one small forward per model before ``/readyz`` turns ready.
    drain_timeout_s : at shutdown, how long to wait for queued work to finish.
    clock : the breaker clock (seconds), injectable for deterministic tests.
    batch_sizes : id -> ``{optimal_batch_size, max_safe_batch_size, expected_throughput}``
        (default :data:`SERVED_BATCH_SIZES`); a model missing here gets the service's
        defaults 1, 1, 1.0 under ``as_served`` and ``max_batch`` as its limit under ``fixed``.
    metrics_export_dir : the folder ``POST /api/v1/monitoring/gpu/export-metrics`` writes
        into (created when missing); None switches the export off (501). A ``filepath`` that
        leaves the folder (absolute, ``..``, a symlink out) answers 400.
    """

    models: Mapping[str, Any] | None = None
    weights_dir: str | None = None
    default_model: str = "hrnet"
    preset: str = "fixed"
    options: Mapping[str, Any] = field(default_factory=dict)
    executor: str = "thread"
    workers: int = 1
    worker_nice: int = 0
    freeze_gc: bool = False
    worker_threads: int | None = None
    worker_memory_bytes: int | None = 4 * 1024 ** 3
    kill_grace_s: float = 1.0
    queue_size: int = 8
    max_wait_s: float = 10.0
    timeout_s: float = 60.0
    high_water: int | None = None
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    max_body_bytes: int | None = 20 * 1024 * 1024
    max_pixels: int | None = 4096 * 4096
    max_decoded_bytes: int | None = 64 * 1024 * 1024
    body_timeout_s: float | None = 10.0
    min_upload_rate: float | None = 50_000.0
    header_timeout_s: float | None = 10.0
    max_uploads: int = 32
    max_batch: int = 8
    allowed_extensions: tuple[str, ...] | None = None
    blocking_route: bool = False
    warmup: bool = True
    drain_timeout_s: float = 10.0
    clock: Callable[[], float] | None = None
    batch_sizes: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: dict(SERVED_BATCH_SIZES))
    metrics_export_dir: str | None = None

    def __post_init__(self) -> None:
        checks = {"workers": self.workers >= 1, "queue_size": self.queue_size >= 1, "max_wait_s": self.max_wait_s > 0,
                  "timeout_s": self.timeout_s > 0, "max_batch": self.max_batch >= 1,
                  "max_body_bytes": self.max_body_bytes is None or self.max_body_bytes > 0,
                  "max_pixels": self.max_pixels is None or self.max_pixels > 0,
                  "max_decoded_bytes": self.max_decoded_bytes is None or self.max_decoded_bytes > 0,
                  "body_timeout_s": self.body_timeout_s is None or self.body_timeout_s > 0,
                  "min_upload_rate": self.min_upload_rate is None or self.min_upload_rate > 0,
                  "header_timeout_s": self.header_timeout_s is None or self.header_timeout_s > 0,
                  "max_uploads": self.max_uploads >= 1,
                  "worker_nice": 0 <= self.worker_nice <= 19, "kill_grace_s": self.kill_grace_s > 0,
                  "worker_threads": self.worker_threads is None or self.worker_threads >= 1,
                  "worker_memory_bytes": self.worker_memory_bytes is None or self.worker_memory_bytes > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise OptionsError(f"service settings {values} are out of range; workers, queue_size, max_batch and "
                               "max_uploads must be >= 1, times, rates and limits > 0 (None disables a limit), "
                               "worker_nice 0..19")
        if self.executor not in ("thread", "process"):
            raise OptionsError(f"executor={self.executor!r} is unknown; expected 'thread' or 'process'")
        if self.preset not in PRESET_NAMES:
            raise OptionsError(f"preset={self.preset!r} is unknown; expected one of {PRESET_NAMES}")

    @property
    def high_water_mark(self) -> int:
        """Queue depth at which ``/readyz`` turns not ready (default 3/4 of the queue)."""
        return self.high_water if self.high_water is not None else max(1, (3 * self.queue_size) // 4)

    @classmethod
    def as_served(cls, **overrides: Any) -> "ServiceSettings":
        """The historic service: preset, allow-list, blocking route, no size limits, no breaker.

        The body deadline (``body_timeout_s``, ``min_upload_rate``) and ``max_uploads`` stay
        on: they change no recorded answer (every recorded request sent its body at once) and
        keep a replay of the historic service from being shut by idle connections.
        """
        served = dict(preset="as_served", allowed_extensions=AS_SERVED_EXTENSIONS, blocking_route=True,
                      breaker_failures=0, max_body_bytes=None, max_pixels=None, max_decoded_bytes=None,
                      queue_size=1_000_000,
                      max_wait_s=3600.0, warmup=False)
        return cls(**{**served, **overrides})

    def batch_config(self, model_id: str) -> dict[str, float]:
        """``{optimal_batch_size, max_safe_batch_size, expected_throughput}`` of one served model."""
        default = 1 if self.preset == "as_served" else self.max_batch
        config = {"optimal_batch_size": 1, "max_safe_batch_size": default, "expected_throughput": 1.0}
        return {**config, **dict(self.batch_sizes.get(model_id, {}))}

    def with_changes(self, **changes: Any) -> "ServiceSettings":
        """A copy with some settings changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (models listed by id, the clock left out)."""
        out = {k: v for k, v in asdict(replace(self, models=None, clock=None)).items() if k not in ("models", "clock")}
        out["models"] = sorted(self.models) if self.models is not None else list(SERVICE_MODEL_IDS)
        out["options"] = dict(self.options)
        out["batch_sizes"] = {k: dict(v) for k, v in self.batch_sizes.items()}
        return out


def weights_files(weights_dir: str | Path) -> dict[str, Path]:
    """The service's checkpoint files found in ``weights_dir``: id -> ``<id>_best_model.pth``.

    Raises
    ------
    OptionsError
        When the folder does not exist or holds none of the three files.
    """
    folder = Path(weights_dir)
    if not folder.is_dir():
        raise OptionsError(f"weights_dir {str(weights_dir)!r} is not a folder (absolute path {folder.absolute()}); "
                           "pass the folder that holds the service's <id>_best_model.pth files")
    found = {sid: folder / f"{sid}_best_model.pth" for sid in SERVICE_MODEL_IDS}
    found = {sid: path for sid, path in found.items() if path.is_file()}
    if not found:
        names = ", ".join(f"{sid}_best_model.pth" for sid in SERVICE_MODEL_IDS)
        present = sorted(p.name for p in folder.iterdir())[:8]
        raise OptionsError(f"weights_dir {str(folder)!r} holds none of the service's checkpoint files ({names}); "
                           f"it holds {present or 'nothing'}. Rename the files to these names, or load your own "
                           "with mb.load_model(path) and pass models={'hrnet': model}")
    return found


def resolve_models(settings: ServiceSettings) -> dict[str, torch.nn.Module]:
    """Instantiate the served models: injected modules/factories, a weights folder, or the bundled weights."""
    if settings.models is None:
        from mlbench.models.loading import load_model

        if settings.weights_dir is not None:
            return {sid: load_model(path, model=sid) for sid, path in weights_files(settings.weights_dir).items()}
        return {sid: load_model(sid) for sid in SERVICE_MODEL_IDS}
    models = {}
    for sid, source in settings.models.items():
        model = source if isinstance(source, torch.nn.Module) else source()
        if not isinstance(model, torch.nn.Module):
            raise OptionsError(f"service model {sid!r} must be an nn.Module or a factory returning one, "
                               f"got {type(model).__name__}")
        models[sid] = model.eval()
    return models
