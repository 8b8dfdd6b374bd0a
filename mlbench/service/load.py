"""Bounded load bursts against a service on loopback: statuses, latency, queue depth, /health.

:func:`run_burst` sends ``n`` concurrent segment requests, samples ``/metrics`` queue
depth and ``/health`` latency while they run, and returns a :class:`BurstReport`. It
refuses any non-loopback URL and every request has a timeout, so a burst is bounded in
count and time. It runs its own event loop in a thread, so it works inside Jupyter too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.service.metrics import percentiles
from mlbench.service.runner import _check_loopback

__all__ = ["BurstReport", "run_burst", "depth_over_time"]


@dataclass(frozen=True, repr=False)
class BurstReport(ReportText):
    """What a burst saw. Times in seconds from the burst's start; latencies in seconds.

    Attributes
    ----------
    statuses : status code of each request, in send order (0 = no answer: client timeout).
    latencies : seconds until each request's answer, in send order.
    depth : ``(t, queue depth)`` samples from ``/metrics`` (none from an ``as_served`` service).
    health : ``(t, seconds)`` of each ``/health`` probe during the burst.
    retry_after : ``Retry-After`` values (seconds) of the refused requests.
    """

    statuses: tuple[int, ...]
    latencies: tuple[float, ...]
    depth: tuple[tuple[float, int], ...]
    health: tuple[tuple[float, float], ...]
    retry_after: tuple[float, ...]

    @property
    def answered(self) -> int:
        return sum(s != 0 for s in self.statuses)

    @property
    def counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.statuses).items()))

    def to_dict(self) -> dict:
        return {"requests": len(self.statuses), "answered": self.answered, "status_counts": self.counts,
                "latency_s": percentiles(self.latencies), "health_latency_s": percentiles([h for _, h in self.health]),
                "max_queue_depth": max((d for _, d in self.depth), default=0),
                "retry_after_s": sorted(set(self.retry_after))}

    def text(self) -> str:
        d = self.to_dict()
        fmt = lambda p: ", ".join(f"{k} {v * 1000:.0f} ms" if v is not None else f"{k} -" for k, v in p.items())  # noqa: E731
        return "\n".join([
            f"BurstReport: {d['answered']} of {d['requests']} requests answered, status counts {d['status_counts']}",
            f"  latency: {fmt(d['latency_s'])}",
            f"  /health during the burst ({len(self.health)} probes): {fmt(d['health_latency_s'])}",
            f"  max queue depth {d['max_queue_depth']}, Retry-After values {d['retry_after_s']}",
        ])


def _probe(url: str, stop: threading.Event, t0: float, sample_s: float, depth: list, health: list) -> None:
    """Sample /health latency and queue depth from a thread with its own plain client."""
    import httpx

    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get("/health")
            health.append((round(started - t0, 4), round(time.perf_counter() - started, 4)))
            metrics = client.get("/metrics", params={"format": "json"})
            if metrics.status_code == 200:  # the as_served service has no /metrics (405)
                depth.append((round(time.perf_counter() - t0, 4), int(metrics.json()["queue"]["depth"])))
            stop.wait(sample_s)


async def _burst(url: str, n: int, files: dict, form: dict, timeout_s: float) -> list[tuple]:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def one() -> tuple[int, float, float | None]:
            started = time.perf_counter()
            try:
                response = await client.post("/api/v1/segment", files=files, data=form)
            except httpx.TimeoutException:
                return 0, time.perf_counter() - started, None
            retry = response.headers.get("retry-after")
            return response.status_code, time.perf_counter() - started, float(retry) if retry else None

        return await asyncio.gather(*(one() for _ in range(n)))


def run_burst(url: str, image: bytes, n: int = 50, model: str | None = None, timeout_s: float = 60.0,
              sample_s: float = 0.02) -> BurstReport:
    """Send ``n`` concurrent ``POST /api/v1/segment`` of ``image`` to a loopback service.

    Raises
    ------
    OptionsError
        When ``url`` is not on a loopback address or ``n`` is outside 1..500.
    """
    _check_loopback(urlsplit(url).hostname or "")
    if not 1 <= n <= 500:
        raise OptionsError(f"n={n} requests is outside 1..500; bursts are bounded")
    form = {"model": model} if model else {}
    box: dict = {}
    depth: list = []
    health: list = []
    stop, t0 = threading.Event(), time.perf_counter()
    probe = threading.Thread(target=_probe, args=(url, stop, t0, sample_s, depth, health), daemon=True)
    probe.start()
    thread = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(
        _burst(url, n, {"file": ("burst.png", image)}, form, timeout_s))), daemon=True)
    thread.start()
    thread.join(timeout_s * 2 + 10)
    stop.set()
    probe.join(15)
    if "r" not in box:
        raise OptionsError(f"the burst did not finish within {timeout_s * 2 + 10:g} s; the service hangs")
    results = box["r"]
    return BurstReport(tuple(r[0] for r in results), tuple(round(r[1], 4) for r in results), tuple(depth),
                       tuple(health), tuple(r[2] for r in results if r[2] is not None))


def depth_over_time(report: BurstReport, step_s: float = 0.1) -> list[tuple[float, int]]:
    """Queue depth resampled on a ``step_s`` grid (max per bin), for a compact printout."""
    if not report.depth:
        return []
    times = np.array([t for t, _ in report.depth])
    values = np.array([d for _, d in report.depth])
    bins = np.floor(times / step_s).astype(int)
    return [(round(float(b) * step_s, 2), int(values[bins == b].max())) for b in np.unique(bins)]
