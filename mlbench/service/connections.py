"""A deadline for the request head: a connection must send a complete request line and headers
within ``header_timeout_s`` of its accept, and again from the end of each response, or be closed.

uvicorn (h11) bounds neither wait: it arms no timer on a new connection, and its keep-alive timer
is cancelled by any byte received, so a client that opens sockets and sends nothing, or trickles a
header byte every few seconds (slowloris), holds a socket and a file descriptor for ever. Request
*bodies* are bounded elsewhere (:mod:`mlbench.service.uploads`); this module bounds what comes
before them, in the HTTP protocol, where the app never sees a request that has no head yet.

The deadline is a deadline, not an idle timer: bytes that arrive do not extend it. It runs while
the connection waits for a request head (no request yet, or the last response is complete) and
stops once h11 has parsed a whole head (the request then belongs to the app and its own limits).
When it passes, the connection is counted (``/metrics`` ``rejections.header_timeout``), logged,
and closed: with a short ``408 Request Timeout`` and ``Connection: close`` when part of a head had
arrived, silently when nothing had (there is no request to answer, and a 408 on an idle
keep-alive connection can be read by a client reusing it at that instant as the answer to its
next request). A client that is not reading what was already written is aborted, not waited for.

>>> http_protocol(object()).keywords  # an app without a service: the default deadline, no counter
{'header_timeout_s': 10.0, 'on_timeout': None, 'preset': 'fixed'}
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlbench.service.limits import Refusal
from mlbench.service.logs import log_event
from mlbench.service.settings import ServiceSettings

__all__ = ["HeaderDeadlineProtocol", "http_protocol", "header_timeout_refusal"]


def header_timeout_refusal(timeout_s: float, received: int) -> Refusal:
    """The 408 of a connection whose request head did not arrive within ``timeout_s``."""
    return Refusal(408, "header_timeout",
                   f"the request head (request line and headers) did not arrive within {timeout_s:g} s: {received:,} "
                   "bytes of it came; the service gives a connection that long from its opening, and from the end "
                   "of each response, to send a whole head. Send the head at once (check the client, and any proxy "
                   "between it and the service)", received=received, header_timeout_s=timeout_s)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head.

    Parameters
    ----------
    config, server_state, app_state, _loop : what uvicorn passes every HTTP protocol.
    header_timeout_s : seconds a request head may take (see the module docstring).
    on_timeout : called with the number of head bytes received when a connection is cut
        (the service counts it); None counts nothing.
    preset : the service preset, for the 408's JSON body (``{"detail"}`` alone as served).
    """

    def __init__(self, config, server_state, app_state, _loop: asyncio.AbstractEventLoop | None = None, *,
                 header_timeout_s: float, on_timeout: Callable[[int], None] | None = None,
                 preset: str = "fixed") -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s, self.on_timeout, self.preset = header_timeout_s, on_timeout, preset
        self._deadline: asyncio.TimerHandle | None = None
        self._upgraded = False

    # uvicorn's hooks: each lets uvicorn act, then starts or stops the deadline to match
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._sync_deadline()

    def handle_events(self) -> None:
        """Parse what arrived (uvicorn), then stop the deadline if a whole head was parsed."""
        super().handle_events()
        self._sync_deadline()

    def on_response_complete(self) -> None:
        """A response went out: the next head gets a fresh deadline (unless one is already in)."""
        super().on_response_complete()
        self._sync_deadline()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._upgraded = True  # the transport belongs to another protocol from here on
        self._cancel_deadline()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    # the deadline
    def _waiting_for_head(self) -> bool:
        """Whether the connection is open and no request is being handled (none yet, or answered)."""
        return (not self._upgraded and not self.transport.is_closing()
                and (self.cycle is None or self.cycle.response_complete))

    def _sync_deadline(self) -> None:
        if not self._waiting_for_head():
            self._cancel_deadline()
        elif self._deadline is None:  # started once per wait: later bytes do not extend it
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """The head is late: count, log, answer 408 if part of a head came, close."""
        self._deadline = None
        if not self._waiting_for_head():
            return
        received = len(self.conn.trailing_data[0])
        unread = self.transport.get_write_buffer_size()  # the client is not reading an earlier answer
        answer = (received > 0 and not unread and self.conn.our_state is h11.IDLE
                  and self.conn.their_state is h11.IDLE)
        if answer:
            self.transport.write(self._answer(received))
        if self.on_timeout is not None:
            self.on_timeout(received)
        log_event("refused", status=408 if answer else None, error="header_timeout", client=self.client,
                  received=received, header_timeout_s=self.header_timeout_s)
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # close() would wait for a client that does not read
        else:
            self.transport.close()

    def _answer(self, received: int) -> bytes:
        """A whole ``408`` response: JSON body, ``Connection: close``."""
        refusal = header_timeout_refusal(self.header_timeout_s, received)
        body = json.dumps(refusal.body(None, self.preset)).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n")
        return head.encode("latin-1") + body


def http_protocol(app: Any) -> Any:
    """The ``uvicorn.Config(http=...)`` for ``app``: h11 with the header deadline of its settings.

    The deadline, the preset and the counter come from ``app.state.service`` (an app of
    :func:`~mlbench.service.create_app`); another app gets the default deadline and no counter.
    ``header_timeout_s=None`` gives uvicorn's plain h11 protocol (no deadline).
    """
    service = getattr(getattr(app, "state", None), "service", None)
    settings = service.settings if service is not None else ServiceSettings  # the class holds the defaults
    if settings.header_timeout_s is None:
        return H11Protocol
    on_timeout = (lambda received: service.metrics.reject("header_timeout")) if service is not None else None
    return functools.partial(HeaderDeadlineProtocol, header_timeout_s=settings.header_timeout_s,
                             on_timeout=on_timeout, preset=settings.preset)
