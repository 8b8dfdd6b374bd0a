"""A small per-model circuit breaker: closed -> open -> half_open -> closed.

After ``failures`` consecutive failures the breaker opens and refuses calls for
``cooldown_s`` seconds (the service answers 503 with ``Retry-After`` = the remaining
cool-down); then it lets exactly one trial call through (half open): a success closes
it, a failure opens it again for a fresh cool-down. The clock is injectable so tests
and notebooks are deterministic. Thread-safe: workers record results from threads.

``pybreaker`` is not used because it never trips when it decorates an ``async def``
(see FACTS.md); this one is driven explicitly by the service, so sync or async does
not matter.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from mlbench.errors import OptionsError

__all__ = ["CircuitBreaker", "Transition", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Transition:
    """One state change: ``at`` is the breaker clock's time in seconds."""

    at: float
    source: str
    target: str
    reason: str

    def to_dict(self) -> dict:
        return {"at": round(self.at, 3), "from": self.source, "to": self.target, "reason": self.reason}


class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and a single half-open trial.

    Parameters
    ----------
    failures : int
        Consecutive failures that open the breaker; 0 disables it (always closed).
    cooldown_s : float
        Seconds the breaker stays open before it lets one trial through.
    clock : callable
        Returns the time in seconds (default ``time.monotonic``).
    name : str
        The model this breaker guards (for messages).
    """

    def __init__(self, failures: int = 5, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 name: str = "model") -> None:
        if failures < 0 or cooldown_s < 0:
            raise OptionsError(f"breaker failures={failures} and cooldown_s={cooldown_s} must be >= 0; "
                               "use failures=0 to disable the breaker")
        self.failures, self.cooldown_s, self.clock, self.name = int(failures), float(cooldown_s), clock, name
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.transitions: deque[Transition] = deque(maxlen=100)

    @property
    def enabled(self) -> bool:
        return self.failures > 0

    @property
    def state(self) -> str:
        """Current state; an open breaker whose cool-down ended reads as half_open."""
        with self._lock:
            self._refresh()
            return self._state

    def _move(self, target: str, reason: str) -> None:
        self.transitions.append(Transition(self.clock(), self._state, target, reason))
        self._state = target

    def _refresh(self) -> None:
        if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._move(HALF_OPEN, f"cool-down of {self.cooldown_s:g} s over")
            self._trial_in_flight = False

    def retry_after(self) -> float:
        """Seconds until the breaker lets a call through (0 when it does now)."""
        with self._lock:
            self._refresh()
            if self._state == OPEN:
                return max(0.0, self.cooldown_s - (self.clock() - self._opened_at))
            return self.cooldown_s if (self._state == HALF_OPEN and self._trial_in_flight) else 0.0

    def allow(self) -> bool:
        """Whether a call may go through now; in half_open only the first caller gets the trial."""
        if not self.enabled:
            return True
        with self._lock:
            self._refresh()
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def record_success(self) -> None:
        """A call succeeded: reset the failure count; a half-open trial closes the breaker."""
        with self._lock:
            self._consecutive = 0
            if self._state != CLOSED:
                self._move(CLOSED, "trial call succeeded")
            self._trial_in_flight = False

    def record_failure(self, reason: str = "failure") -> None:
        """A call failed: count it; open at the threshold, or re-open after a failed trial."""
        if not self.enabled:
            return
        with self._lock:
            self._consecutive += 1
            if self._state == HALF_OPEN:
                self._open(f"trial call failed ({reason})")
            elif self._state == CLOSED and self._consecutive >= self.failures:
                self._open(f"{self._consecutive} consecutive failures (last: {reason})")

    def _open(self, reason: str) -> None:
        self._move(OPEN, reason)
        self._opened_at = self.clock()
        self._trial_in_flight = False

    def release_trial(self) -> None:
        """Give back a half-open trial that never ran (e.g. the request was refused later)."""
        with self._lock:
            self._trial_in_flight = False

    def to_dict(self) -> dict:
        """State, consecutive failures, seconds until retry and the recent transitions."""
        state = self.state
        return {"state": state, "consecutive_failures": self._consecutive, "threshold": self.failures,
                "cooldown_s": self.cooldown_s, "retry_after_s": round(self.retry_after(), 3),
                "transitions": [t.to_dict() for t in self.transitions]}

    def __repr__(self) -> str:
        return (f"CircuitBreaker({self.name}: {self.state}, {self._consecutive}/{self.failures} consecutive failures, "
                f"retry after {math.ceil(self.retry_after())} s)")
