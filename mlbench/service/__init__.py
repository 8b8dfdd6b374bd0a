"""The reference segmentation service: the real service's API over the one Pipeline.

``ServiceSettings.as_served()`` answers every recorded request of the real service as it
did (``tests/data/service_api/``); ``ServiceSettings()`` (``fixed``) keeps its endpoints,
envelopes and field names and adds a bounded queue, per-model circuit breakers, limits,
request ids, ``/livez``, ``/readyz``, ``/metrics`` and JSON logs. Inference runs in worker
threads (``executor="thread"``, the default for in-process apps) or in worker processes
that can be killed (``executor="process"``, ``mlbench serve``'s).

>>> from mlbench.service import ServiceSettings, create_app
>>> app = create_app(ServiceSettings(queue_size=8, timeout_s=30))
"""

from __future__ import annotations

from mlbench.service.app import create_app
from mlbench.service.breaker import CircuitBreaker
from mlbench.service.cli import add_serve_command
from mlbench.service.runner import RunningServer, serve_in_thread
from mlbench.service.settings import SERVICE_MODEL_IDS, ServiceSettings

__all__ = ["create_app", "ServiceSettings", "CircuitBreaker", "add_serve_command", "serve_in_thread",
           "RunningServer", "SERVICE_MODEL_IDS"]
