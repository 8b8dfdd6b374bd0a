"""The reference segmentation service: FastAPI over the one Pipeline, with a bounded
queue, per-model circuit breakers, limits, health/readiness/metrics and JSON logs.
Inference runs in worker threads (``executor="thread"``, the default for in-process apps)
or in worker processes that can be killed (``executor="process"``, ``mlbench serve``'s).

>>> from mlbench.service import ServiceSettings, create_app
>>> app = create_app(ServiceSettings(queue_size=8, timeout_s=30))
"""

from __future__ import annotations

from .app import create_app
from .breaker import CircuitBreaker
from .cli import add_serve_command
from .runner import RunningServer, serve_in_thread
from .settings import SERVICE_MODEL_IDS, ServiceSettings

__all__ = ["create_app", "ServiceSettings", "CircuitBreaker", "add_serve_command", "serve_in_thread",
           "RunningServer", "SERVICE_MODEL_IDS"]
