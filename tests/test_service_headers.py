"""A connection must send a whole request head within ``header_timeout_s``, or be closed.

Real uvicorn on a loopback port (``serve_in_thread``), raw sockets for the clients no library
would be: sockets that send nothing, and sockets that trickle header bytes (slowloris). The
deadline is 1 s here so each test takes a few seconds; uvicorn's own keep-alive timeout is 5 s,
so a connection closed near 1 s was closed by the header deadline.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch

import mlbench as mb
from mlbench.service import ServiceSettings, add_serve_command, create_app, serve_in_thread
from mlbench.service.connections import HeaderDeadlineProtocol, header_timeout_refusal, http_protocol
from mlbench.service.fakes import BrightModel, SlowModel, make_png

torch.set_num_threads(1)
DEADLINE_S = 1.0
"""``header_timeout_s`` of these tests."""
SLACK_S = 2.0
"""How late a cut may come on a busy 2-core machine (uvicorn's keep-alive would close at 5 s)."""
HEAD = b"POST /api/v1/segment HTTP/1.1\r\nHost: x\r\n"


def _settings(**changes) -> ServiceSettings:
    base = dict(models={"hrnet": BrightModel()}, options={"input_size": 64}, warmup=False,
                header_timeout_s=DEADLINE_S)
    return ServiceSettings(**{**base, **changes})


def _connect(port: int) -> tuple[socket.socket, float]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, time.monotonic()


def _until_closed(sock: socket.socket, trickle: bytes = b"", every_s: float = 0.3, wait_s: float = 8.0):
    """``(bytes the server sent, monotonic time it closed or None)``, sending one byte of ``trickle``
    every ``every_s`` seconds meanwhile (slowloris) and nothing once ``trickle`` is used up."""
    data, sent, end = b"", 0, time.monotonic() + wait_s
    sock.settimeout(every_s)
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            if sent < len(trickle):
                try:
                    sock.sendall(trickle[sent:sent + 1])
                    sent += 1
                except OSError:  # closed by the server between two bytes
                    return data, time.monotonic()
            continue
        except ConnectionResetError:  # closed while a byte was in flight: a reset, after its answer
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    return data, None


def _response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) read from ``sock``."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed before a whole response: {data[:300]!r}"
        data += chunk
    return data


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:"))


def _status(data: bytes) -> int | None:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def _json_body(data: bytes) -> dict:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def _header_timeouts(client: httpx.Client) -> int:
    return client.get("/metrics", params={"format": "json"}).json()["rejections"].get("header_timeout", 0)


def test_slowloris_and_idle_sockets_are_cut_at_the_deadline_while_real_requests_are_answered():
    with serve_in_thread(create_app(_settings())) as server:
        results: dict[str, list] = {"idle": [], "slow": []}

        def hold(kind: str) -> None:
            sock, opened = _connect(server.port)
            with sock:
                if kind == "slow":
                    sock.sendall(HEAD)
                data, closed = _until_closed(sock, trickle=b"X-Slow: " + b"a" * 40 if kind == "slow" else b"")
            results[kind].append((opened, closed, data))

        threads = [threading.Thread(target=hold, args=(kind,), daemon=True) for kind in ["idle", "slow"] * 15]
        for thread in threads:
            thread.start()
        time.sleep(0.4)  # every socket open (the slow ones trickling), none past its deadline yet
        with httpx.Client(base_url=server.url, timeout=10) as probe:
            started = time.monotonic()
            health = probe.get("/health")
            health_s, cut_before = time.monotonic() - started, len(results["idle"]) + len(results["slow"])
        assert health.status_code == 200 and health_s < 1.0 and cut_before == 0
        for thread in threads:
            thread.join(15)
        assert len(results["idle"]) == len(results["slow"]) == 15
        for kind, rows in results.items():
            for opened, closed, data in rows:
                assert closed is not None, f"a {kind} socket was still open after 8 s"
                assert DEADLINE_S - 0.05 <= closed - opened <= DEADLINE_S + SLACK_S, (kind, closed - opened)
                if kind == "idle":  # nothing of a request came: closed without an answer
                    assert data == b""
                else:
                    assert _status(data) == 408 and b"connection: close" in data.lower()
                    body = _json_body(data)
                    assert body["error"] == "header_timeout" and body["header_timeout_s"] == DEADLINE_S
                    assert len(HEAD) < body["received"] < len(HEAD) + 12  # trickled bytes did not extend it
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert _header_timeouts(client) == 30
            assert 'mlbench_rejections_total{reason="header_timeout"} 30' in client.get("/metrics").text


def test_keep_alive_gets_a_fresh_deadline_after_each_response_and_none_while_a_request_runs():
    settings = _settings(models={"hrnet": SlowModel(1.5)}, body_timeout_s=5.0, min_upload_rate=None)
    with serve_in_thread(create_app(settings)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            ports = []
            for i in range(3):  # 2 x 0.6 s: past the deadline counted from the accept, inside each re-armed one
                if i:
                    time.sleep(0.6)
                response = client.get("/health")
                assert response.status_code == 200
                ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])
        assert len(set(ports)) == 1, f"the keep-alive connection was not reused: local ports {ports}"
        # a body sent in parts over 1.2 s, then an inference of 1.5 s: the head was in, no deadline runs
        request = httpx.Request("POST", server.url + "/api/v1/segment",
                                files={"file": ("a.png", make_png(64), "image/png")})
        body = request.read()
        sock, _ = _connect(server.port)
        with sock:
            sock.sendall(f"POST /api/v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}"
                         f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            third = len(body) // 3 + 1
            for i in range(3):
                time.sleep(0.4)
                sock.sendall(body[i * third:(i + 1) * third])
            answer = _response(sock)
        assert _status(answer) == 200, answer[:300]
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert _header_timeouts(client) == 0


def test_a_connection_idle_or_half_way_through_a_head_after_a_response_is_cut_at_the_rearmed_deadline():
    with serve_in_thread(create_app(_settings())) as server:
        rows = []
        for after in (b"", b"GET /health HTTP/1.1\r\nHo"):
            sock, _ = _connect(server.port)
            with sock:
                time.sleep(0.6)  # most of the first deadline spent before the request: the next one is fresh
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                first = _response(sock)
                answered = time.monotonic()
                assert _status(first) == 200
                sock.sendall(after)  # part of a next head, at once: it does not extend the deadline
                data, closed = _until_closed(sock)
            rows.append((data, closed - answered if closed else None))
        (idle, idle_s), (partial, partial_s) = rows
        assert idle == b"" and idle_s is not None and DEADLINE_S - 0.05 <= idle_s <= DEADLINE_S + SLACK_S
        assert _status(partial) == 408 and DEADLINE_S - 0.05 <= partial_s <= DEADLINE_S + SLACK_S
        assert _json_body(partial)["received"] == len(after)
        sock, _ = _connect(server.port)  # pipelined: both requests answered, then the partial third cut
        with sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /he")
            data, closed = _until_closed(sock)
        assert closed is not None and re.findall(rb"HTTP/1.1 (\d+)", data) == [b"200", b"200", b"408"]
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert _header_timeouts(client) == 3


def test_as_served_keeps_the_deadline_and_answers_only_detail():
    settings = ServiceSettings.as_served(models={"hrnet": BrightModel()}, options={"input_size": 64},
                                         header_timeout_s=DEADLINE_S)
    with serve_in_thread(create_app(settings)) as server:
        sock, opened = _connect(server.port)
        with sock:
            sock.sendall(HEAD)
            data, closed = _until_closed(sock)
    assert closed is not None and _status(data) == 408 and set(_json_body(data)) == {"detail"}
    assert "did not arrive within 1 s" in _json_body(data)["detail"]


def test_the_deadline_is_a_setting_and_an_option_of_serve():
    with pytest.raises(mb.OptionsError, match="header_timeout_s.*out of range"):
        ServiceSettings(header_timeout_s=0)
    assert ServiceSettings(header_timeout_s=None).header_timeout_s is None
    app = create_app(_settings(header_timeout_s=None, models={}))
    assert http_protocol(app).__name__ == "H11Protocol"  # None: uvicorn's own protocol, no deadline
    factory = http_protocol(create_app(_settings(header_timeout_s=2.5, models={}, preset="as_served")))
    assert factory.func is HeaderDeadlineProtocol
    assert (factory.keywords["header_timeout_s"], factory.keywords["preset"]) == (2.5, "as_served")
    assert header_timeout_refusal(2.5, 7).status == 408
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "--header-timeout", "3"]).header_timeout == 3.0
    assert parser.parse_args(["serve"]).header_timeout == ServiceSettings().header_timeout_s
