"""Talk to the reference service or the real one, and explain every answer.

``service_client`` (:class:`ServiceClient`), ``results`` (what an answer parses into), ``explain``
and ``messages`` (what an error answer means for what was sent), ``no_answer`` (what it means when
none came: refused, timed out, the connection lost).
"""

from __future__ import annotations

from mlbench.client.results import BatchResult, SegmentResult, ServiceError
from mlbench.client.service_client import ServiceClient

__all__ = ["BatchResult", "SegmentResult", "ServiceClient", "ServiceError"]
