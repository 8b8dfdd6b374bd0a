"""Run the service under uvicorn: in a background thread on a free loopback port (tests,
benchmarks, notebooks) or in the foreground (``mlbench serve``), with graceful shutdown.

Graceful shutdown turns ``/readyz`` off first (the service starts draining and refuses
new work with 503), then uvicorn finishes in-flight requests, then the lifespan stops
the workers after the queue drained (bounded by ``drain_timeout_s``).

Both run uvicorn's h11 protocol with a deadline for each request head
(:mod:`mlbench.service.connections`, ``header_timeout_s``): idle and slowloris connections are
closed instead of holding sockets for ever.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from mlbench.errors import OptionsError
from mlbench.service.connections import http_protocol

__all__ = ["RunningServer", "serve_in_thread", "DrainingServer"]


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signal first marks the service as draining."""

    def handle_exit(self, sig, frame) -> None:  # noqa: D401 - uvicorn's hook
        service = getattr(getattr(self.config.app, "state", None), "service", None)
        if service is not None:
            service.draining = True
        super().handle_exit(sig, frame)


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise OptionsError(f"host={host!r} is not a loopback address; serve_in_thread binds only to 127.0.0.1 "
                           "or ::1 (use `mlbench serve --host` to expose the service deliberately)")


class RunningServer:
    """A uvicorn server running ``app`` in a daemon thread; ``url`` is its base URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> None:
        _check_loopback(host)
        self.app = app
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says TCP; with proto 0 every keep-alive answer (headers, then body) waited
        # ~40 ms for a delayed ACK (Nagle), the whole of /health's latency on an idle service
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                     socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http=http_protocol(app),
                                timeout_graceful_shutdown=10, backlog=256)
        self.server = DrainingServer(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise OptionsError(f"the service did not start within {start_timeout_s:g} s on {self.url}; "
                               "run it in the foreground (`mlbench serve`) to see the error")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def service(self):
        return self.app.state.service

    def stop(self, timeout_s: float = 20.0) -> None:
        """Drain (``/readyz`` off first), stop uvicorn and wait for its thread."""
        service = getattr(self.app.state, "service", None)
        if service is not None:
            service.draining = True
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningServer({self.url}, running={self._thread.is_alive()})"


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start ``app`` under uvicorn on a loopback port (0 = a free one); use as a context manager."""
    return RunningServer(app, host, port)
