"""A hostile client must not deny service: idle and trickling uploads, floods, decompression bombs.

Every test talks to a real uvicorn on a free loopback port (as ``test_service.py`` does), with
raw sockets for the clients no library would be: POST headers announcing a body that never comes,
or comes one byte at a time. Timeouts are set small through ``ServiceSettings`` so each test takes
a few seconds; the models are the instant and slow stand-ins of ``mlbench.service.fakes``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch

import mlbench as mb
from hostile_images import _png_zeros, _tiled_zeros
from mlbench.client.explain import explain_error
from mlbench.service import RunningServer, ServiceSettings, add_serve_command, create_app, serve_in_thread
from mlbench.service.fakes import BrightModel, SlowModel, make_png
from mlbench.service.limits import Refusal, check_upload
from mlbench.service.uploads import BodyTimeout, BodyTooLarge, ClientGone, read_body

torch.set_num_threads(1)
PNG = make_png(96)
TIMEOUT_S = 1.0
"""``body_timeout_s`` of these tests: short, so a stalled body is cut within the test."""


def _settings(**changes) -> ServiceSettings:
    base = dict(models={"hrnet": BrightModel()}, options={"input_size": 64}, warmup=False, queue_size=4,
                body_timeout_s=TIMEOUT_S, min_upload_rate=1000.0)
    return ServiceSettings(**{**base, **changes})


def _post(client: httpx.Client, data: bytes = PNG, name: str = "a.png") -> httpx.Response:
    return client.post("/api/v1/segment", files={"file": (name, data, "application/octet-stream")})


def _open_upload(port: int, length: int = 5000) -> socket.socket:
    """A connection that sends the headers of a segment upload of ``length`` bytes and no body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST /api/v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                 f"boundary=xyz\r\nContent-Length: {length}\r\n\r\n".encode())
    return sock


@contextmanager
def _idle_uploads(port: int, n: int):
    """``n`` connections from :func:`_open_upload`, closed at the end whatever happens."""
    socks = [_open_upload(port) for _ in range(n)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextmanager
def _held_uploads(server: RunningServer, n: int):
    """``n`` connections from :func:`_idle_uploads` to ``server``, each answer read from the moment they
    open (:func:`_watch`), entered once the service counts all ``n`` as uploading; yields the function
    that collects the answers. The sockets are closed at the end whatever happens."""
    t0 = time.monotonic()
    with _idle_uploads(server.port, n) as idle:
        collect = _watch(idle, t0)
        _until(lambda: server.service.uploading == n)
        yield collect


def _trickle(sock: socket.socket, stop: threading.Event, every_s: float = 0.2) -> None:
    """Send one body byte every ``every_s`` seconds until the server closes the connection."""
    while not stop.is_set():
        try:
            sock.sendall(b"-")
        except OSError:  # closed by the server
            return
        stop.wait(every_s)


def _answer(sock: socket.socket, t0: float, wait_s: float = 10.0) -> tuple[int | None, float, bool, bytes]:
    """``(status, seconds after t0 it came, closed after it, raw bytes)`` of a raw connection."""
    sock.settimeout(wait_s)
    data, status, at = b"", None, None
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if status is None and b"\r\n" in data:
                status, at = int(data.split(b" ", 2)[1]), time.monotonic() - t0
        closed = True
    except ConnectionResetError:  # closed by the server while a trickler was still sending: a reset
        closed = True
    except OSError:  # a timeout, or the socket closed under us
        closed = False
    sock.close()
    return status, at if at is not None else -1.0, closed, data


def _watch(socks: list[socket.socket], t0: float):
    """Read every connection's answer in its own thread from now on (so arrival times are the
    server's, not when the test got round to reading); returns a function that joins them."""
    results: list = [None] * len(socks)

    def read(i: int, sock: socket.socket) -> None:
        results[i] = _answer(sock, t0)

    threads = [threading.Thread(target=read, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()

    def collect() -> list[tuple[int | None, float, bool, bytes]]:
        for thread in threads:
            thread.join(15)
        return results

    return collect


def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _ready(client: httpx.Client) -> httpx.Response:
    return client.get("/readyz")


# ---- idle and slow uploads -----------------------------------------------------------------------
def test_idle_and_trickling_uploads_hold_no_admission_slot_and_get_408():
    """12 connections that send headers and no body, 3 that trickle a byte every 0.2 s: real
    requests are still admitted and answered; the idle ones get 408 and are closed when the 2 s
    body timeout passes (the stall rule), the trickling ones too (the rate rule)."""
    settings = _settings(body_timeout_s=2 * TIMEOUT_S)  # time for the real requests on a busy machine
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        _until(lambda: _ready(client).status_code == 200)
        service, stop = server.service, threading.Event()
        t0 = time.monotonic()
        with _idle_uploads(server.port, 15) as socks:  # 12 idle, more than queue_size + workers = 5; 3 slow
            threads = [threading.Thread(target=_trickle, args=(s, stop), daemon=True) for s in socks[12:]]
            for thread in threads:
                thread.start()
            collect = _watch(socks, t0)
            try:
                _until(lambda: service.uploading == 15)
                assert _ready(client).status_code == 200 and service.admitted == 0
                answers = [_post(client) for _ in range(6)]
                assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
                assert service.uploading == 15, "the idle uploads were still open while the real requests were answered"
                results = collect()
            finally:
                stop.set()
    for status, at, closed, data in results:
        assert status == 408 and closed, data[:300]
        assert 2 * TIMEOUT_S - 0.05 <= at <= 2 * TIMEOUT_S + 1.5, at  # at the timeout, with scheduling noise
        assert b'"error": "body_timeout"' in data and b"Connection: close" in data.replace(b"connection", b"Connection")
    assert b"no data came for 2 s" in results[0][3] and b"0 bytes of the 5,000 announced" in results[0][3]
    assert all(b"slower than the minimum upload rate of 1,000 bytes/s" in r[3] for r in results[12:])
    assert service.uploading == 0 and service.admitted == 0
    assert service.metrics.to_dict()["rejections"]["body_timeout"] == 15


def test_upload_slots_bound_bodies_in_flight_and_readyz_says_so():
    """``max_uploads`` idle uploads take every upload slot: /readyz turns 503 with the reason, a
    request with a body is answered 503 at once, and all of it clears when the idle ones time out."""
    settings = _settings(max_uploads=3)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        _until(lambda: _ready(client).status_code == 200)
        with _held_uploads(server, 3) as collect:
            ready = _ready(client)
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            assert ready.json()["checks"]["upload_slots_free"] is False
            assert "every upload slot is taken (3 of 3 request bodies arriving)" in ready.json()["reason"]
            refused = _post(client)
            assert refused.status_code == 503 and refused.json()["error"] == "uploads_full"
            assert refused.headers["retry-after"] == "1" and refused.json()["max_uploads"] == 3
            assert client.get("/health").status_code == 200  # requests without a body are not affected
            assert [status for status, *_ in collect()] == [408] * 3
        _until(lambda: _ready(client).status_code == 200)
        assert _post(client).status_code == 200


def test_readyz_is_503_with_a_reason_while_every_admission_slot_is_taken():
    settings = _settings(models={"slow": SlowModel(1.0, steps=10)}, default_model="slow", queue_size=1,
                         timeout_s=10)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        _until(lambda: _ready(client).status_code == 200)
        results: list[int] = []

        def send() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as own:
                results.append(_post(own).status_code)

        senders = [threading.Thread(target=send) for _ in range(2)]  # queue_size 1 + 1 worker
        for sender in senders:
            sender.start()
        _until(lambda: server.service.admitted == 2)
        ready = _ready(client)
        assert ready.status_code == 503 and ready.json()["checks"]["admission_open"] is False
        assert "every admission slot is taken (2 of 2 requests admitted)" in ready.json()["reason"]
        shed = _post(client)
        assert shed.status_code == 429 and shed.json()["error"] == "queue_full" and "retry-after" in shed.headers
        for sender in senders:
            sender.join(10)
        assert results == [200, 200]
        ready = _ready(client)
        assert ready.status_code == 200 and "reason" not in ready.json()


# ---- floods --------------------------------------------------------------------------------------
async def _flood(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client:
        return await asyncio.gather(*(client.post("/api/v1/segment", files={"file": ("a.png", PNG)})
                                      for _ in range(n)))


def test_a_flood_with_idle_connections_is_refused_clearly_and_the_service_recovers():
    """40 real requests at once, while 10 idle uploads sit there: every request is answered, the
    refused ones with 429/503 and Retry-After (nothing hangs, no 500); afterwards every counter is
    back to zero, /readyz is ready and a request is served."""
    settings = _settings(models={"slow": SlowModel(0.05, steps=1)}, default_model="slow", queue_size=3,
                         max_uploads=24, max_wait_s=5, timeout_s=5)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        _until(lambda: _ready(client).status_code == 200)
        with _held_uploads(server, 10) as collect:
            responses = asyncio.run(_flood(server.url, 40))
            statuses = [r.status_code for r in responses]
            assert len(statuses) == 40 and set(statuses) <= {200, 429, 503}, statuses
            assert statuses.count(200) >= settings.queue_size + settings.workers, statuses
            for refused in (r for r in responses if r.status_code != 200):
                assert "retry-after" in refused.headers and refused.json()["error"] in ("queue_full", "uploads_full")
            assert [status for status, *_ in collect()] == [408] * 10
        _until(lambda: _ready(client).status_code == 200)
        assert server.service.admitted == 0 and server.service.uploading == 0 and server.service.pool.depth == 0
        assert _post(client).status_code == 200


# ---- decompression bombs -------------------------------------------------------------------------
def _vm(key: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def _reset_peak() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def test_decompression_bombs_are_refused_from_the_header_and_the_worker_does_not_grow():
    """A 0.2 MB float64 RGB TIFF that decodes to 226 MB (under the library's 256 MiB budget, so a
    worker would decode it and peak at about +560 MB, measured) and a 20000 x 20000 PNG: 413 from
    the header, before any worker sees them; the server process stays within a few MB."""
    tiff = _tiled_zeros(3072, np.float64, 3, photometric="rgb")
    png = _png_zeros(20000, 20000, 8, 0, 1)  # grey: 0.8 MB
    assert len(tiff) < 300_000 and len(png) < 1_000_000
    with serve_in_thread(create_app(_settings())) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        _until(lambda: _ready(client).status_code == 200)
        assert _post(client).status_code == 200  # the pipeline's own allocations are made once
        completed = server.service.metrics.to_dict()["completed"]
        _reset_peak()
        before = _vm("VmRSS")
        bomb = _post(client, tiff, "cells.tiff")
        huge = _post(client, png)
        grown = _vm("VmHWM") - before
        batch = client.post("/api/v1/batch-segment", files=[("files", ("ok.png", PNG)), ("files", ("b.tiff", tiff))])
        assert server.service.metrics.to_dict()["completed"] == completed + 1  # only the batch's good image ran
    assert bomb.status_code == 413 and bomb.json()["error"] == "too_many_decoded_bytes", bomb.text
    info = bomb.json()
    assert (info["decoded_bytes"], info["channels"], info["sample_bytes"]) == (3072 * 3072 * 3 * 8, 3, 8)
    assert info["limit"] == 64 * 1024 * 1024 and "nothing decoded" in info["detail"]
    assert huge.status_code == 413 and huge.json()["error"] == "too_many_pixels"
    assert huge.json()["pixels"] == 400_000_000
    assert grown < 40 * 1024 * 1024, f"the server process grew by {grown / 2**20:.0f} MB for refused uploads"
    items = batch.json()["results"]
    assert [i["status"] for i in items] == [200, 413] and items[1]["code"] == "too_many_decoded_bytes"
    assert "would decode to 226,492,416 bytes (3072x3072 pixels x 3 channel(s) x 8" in explain_error(413, info)


def test_decoded_byte_limit_reuses_the_header_reader_and_can_be_switched_on_as_served():
    tiff = _tiled_zeros(1024, np.float64, 3, photometric="rgb")  # 25 MB decoded
    assert check_upload(tiff, "a.tiff", None, None, 25_165_824) == ("tiff", 1024, 1024)
    with pytest.raises(Refusal, match=r"decode to 25,165,824 bytes \(1024x1024 pixels x 3 channel\(s\) x 8") as err:
        check_upload(tiff, "a.tiff", None, None, 25_165_823)
    assert err.value.status == 413 and err.value.extra["limit"] == 25_165_823
    # the historic service read nothing before decoding; with a limit it reads the header too
    assert check_upload(tiff, "a.tiff", (".tiff",), None) is None
    with pytest.raises(Refusal, match="above the limit of 1,000,000 bytes"):
        check_upload(tiff, "a.tiff", (".tiff",), None, 1_000_000)
    assert check_upload(b"not an image", "a.png", (".png",), None, 1_000_000) is None  # PIL answers it, as served
    assert ServiceSettings.as_served().max_decoded_bytes is None


# ---- the pieces ----------------------------------------------------------------------------------
def _receiver(parts: list[tuple[float, dict]]):
    """An ASGI receive that yields each message after its delay in seconds."""
    async def receive() -> dict:
        delay, message = parts.pop(0)
        await asyncio.sleep(delay)
        return message

    return receive


def _chunk(body: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_read_body_applies_the_stall_and_rate_rules_the_limit_and_sees_a_disconnect():
    read = lambda parts, **kw: asyncio.run(read_body(_receiver(parts), **{"limit": None, "timeout_s": 0.3,  # noqa: E731
                                                                           "min_rate": None, **kw}))
    assert read([(0, _chunk(b"ab")), (0.1, _chunk(b"cd", False))]) == b"abcd"
    with pytest.raises(BodyTimeout, match=r"\(stall\) after 2 bytes") as err:
        read([(0, _chunk(b"ab")), (5, _chunk(b"cd", False))], expected=4)
    assert err.value.rule == "stall" and err.value.expected == 4 and 0.25 < err.value.elapsed < 1.0
    with pytest.raises(BodyTimeout, match=r"\(trickle\)") as err:  # 10 bytes/s against a minimum of 100
        read([(0.1, _chunk(b"x")) for _ in range(20)], min_rate=100.0)
    assert err.value.rule == "trickle" and err.value.received <= 4
    assert read([(0.05, _chunk(b"x" * 10)) for _ in range(9)] + [(0.05, _chunk(b"", False))],
                min_rate=100.0) == b"x" * 90  # 200 bytes/s: never cut, though longer than timeout_s
    with pytest.raises(BodyTooLarge, match="limit of 3 bytes"):
        read([(0, _chunk(b"ab")), (0, _chunk(b"cd", False))], limit=3)
    with pytest.raises(ClientGone, match="disconnected after 2 bytes"):
        read([(0, _chunk(b"ab")), (0, {"type": "http.disconnect"})])
    assert read([(0.5, _chunk(b"ok", False))], timeout_s=None) == b"ok"  # None: the historic wait for ever


def test_new_settings_refuse_values_out_of_range():
    for bad in ({"body_timeout_s": 0}, {"min_upload_rate": -1.0}, {"max_uploads": 0}, {"max_decoded_bytes": 0}):
        with pytest.raises(mb.OptionsError, match=f"{next(iter(bad))}.*out of range"):
            ServiceSettings(**bad)
    assert ServiceSettings(body_timeout_s=None, min_upload_rate=None, max_decoded_bytes=None).body_timeout_s is None
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--body-timeout", "2.5", "--min-upload-rate", "1e4", "--max-uploads", "5"])
    assert (args.body_timeout, args.min_upload_rate, args.max_uploads) == (2.5, 10_000.0, 5)
    assert (args_default := parser.parse_args(["serve"])).body_timeout == ServiceSettings().body_timeout_s
    assert (args_default.min_upload_rate, args_default.max_uploads) == (ServiceSettings().min_upload_rate,
                                                                       ServiceSettings().max_uploads)
