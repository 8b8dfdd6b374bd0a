"""Request bodies read whole, under a deadline, before the app sees them and before admission.

A client that sends its headers and then nothing (or one byte a second) must not hold any of
the service's capacity. :class:`~mlbench.service.middleware.ServiceMiddleware` therefore reads
every request body itself with :func:`read_body` and only then counts a segment request in
(:meth:`~mlbench.service.core.Service.admit`) and hands the app the buffered body. Two rules
end a body that does not arrive, each answered 408 with the connection closed:

- **stall**: no byte for ``body_timeout_s`` (an idle upload, a client that stopped);
- **trickle**: the whole body must be in by ``start + body_timeout_s + received / min_upload_rate``,
  so an upload averaging ``min_upload_rate`` bytes/s or more is never cut, a slower one is cut
  about ``body_timeout_s`` after it fell behind.

uvicorn's ``timeout_keep_alive`` covers neither (it only closes idle connections between
requests). At most ``max_uploads`` bodies are read at once (each at most the body limit), so
buffered bodies are bounded in memory; more answer 503 at once, without reading the body.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from mlbench.errors import MlbenchError
from mlbench.service.limits import Refusal

__all__ = ["BodyTimeout", "BodyTooLarge", "ClientGone", "content_length", "has_body", "read_body", "replay",
           "body_timeout_refusal", "uploads_full"]

Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyTimeout(MlbenchError, TimeoutError):
    """The body stalled or trickled past its deadline (``received`` bytes in ``elapsed`` s, ``rule``)."""

    def __init__(self, received: int, expected: int | None, elapsed: float, rule: str) -> None:
        super().__init__(f"request body timed out ({rule}) after {received} bytes in {elapsed:.2f} s")
        self.received, self.expected, self.elapsed, self.rule = received, expected, elapsed, rule


class BodyTooLarge(MlbenchError, ValueError):
    """More body bytes arrived than the limit (a chunked upload has no Content-Length to check first)."""

    def __init__(self, received: int, limit: int) -> None:
        super().__init__(f"request body passed the limit of {limit} bytes ({received} bytes received)")
        self.received, self.limit = received, limit


class ClientGone(MlbenchError, ConnectionError):
    """The client disconnected before its body was complete."""


def content_length(scope: dict) -> int | None:
    """The request's Content-Length as an int (None when absent or not a number)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def has_body(scope: dict) -> bool:
    """Whether the request announces a body (a Content-Length above 0, or chunked transfer)."""
    length = content_length(scope)
    if length is not None:
        return length > 0
    return any(name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in scope.get("headers", []))


async def read_body(receive: Receive, *, limit: int | None, timeout_s: float | None, min_rate: float | None,
                    expected: int | None = None, clock: Callable[[], float] = time.monotonic) -> bytes:
    """The whole request body, read from ASGI ``receive`` under the stall and trickle rules.

    Parameters
    ----------
    receive : the ASGI receive callable.
    limit : most bytes accepted (None: no limit).
    timeout_s : seconds without a byte before the body is given up, and the trickle rule's
        allowance (None: wait for ever, the historic behaviour).
    min_rate : bytes/s the body must average once ``timeout_s`` has passed (None: no rate rule).
    expected : the Content-Length, for the error's report.
    clock : seconds, monotonic (injectable for tests).

    Raises
    ------
    BodyTimeout
        When no byte came for ``timeout_s`` (``rule="stall"``) or the body fell behind
        ``min_rate`` (``rule="trickle"``).
    BodyTooLarge
        When more than ``limit`` bytes arrive.
    ClientGone
        When the client disconnects first.
    """
    chunks: list[bytes] = []
    started = last = clock()
    received = 0
    while True:
        wait, rule = _wait(started, last, received, clock(), timeout_s, min_rate)
        if wait is not None and wait <= 0:
            raise BodyTimeout(received, expected, clock() - started, rule)
        try:
            message = await (receive() if wait is None else asyncio.wait_for(receive(), wait))
        except asyncio.TimeoutError:
            raise BodyTimeout(received, expected, clock() - started, rule) from None
        if message["type"] != "http.request":
            raise ClientGone(f"the client disconnected after {received} bytes of its body")
        body = message.get("body", b"")
        if body:
            received, last = received + len(body), clock()
            if limit is not None and received > limit:
                raise BodyTooLarge(received, limit)
            chunks.append(body)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _wait(started: float, last: float, received: int, now: float, timeout_s: float | None,
          min_rate: float | None) -> tuple[float | None, str]:
    """Seconds the next chunk may take (None: no limit) and the rule that sets it."""
    if timeout_s is None:
        return None, ""
    stall = last + timeout_s - now
    if min_rate is None:
        return stall, "stall"
    trickle = started + timeout_s + received / min_rate - now
    return (stall, "stall") if stall <= trickle else (trickle, "trickle")


def replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI receive that yields ``body`` once, then defers to ``receive`` (for the disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed


def body_timeout_refusal(exc: BodyTimeout, settings) -> Refusal:
    """The 408 of a body that stalled or trickled (the connection is then closed)."""
    of = f" of the {exc.expected:,} announced" if exc.expected is not None else ""
    if exc.rule == "stall":
        why = f"no data came for {settings.body_timeout_s:g} s"
    else:
        why = f"it arrived slower than the minimum upload rate of {settings.min_upload_rate:,.0f} bytes/s"
    return Refusal(408, "body_timeout",
                   f"the request body did not arrive in time: {exc.received:,} bytes{of} in {exc.elapsed:.1f} s, and "
                   f"{why}; the service waits {settings.body_timeout_s:g} s for the body to start and between its "
                   "parts, then needs that average rate. Send the whole request at once (check the Content-Length "
                   "header and the network)", received=exc.received, expected=exc.expected, rule=exc.rule,
                   body_timeout_s=settings.body_timeout_s, min_upload_rate=settings.min_upload_rate)


def uploads_full(settings, uploading: int) -> Refusal:
    """The 503 of a request that finds ``max_uploads`` bodies already being received."""
    return Refusal(503, "uploads_full",
                   f"overloaded: {uploading} request bodies are already being received (the limit is "
                   f"{settings.max_uploads}); retry shortly: a body that does not arrive is dropped after "
                   f"{settings.body_timeout_s:g} s", retry_after=settings.body_timeout_s or 1,
                   uploading=uploading, max_uploads=settings.max_uploads)
