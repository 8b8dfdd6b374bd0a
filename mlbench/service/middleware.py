"""The service's one ASGI middleware: request ids, JSON log lines, metrics, explicit 413s and
load shedding before the upload is parsed.

It is plain ASGI on purpose. Starlette's ``@app.middleware("http")`` runs every request
through an extra task group and memory streams, and a burst paid for that on the event
loop while ``/health`` waited. Shedding happens at arrival: a segment request that finds
``queue_size + workers`` requests already admitted is answered 429 after its body is
read and dropped, never parsed, so 50 requests against a queue of 8 cost the loop nine
multipart parses, not fifty.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlbench.service.limits import Refusal, body_too_large
from mlbench.service.logs import log_event, next_request_id

__all__ = ["ServiceMiddleware", "SEGMENT_PATHS"]

SEGMENT_PATHS = ("/api/v1/segment", "/api/v1/batch-segment")


async def _drop_body(receive) -> None:
    """Read the request body to its end without keeping it (so the connection stays usable)."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class ServiceMiddleware:
    """Wrap the app: every request gets an id, a log line and a metrics count.

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
            if scope["method"] == "POST" and path in SEGMENT_PATHS:
                refusal = self.service.admit()
                if refusal is not None:
                    await self._refuse(refusal, request_id, receive, send, seen)
                    return
                admitted = True
            await self.app(scope, receive, self._sender(send, scope, request_id, seen))
        finally:
            if admitted:
                self.service.release()
            self.service.metrics.observe_request(path, seen["status"])
            log_event("request", request_id=request_id, method=scope["method"], path=path, status=seen["status"],
                      ms=round((time.perf_counter() - started) * 1000, 1), queue_depth=self.service.pool.depth)

    async def _refuse(self, refusal: Refusal, request_id: str, receive, send, seen: dict) -> None:
        await _drop_body(receive)
        self.service.metrics.reject(refusal.code)
        log_event("refused", request_id=request_id, status=refusal.status, error=refusal.code, message=refusal.message)
        seen["status"] = refusal.status
        await _send_json(send, refusal.status, refusal.body(request_id, self.service.settings.preset),
                         {**refusal.headers(), "X-Request-ID": request_id})

    def _sender(self, send, scope: dict[str, Any], request_id: str, seen: dict):
        """``send`` that adds ``X-Request-ID`` and turns Starlette's plain-text 413 into JSON."""
        replaced = {"on": False}

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] == 413 and headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced["on"] = True
                    sent = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
                    refusal = body_too_large(self.service.settings, scope["path"], sent)
                    self.service.metrics.reject(refusal.code)
                    seen["status"] = 413
                    await _send_json(send, 413, refusal.body(request_id, self.service.settings.preset),
                                     {"X-Request-ID": request_id})
                    return
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("latin-1"))]}
            elif replaced["on"]:
                return
            await send(message)

        return wrapped
