"""Memory timelines across pipeline stages and modules: ``record_memory``.

Inside ``with mb.record_memory(model) as timeline:`` every tensor created is counted by a
:class:`LiveTensorCounter` (device-agnostic, so it works on CPU), a row is written at every
module boundary and stage mark (live bytes, the peak since the previous row, CUDA allocated /
reserved / peak on a GPU), and a background thread samples the process RSS (and the device
memory from NVML when there is one). On exit every hook and the thread are gone.

>>> with mb.record_memory(model) as timeline:      # doctest: +SKIP
...     timeline.run(pipeline.start(image))           # one stage mark per pipeline stage
>>> timeline.peak, timeline.table, timeline.plot()    # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from mlbench.probes._hooks import check_module
from mlbench.probes.accounting import DISPATCH_AVAILABLE, LiveTensorCounter, MemoryBudget, ModuleStack
from mlbench.findings import ReportText, format_bytes

__all__ = ["MemoryPeak", "MemoryTimeline", "record_memory", "note", "limit_memory"]

_ACTIVE: ContextVar["MemoryTimeline | None"] = ContextVar("mlbench_memory_timeline", default=None)


def note(label: str) -> None:
    """Add a mark (e.g. an out-of-memory retry) to the timeline being recorded, if any."""
    timeline = _ACTIVE.get()
    if timeline is not None:
        timeline.mark(label)


def _cuda_numbers() -> dict[str, int]:
    """CUDA allocated / reserved / peak bytes, or {} on a machine without CUDA."""
    try:
        if not torch.cuda.is_available():
            return {}
        return {"cuda_allocated": torch.cuda.memory_allocated(), "cuda_reserved": torch.cuda.memory_reserved(),
                "cuda_peak": torch.cuda.max_memory_allocated()}
    except (RuntimeError, AssertionError, AttributeError):
        return {}


class _Sampler(threading.Thread):
    """Samples process RSS (psutil) and device memory (NVML) every ``interval`` seconds."""

    def __init__(self, interval: float, start: float) -> None:
        super().__init__(name="mlbench-memory-sampler", daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval, self.start_time = interval, start
        self.samples: list[tuple[float, int, int | None]] = []
        self.stop_event = threading.Event()
        self.nvml = _nvml_handle()

    def sample(self) -> None:
        used = None
        if self.nvml is not None:
            import pynvml

            used = int(pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used)
        self.samples.append((time.perf_counter() - self.start_time, self.process.memory_info().rss, used))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def _nvml_handle() -> Any:
    """The NVML handle of GPU 0, or None (no driver, no GPU, no pynvml)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # NVMLError_LibraryNotFound, ImportError, ...: no NVML here
        return None


@dataclass(frozen=True, repr=False)
class MemoryPeak(ReportText):
    """Where live tensor memory peaked: bytes, stage, module, seconds from the start."""

    bytes: int
    stage: str
    module: str
    seconds: float
    rss_growth_bytes: int

    def text(self) -> str:
        return (f"MemoryPeak({format_bytes(self.bytes)} of live tensors in stage {self.stage!r}, "
                f"module {self.module!r}; process RSS grew by {format_bytes(self.rss_growth_bytes)})")


class MemoryTimeline(ReportText):
    """One memory timeline; filled while the ``with`` block runs, read afterwards.

    Parameters
    ----------
    model : nn.Module, optional
        Hooked so that every module boundary becomes a row; its parameters and buffers are
        counted as a constant ``baseline_bytes``.
    interval : float
        Seconds between RSS / NVML samples.
    """

    def __init__(self, model: nn.Module | None = None, *, interval: float = 0.005) -> None:
        self.model = check_module(model) if model is not None else None
        self.interval = interval
        self.rows: list[dict[str, Any]] = []
        self.marks: list[tuple[float, str]] = []
        self.stages: list[tuple[str, float, float | None]] = []
        self.baseline_bytes = sum(t.numel() * t.element_size() for t in _state(self.model))
        self._stack = ModuleStack()
        self._stage = ""
        self._exit: ExitStack | None = None
        self._counter: LiveTensorCounter | None = None
        self._sampler: _Sampler | None = None
        self._start = 0.0
        self.recording = False

    # ---- recording -----------------------------------------------------------------
    def __enter__(self) -> "MemoryTimeline":
        self._start = time.perf_counter()
        self._counter = LiveTensorCounter(_state(self.model), where=self._where)
        self._sampler = _Sampler(self.interval, self._start)
        self._sampler.sample()
        with ExitStack() as stack:
            if self.model is not None:
                stack.enter_context(self._stack.track(self.model, self._enter, self._exit_module))
            if DISPATCH_AVAILABLE:
                stack.enter_context(self._counter)
            token = _ACTIVE.set(self)
            stack.callback(_ACTIVE.reset, token)
            self._sampler.start()
            stack.callback(self._stop_sampler)
            self._exit = stack.pop_all()
        self.recording = True
        self._row("start", "")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._row("end", "")
        finally:
            self.recording = False
            exit_stack, self._exit = self._exit, None
            if exit_stack is not None:
                exit_stack.close()

    def _stop_sampler(self) -> None:
        self._sampler.stop_event.set()
        self._sampler.join()
        self._sampler.sample()

    def _where(self) -> str:
        return f"{self._stage}|{self._stack.top()}"

    def _enter(self, path: str) -> None:
        self._row("enter", path)

    def _exit_module(self, path: str, output: Any) -> None:
        self._counter.count_outputs(output)
        self._row("exit", path)

    def _row(self, event: str, module: str) -> None:
        counter = self._counter
        self.rows.append({
            "seconds": time.perf_counter() - self._start, "event": event, "stage": self._stage, "module": module,
            "live_bytes": self.baseline_bytes + counter.current,
            "live_peak_bytes": self.baseline_bytes + counter.take_interval_peak(), **_cuda_numbers()})

    def mark(self, label: str) -> None:
        """Add a labelled row (shown on the plot), e.g. ``"OOM at tile 512: retry at 256"``."""
        if self.recording:
            self.marks.append((time.perf_counter() - self._start, label))
            self._row("mark", label)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Label everything inside the block as pipeline stage ``name``."""
        previous, self._stage = self._stage, name
        begin = time.perf_counter() - self._start
        self._row("stage start", name)
        try:
            yield
        finally:
            self._row("stage end", name)
            self.stages.append((name, begin, time.perf_counter() - self._start))
            self._stage = previous

    def run(self, run: Any) -> Any:
        """Step an :class:`mlbench.Run` to the end, one stage mark per stage; returns the run."""
        while run.next_stage is not None:
            with self.stage(run.next_stage):
                run.step()
        return run

    # ---- reading -------------------------------------------------------------------
    @property
    def table(self):
        """DataFrame, one row per module boundary / stage / mark: seconds, event, stage, module,
        live_bytes, live_peak_bytes (peak since the previous row), rss_bytes (latest sample) and,
        on a GPU, cuda_allocated / cuda_reserved / cuda_peak."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        rss = self.rss
        if len(frame) and len(rss):
            positions = rss["seconds"].searchsorted(frame["seconds"], side="right") - 1
            frame["rss_bytes"] = rss["rss_bytes"].to_numpy()[positions.clip(0)]
        return frame

    @property
    def rss(self):
        """DataFrame of the background samples: seconds, rss_bytes, nvml_used_bytes (None without NVML)."""
        import pandas as pd

        samples = self._sampler.samples if self._sampler is not None else []
        return pd.DataFrame(samples, columns=["seconds", "rss_bytes", "nvml_used_bytes"])

    @property
    def peak(self) -> MemoryPeak:
        """The highest live-tensor total, with the stage and module it happened in."""
        counter = self._counter
        if counter is None or not self.rows:
            return MemoryPeak(self.baseline_bytes, "", "", 0.0, 0)
        stage, _, module = counter.peak_where.partition("|")
        when = max(self.rows, key=lambda r: r["live_peak_bytes"])["seconds"]
        rss = self.rss["rss_bytes"]
        growth = int(rss.max() - rss.iloc[0]) if len(rss) else 0
        return MemoryPeak(self.baseline_bytes + counter.peak, stage, module, round(when, 3), growth)

    def to_dict(self) -> dict[str, Any]:
        """Peak, baseline and marks as a JSON-ready dict (the rows are in :attr:`table`)."""
        peak = self.peak
        return {"peak_bytes": peak.bytes, "peak_stage": peak.stage, "peak_module": peak.module,
                "baseline_bytes": self.baseline_bytes, "rss_growth_bytes": peak.rss_growth_bytes,
                "marks": [label for _, label in self.marks], "stages": [name for name, _, _ in self.stages]}

    def text(self) -> str:
        if not self.rows:
            return "MemoryTimeline(empty: use it as `with mb.record_memory(model) as timeline:`)"
        peak = self.peak
        lines = [f"MemoryTimeline({len(self.rows)} rows, parameters {format_bytes(self.baseline_bytes)})",
                 f"  peak of live tensors  {format_bytes(peak.bytes)} in stage {peak.stage or '-'!r}, "
                 f"module {peak.module!r}",
                 f"  process RSS growth    {format_bytes(peak.rss_growth_bytes)} (allocator, caches, non-torch arrays)"]
        cuda = [r["cuda_peak"] for r in self.rows if "cuda_peak" in r]
        lines.append(f"  CUDA peak allocated   {format_bytes(max(cuda))}" if cuda else "  CUDA                  not used")
        lines += [f"  mark: {label}" for _, label in self.marks]
        return "\n".join(lines)

    def plot(self, ax: Any = None) -> Any:
        """Draw live tensors, RSS growth and CUDA allocated over time, with stages shaded, marks
        as dashed lines and the peak annotated (see :func:`mlbench.probes.plotting.plot_timeline`).

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Draw into it; default a new Figure.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from mlbench.probes.plotting import plot_timeline

        return plot_timeline(self, ax)


def _state(model: nn.Module | None) -> list[torch.Tensor]:
    if model is None:
        return []
    return [*model.parameters(), *model.buffers()]


def record_memory(model: nn.Module | None = None, *, interval: float = 0.005) -> MemoryTimeline:
    """A context manager that records a :class:`MemoryTimeline`.

    Parameters
    ----------
    model : nn.Module, optional
        Hook its modules (one row per module boundary; the peak names the module).
    interval : float
        Seconds between process RSS (and NVML) samples.

    Examples
    --------
    >>> with mb.record_memory(model) as timeline:   # doctest: +SKIP
    ...     timeline.run(mb.Pipeline(model).start(image))
    >>> timeline.peak                                  # doctest: +SKIP
    """
    return MemoryTimeline(model, interval=interval)


def limit_memory(budget_bytes: int, model: nn.Module | None = None) -> MemoryBudget:
    """A context manager in which tensors created beyond ``budget_bytes`` raise
    ``torch.OutOfMemoryError``: a GPU of that size, simulated on any device.

    ``model``'s parameters and buffers are not counted (they are already resident).

    Raises
    ------
    OptionsError
        If ``budget_bytes`` is not a positive int.
    """
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes <= 0:
        from mlbench.errors import OptionsError

        raise OptionsError(f"budget_bytes must be a positive int, got {budget_bytes!r}; e.g. 64 * 1024**2.")
    return MemoryBudget(budget_bytes, _state(model))
