"""The service's one ASGI middleware: request ids, JSON log lines, metrics, request bodies read
under a deadline, and admission once a body has arrived, before it is parsed.

It is plain ASGI on purpose. Starlette's ``@app.middleware("http")`` runs every request
through an extra task group and memory streams, and a burst paid for that on the event
loop while ``/health`` waited.

Every request body is read here, whole, before the app sees it (:mod:`mlbench.service.uploads`):
a body that stalls or trickles is answered 408 and its connection closed, one over the body
limit 413, one that finds ``max_uploads`` bodies already arriving 503. Only then is a segment
request counted in: a client that sends headers and no body holds no admission slot. A
request that finds ``queue_size + workers`` requests already admitted is answered 429 with its
body dropped, never parsed, so 50 requests against a queue of 8 cost the loop nine multipart
parses, not fifty.
"""

from __future__ import annotations

import json
import time

from mlbench.service.limits import Refusal, body_limit, body_too_large
from mlbench.service.logs import log_event, next_request_id
from mlbench.service.uploads import (BodyTimeout, BodyTooLarge, ClientGone, body_timeout_refusal, content_length,
                                     has_body, read_body, replay)

__all__ = ["ServiceMiddleware", "SEGMENT_PATHS"]

SEGMENT_PATHS = ("/api/v1/segment", "/api/v1/batch-segment")
CLIENT_CLOSED = 499
"""The status logged for a request whose client left before its body was complete (nothing is sent)."""


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class ServiceMiddleware:
    """Wrap the app: every request gets an id, a log line, a metrics count and a bounded body read.

    Parameters
    ----------
    app : the ASGI app to wrap.
    service : :class:`~mlbench.service.core.Service`, for admission, metrics and limits.
    """

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1") or next_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started, path, seen = time.perf_counter(), scope["path"], {"status": 500}
        admitted = False
        try:
            if has_body(scope):
                body = await self._read_body(scope, receive, send, request_id, seen)
                if body is None:  # answered (408, 413, 503) or the client left
                    return
                receive = replay(body, receive)
            if scope["method"] == "POST" and path in SEGMENT_PATHS:
                refusal = self.service.admit()
                if refusal is not None:
                    await self._refuse(refusal, request_id, send, seen)
                    return
                admitted = True
            await self.app(scope, receive, self._sender(send, request_id, seen))
        finally:
            if admitted:
                self.service.release()
            self.service.metrics.observe_request(path, seen["status"])
            log_event("request", request_id=request_id, method=scope["method"], path=path, status=seen["status"],
                      ms=round((time.perf_counter() - started) * 1000, 1), queue_depth=self.service.pool.depth)

    async def _read_body(self, scope, receive, send, request_id: str, seen: dict) -> bytes | None:
        """The whole body, or None after answering why not (the upload slot is held meanwhile)."""
        settings, path = self.service.settings, scope["path"]
        limit, length = body_limit(settings, path), content_length(scope)
        if limit is not None and length is not None and length > limit:  # refused before a byte is read
            await self._refuse(body_too_large(settings, path, str(length)), request_id, send, seen)
            return None
        refusal = self.service.begin_upload()
        if refusal is not None:
            await self._refuse(refusal, request_id, send, seen)
            return None
        try:
            return await read_body(receive, limit=limit, timeout_s=settings.body_timeout_s,
                                   min_rate=settings.min_upload_rate, expected=length)
        except BodyTimeout as exc:  # close: the rest of a stalled body would never be read
            await self._refuse(body_timeout_refusal(exc, settings), request_id, send, seen, close=True)
        except BodyTooLarge as exc:
            await self._refuse(body_too_large(settings, path, str(exc.received)), request_id, send, seen, close=True)
        except ClientGone:
            seen["status"] = CLIENT_CLOSED
        finally:
            self.service.end_upload()
        return None

    async def _refuse(self, refusal: Refusal, request_id: str, send, seen: dict, close: bool = False) -> None:
        """Answer ``refusal`` without calling the app (an unread body is discarded by the server)."""
        self.service.metrics.reject(refusal.code)
        log_event("refused", request_id=request_id, status=refusal.status, error=refusal.code, message=refusal.message)
        seen["status"] = refusal.status
        headers = {**refusal.headers(), "X-Request-ID": request_id, **({"Connection": "close"} if close else {})}
        await _send_json(send, refusal.status, refusal.body(request_id, self.service.settings.preset), headers)

    def _sender(self, send, request_id: str, seen: dict):
        """``send`` that records the status and adds ``X-Request-ID``."""

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        return wrapped
