"""Counters and latency percentiles of the service, as JSON or Prometheus text.

Everything is bounded: latencies keep the last ``window`` values, counters are plain
integers keyed by a small fixed vocabulary (status codes, rejection reasons).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

__all__ = ["Metrics", "REJECTION_REASONS", "percentiles", "to_prometheus"]

REJECTION_REASONS = ("queue_full", "queue_wait", "timeout", "breaker_open", "body_too_large", "body_timeout",
                     "header_timeout", "uploads_full", "too_many_pixels", "too_many_decoded_bytes", "unsupported_type",
                     "extension_not_allowed", "draining", "validation")


def percentiles(values: Any, qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` in seconds (None when there are no values)."""
    array = np.asarray(list(values), dtype=float)
    if not array.size:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(v), 4) for q, v in zip(qs, np.percentile(array, qs))}


class Metrics:
    """Thread-safe request counters, rejections by reason and latency windows."""

    def __init__(self, window: int = 2000) -> None:
        self._lock = threading.Lock()
        self.status: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter({reason: 0 for reason in REJECTION_REASONS})
        self.failures: Counter[str] = Counter()
        self.latency: deque[float] = deque(maxlen=window)
        self.queue_wait: deque[float] = deque(maxlen=window)
        self.loop_lag: deque[float] = deque(maxlen=window)
        self.timeouts = 0
        self.completed = 0

    def observe_request(self, path: str, status: int) -> None:
        with self._lock:
            self.status[f"{path} {status}"] += 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1
            if reason == "timeout":
                self.timeouts += 1

    def observe_inference(self, seconds: float, waited: float) -> None:
        with self._lock:
            self.completed += 1
            self.latency.append(seconds)
            self.queue_wait.append(waited)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.append(max(0.0, seconds))

    def recent_median(self, n: int = 32) -> float | None:
        """Median of the last ``n`` inference latencies (cheap: called on every refusal)."""
        recent = sorted(list(self.latency)[-n:])
        return recent[len(recent) // 2] if recent else None

    def fail(self, model_id: str) -> None:
        with self._lock:
            self.failures[model_id] += 1

    def to_dict(self) -> dict[str, Any]:
        """Counters and percentiles (seconds) as plain JSON."""
        with self._lock:
            return {
                "requests": dict(sorted(self.status.items())),
                "rejections": dict(self.rejections),
                "failures": dict(self.failures),
                "completed": self.completed,
                "timeouts": self.timeouts,
                "latency_s": percentiles(self.latency),
                "queue_wait_s": percentiles(self.queue_wait),
                "event_loop_lag_s": {**percentiles(self.loop_lag), "max": round(max(self.loop_lag, default=0.0), 4)},
            }


def to_prometheus(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition of a ``/metrics`` JSON snapshot."""
    lines = [f"mlbench_queue_depth {snapshot['queue']['depth']}",
             f"mlbench_queue_capacity {snapshot['queue']['capacity']}",
             f"mlbench_zombie_inferences {snapshot['queue']['zombies']}",
             f"mlbench_inferences_completed_total {snapshot['completed']}",
             f"mlbench_inference_timeouts_total {snapshot['timeouts']}",
             f"mlbench_requests_admitted {snapshot['queue'].get('admitted', 0)}",
             f"mlbench_uploads_in_progress {snapshot['queue'].get('uploading', 0)}",
             f"mlbench_worker_processes_killed_total {snapshot['queue'].get('killed_after_timeout', 0)}"]
    for reason, count in snapshot["rejections"].items():
        lines.append(f'mlbench_rejections_total{{reason="{reason}"}} {count}')
    for key, count in snapshot["requests"].items():
        path, status = key.rsplit(" ", 1)
        lines.append(f'mlbench_requests_total{{path="{path}",status="{status}"}} {count}')
    for q, value in snapshot["latency_s"].items():
        if value is not None:
            lines.append(f'mlbench_inference_seconds{{quantile="0.{q[1:]}"}} {value}')
    for q, value in snapshot["event_loop_lag_s"].items():
        if value is not None and q != "max":
            lines.append(f'mlbench_event_loop_lag_seconds{{quantile="0.{q[1:]}"}} {value}')
    for model_id, info in snapshot["models"].items():
        states = {"closed": 0, "half_open": 1, "open": 2}
        lines.append(f'mlbench_breaker_state{{model="{model_id}"}} {states[info["breaker"]]}')
        lines.append(f'mlbench_model_busy{{model="{model_id}"}} {int(info["busy"])}')
    return "\n".join(lines) + "\n"
