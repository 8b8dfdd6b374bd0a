"""The reference service: limits, queue, timeouts, breaker, health/readiness/metrics, logs.

Every test talks to a real uvicorn on a free loopback port; the models are the instant,
slow and failing stand-ins of ``mlbench.service.fakes`` so the whole file stays fast.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch

import mlbench as mb
from mlbench.service import CircuitBreaker, ServiceSettings, create_app, serve_in_thread
from mlbench.service.fakes import BrightModel, FlakyModel, SlowModel, make_png
from mlbench.service.limits import Refusal, check_upload, image_header
from mlbench.service.queue import CancelToken, InferenceCancelled, install_cancel_hooks

torch.set_num_threads(1)
PNG = make_png(96)


def _wait_ready(client: httpx.Client, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


def _post(client, data=PNG, name="a.png", **form):
    return client.post("/api/v1/segment", files={"file": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in form.items()})


@pytest.fixture(scope="module")
def served():
    settings = ServiceSettings(models={"hrnet": BrightModel(), "slow": SlowModel(2.0, steps=40)},
                               options={"input_size": 64}, timeout_s=0.4, max_body_bytes=200_000,
                               max_pixels=200 * 200)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        _wait_ready(client)
        yield server, client


# ---- unit parts ----------------------------------------------------------------------------------
def test_breaker_opens_half_opens_and_closes_on_a_fake_clock():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0], name="m")
    breaker.record_failure("x")
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure("x")
    assert breaker.state == "open" and not breaker.allow() and breaker.retry_after() == 10
    now[0] = 7.5
    assert breaker.retry_after() == 2.5
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # exactly one trial
    breaker.record_failure("trial")
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert [t.target for t in breaker.transitions] == ["open", "half_open", "open", "half_open", "closed"]


def test_breaker_and_settings_refuse_bad_arguments():
    with pytest.raises(mb.OptionsError, match="must be >= 0"):
        CircuitBreaker(failures=-1)
    with pytest.raises(mb.OptionsError, match="out of range"):
        ServiceSettings(queue_size=0)
    with pytest.raises(mb.OptionsError, match="preset='served' is unknown"):
        ServiceSettings(preset="served")
    with pytest.raises(mb.OptionsError, match="must be an nn.Module"):
        from mlbench.service.settings import resolve_models

        resolve_models(ServiceSettings(models={"x": lambda: 3}))
    served = ServiceSettings.as_served()
    assert served.blocking_route and ".tif" not in served.allowed_extensions and served.breaker_failures == 0


def test_header_checks_sniff_content_and_count_pixels_before_decoding():
    assert image_header(PNG) == ("png", 96, 96)
    tif = io.BytesIO()
    import tifffile

    tifffile.imwrite(tif, np.zeros((30, 40), np.uint16))
    assert image_header(tif.getvalue()) == ("tiff", 30, 40)
    with pytest.raises(Refusal, match="not an image") as err:
        check_upload(b"<html>oops</html>", "x.png", None, None)
    assert err.value.status == 415
    with pytest.raises(Refusal, match="96x96 = 9,216 pixels, above the limit of 9,000") as err:
        check_upload(PNG, "x.png", None, 9000)
    assert err.value.status == 413 and err.value.extra["limit"] == 9000
    with pytest.raises(Refusal, match=r"Invalid image file\. Supported formats: PNG, JPG") as err:
        check_upload(tif.getvalue(), "cells.tif", (".png", ".jpg"), None)
    assert err.value.status == 400
    with pytest.raises(Refusal, match="header cannot be read"):
        image_header(PNG[:20])
    with pytest.raises(Refusal, match="empty"):
        check_upload(b"", "x.png", None, None)


def test_cancel_hooks_stop_a_forward_at_the_next_layer():
    from mlbench.service import queue as q

    model = SlowModel(10.0, steps=1000)
    handles = install_cancel_hooks(model)
    token = CancelToken()
    token.cancel()
    q._local.token = token
    try:
        started = time.perf_counter()
        with pytest.raises(InferenceCancelled, match="cancelled"):
            model(torch.zeros(1, 3, 8, 8))
        assert time.perf_counter() - started < 0.5
    finally:
        q._local.token = None
        for handle in handles:
            handle.remove()


# ---- routes ----------------------------------------------------------------------------------------
def test_health_models_status_livez_readyz_metrics(served):
    _, client = served
    body = client.get("/health").json()
    assert set(body) >= {"status", "timestamp", "models_loaded", "gpu_available"}
    assert body["models_loaded"] == 2 and body["models"] == ["hrnet", "slow"]
    assert client.get("/api/v1/health").json()["device"]["device_name"] == "CPU"
    models = client.get("/api/v1/models").json()["models"]
    assert models["hrnet"]["architecture"] == "bright" and models["hrnet"]["input_size"] == 64
    assert client.get("/livez").json() == {"alive": True}
    assert client.get("/readyz").json()["ready"] is True
    status = client.get("/api/v1/status").json()
    assert status["queue"]["capacity"] == 8 and status["settings"]["timeout_s"] == 0.4
    text = client.get("/metrics").text
    assert "mlbench_queue_depth 0" in text and 'mlbench_breaker_state{model="hrnet"} 0' in text
    assert "mlbench_requests_admitted 0" in text and "mlbench_worker_processes_killed_total 0" in text
    assert "p99" in client.get("/metrics", params={"format": "json"}).json()["latency_s"]


def test_segment_answers_the_service_schema_with_a_request_id(served):
    _, client = served
    response = _post(client, threshold=0.5, detect_holes="false")
    body = response.json()
    assert response.status_code == 200, body
    assert set(body) >= {"polygons", "model_used", "threshold_used", "image_size", "processing_time",
                         "inference_time", "preprocessing_time", "device", "success"}
    assert body["model_used"] == "hrnet" and body["image_size"] == {"width": 96, "height": 96} and body["polygons"]
    assert response.headers["x-request-id"].startswith("req-")
    assert _post(client, name="cells.tif", data=_tiff_bytes()).status_code == 200  # type sniffed, .tif fine


def _tiff_bytes() -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (np.frombuffer(PNG, np.uint8)[:64 * 64].reshape(64, 64).astype(np.uint16) * 200))
    return buffer.getvalue()


def test_validation_errors_keep_fastapi_detail_schema(served):
    _, client = served
    bad = _post(client, threshold=0.95).json()["detail"][0]
    assert bad["loc"] == ["body", "threshold"] and bad["type"] == "less_than_equal" and bad["input"] == "0.95"
    missing = client.post("/api/v1/segment", data={"threshold": "0.3"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "file"]
    unknown = _post(client, model="unet")
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["loc"] == ["body", "model"]


def test_query_parameters_are_flagged_not_silently_used(served):
    _, client = served
    response = client.post("/api/v1/segment", params={"threshold": "0.8"}, files={"file": ("a.png", PNG)})
    assert response.json()["threshold_used"] == 0.5
    assert "query parameter(s) threshold ignored" in response.json()["warnings"][0]


def test_limits_answer_413_and_415_with_the_values(served):
    _, client = served
    big = _post(client, data=PNG + b"\0" * 250_000)
    assert big.status_code == 413 and big.json()["limit"] == 200_000 and big.json()["error"] == "body_too_large"
    huge = _post(client, data=make_png(256))
    assert huge.status_code == 413 and huge.json()["pixels"] == 65536 and huge.json()["limit"] == 40_000
    text = _post(client, data=b"just some text")
    assert text.status_code == 415 and text.json()["errors"][0]["loc"] == ["body", "file"]


def test_timeout_answers_504_and_the_cancelled_run_releases_the_model(served):
    server, client = served
    started = time.perf_counter()
    response = _post(client, model="slow")
    assert response.status_code == 504 and response.json()["error"] == "inference_timeout"
    assert 0.3 < time.perf_counter() - started < 1.5
    deadline = time.monotonic() + 2
    while server.service.pool.running and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics = client.get("/metrics", params={"format": "json"}).json()
    assert metrics["queue"]["zombies"] == 0 and metrics["queue"]["cancelled_runs_stopped"] >= 1
    assert metrics["models"]["slow"]["busy"] is False
    assert max(server.service.pool.stopped_after_cancel) < 1.0  # stopped long before the 2 s forward


def test_batch_segment_reports_each_file(served):
    _, client = served
    files = [("files", ("a.png", PNG)), ("files", ("b.txt", b"hello"))]
    body = client.post("/api/v1/batch-segment", files=files).json()
    assert body["batch_size"] == 2 and body["successful_count"] == 1 and body["results"][1]["status"] == 415


async def _burst(url: str, n: int, model: str) -> tuple[list[int], list[float]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def health_probe(stop: asyncio.Event) -> list[float]:
            times = []
            while not stop.is_set():
                started = time.perf_counter()
                await client.get("/health")
                times.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
            return times

        stop = asyncio.Event()
        probe = asyncio.create_task(health_probe(stop))
        requests = [client.post("/api/v1/segment", files={"file": ("a.png", PNG)}, data={"model": model})
                    for _ in range(n)]
        responses = await asyncio.gather(*requests)
        stop.set()
        return [r.status_code for r in responses], await probe


def test_overload_is_answered_with_429_and_health_stays_fast():
    settings = ServiceSettings(models={"slow": SlowModel(0.2, steps=5)}, default_model="slow", queue_size=3,
                               max_wait_s=5, timeout_s=5, warmup=False)
    with serve_in_thread(create_app(settings)) as server:
        statuses, health = asyncio.run(_burst(server.url, 12, "slow"))
    assert len(statuses) == 12 and set(statuses) <= {200, 429}
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1
    # client and server share this process and 2 busy cores, so allow for scheduling noise; a blocked
    # event loop would stall /health for the whole burst (>= 0.8 s of forwards, see the as_served test)
    assert float(np.median(health)) < 0.1 and max(health) < 0.4, health


def test_queue_wait_answers_503_with_retry_after():
    settings = ServiceSettings(models={"slow": SlowModel(0.6, steps=6)}, default_model="slow", max_wait_s=0.2,
                               timeout_s=5, warmup=False)
    with serve_in_thread(create_app(settings)) as server:
        statuses, _ = asyncio.run(_burst(server.url, 3, "slow"))
        assert sorted(statuses) == [200, 503, 503]
        metrics = httpx.get(server.url + "/metrics?format=json").json()
        assert metrics["rejections"]["queue_wait"] == 2


def test_breaker_opens_after_failures_then_a_trial_closes_it():
    now = [0.0]
    flaky = FlakyModel(failing=True)
    settings = ServiceSettings(models={"flaky": flaky}, default_model="flaky", breaker_failures=2,
                               breaker_cooldown_s=30, clock=lambda: now[0], warmup=False)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        assert [_post(client).status_code for _ in range(2)] == [500, 500]
        refused = _post(client)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "30"
        assert refused.json()["error"] == "breaker_open" and flaky.calls == 2
        assert client.get("/readyz").json()["checks"]["breakers_closed"] is False
        now[0] = 31.0
        flaky.failing = False
        assert _post(client).status_code == 200
        transitions = client.get("/metrics", params={"format": "json"}).json()["breakers"]["flaky"]["transitions"]
        assert [t["to"] for t in transitions] == ["open", "half_open", "closed"]


def test_as_served_rejects_tif_blocks_the_loop_and_answers_500_for_unknown_models():
    settings = ServiceSettings.as_served(models={"hrnet": SlowModel(0.6, steps=6)}, options={"input_size": 64})
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        tif = _post(client, name="cells.tif", data=_tiff_bytes())
        assert tif.status_code == 400
        assert tif.json() == {"detail": "Invalid image file. Supported formats: PNG, JPG, JPEG, TIFF, BMP"}
        assert _post(client, model="unet").status_code == 500
        statuses, health = asyncio.run(_burst(server.url, 1, "hrnet"))
    assert statuses == [200] and max(health) > 0.4  # /health stalled behind the forward
    assert server.service.admitted == 0  # counted in and out, though the historic route has no queue


def test_draining_turns_readyz_off_and_refuses_new_work(served):
    server, client = served
    server.service.draining = True
    try:
        assert client.get("/readyz").status_code == 503
        refused = _post(client)
        assert refused.status_code == 503 and refused.json()["error"] == "draining" and "retry-after" in refused.headers
    finally:
        server.service.draining = False


def test_logs_are_json_lines_with_the_request_id(served):
    from mlbench.service.logs import LOGGER, configure_logging

    _, client = served
    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    try:
        _post(client, threshold=0.95)
        client.get("/livez", headers={"X-Request-ID": "abc-1"})
        deadline = time.monotonic() + 5  # the server thread logs after the response has gone out
        while '"abc-1"' not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        LOGGER.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [(line["event"], line.get("status"), line.get("request_id")) for line in lines]
    # a log line of an earlier request may land first (lines are written after the response goes out)
    refused = [rid for event, status, rid in events if event == "request" and status == 422]
    assert len(refused) == 1 and refused[0].startswith("req-") and ("request", 200, "abc-1") in events


def test_serve_command_parses_its_options():
    import argparse

    from mlbench.service import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "8123", "--preset", "as_served"])
    assert (args.host, args.port, args.preset, args.queue_size) == ("127.0.0.1", 8123, "as_served", 8)


def test_a_real_small_model_is_served_under_its_service_id_and_aliases():
    model = mb.build_model("cbam_resunet", "small").eval()
    settings = ServiceSettings(models={"resunet_small": model}, default_model="resunet_small",
                               options={"input_size": 64}, warmup=True)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        _wait_ready(client)
        assert client.get("/api/v1/models").json()["models"]["resunet_small"]["architecture"] == "cbam_resunet"
        body = _post(client, model="cbam_resunet").json()
        assert body["model_used"] == "resunet_small" and body["image_size"] == {"width": 96, "height": 96}
    assert not model._forward_pre_hooks  # the cancel hooks were removed at shutdown


def test_exit_signal_turns_readyz_off_then_shuts_down():
    import signal

    settings = ServiceSettings(models={"hrnet": BrightModel()}, warmup=False)
    server = serve_in_thread(create_app(settings))
    server.server.handle_exit(signal.SIGTERM, None)
    assert server.service.draining is True
    server._thread.join(20)
    assert not server._thread.is_alive() and server.service._stopped  # the lifespan shutdown ran


# ---- what kept /health slow during bursts (see bench/service_load.py) -----------------------------
def test_keep_alive_answers_are_not_delayed_by_nagle(served):
    import socket

    server, client = served
    assert server._socket.proto == socket.IPPROTO_TCP  # so asyncio sets TCP_NODELAY on each connection
    times = []
    for _ in range(15):
        started = time.perf_counter()
        client.get("/health")
        times.append(time.perf_counter() - started)
    assert float(np.median(times)) < 0.04, times  # with Nagle + delayed ACK every answer took >= 40 ms


def test_admission_sheds_requests_at_arrival_and_releases_them():
    from mlbench.service.core import Service

    service = Service(ServiceSettings(models={"m": BrightModel()}, queue_size=1, workers=1))
    assert service.admit() is None and service.admit() is None
    refusal = service.admit()
    assert refusal.status == 429 and refusal.code == "queue_full" and refusal.retry_after >= 1
    assert "2 requests are already admitted (queue of 1 + 1 worker(s))" in refusal.message
    service.release()
    assert service.admit() is None
    service.draining = True
    assert service.admit().status == 503


def test_a_full_service_answers_429_without_parsing_the_upload(served):
    server, client = served
    service = server.service
    before = service.metrics.to_dict()["rejections"]["queue_full"]
    service.admitted += service.settings.queue_size + service.settings.workers
    try:  # a body that is not even multipart: a parsed request would answer 422
        response = client.post("/api/v1/segment", content=b"not multipart", headers={"X-Request-ID": "shed-1"})
    finally:
        service.admitted -= service.settings.queue_size + service.settings.workers
    assert response.status_code == 429 and response.json()["error"] == "queue_full"
    assert response.headers["retry-after"] == "1" and response.headers["x-request-id"] == "shed-1"
    assert response.json()["request_id"] == "shed-1"
    assert service.metrics.to_dict()["rejections"]["queue_full"] == before + 1 and service.admitted == 0


def test_start_up_freezes_the_heap_so_no_full_collection_lands_in_a_burst():
    """`mlbench serve` freezes its own heap; an app hosted in a notebook or test process does not."""
    import subprocess
    import sys

    assert ServiceSettings().freeze_gc is False
    code = "import gc; from mlbench.service.work import freeze_heap; freeze_heap(); print(gc.get_freeze_count())"
    frozen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(frozen.stdout.strip()) > 0


def test_worker_threads_run_at_a_lower_priority_when_asked():
    import os
    import threading

    from mlbench.service.queue import Job, WorkerPool

    pool = WorkerPool(1, 2, nice=3)
    pool.start()
    try:
        job = Job("m", lambda token: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), threading.Lock())
        assert asyncio.run(pool.run(job, 5, 5)) == os.getpriority(os.PRIO_PROCESS, 0) + 3
    finally:
        pool.stop(1)
    with pytest.raises(mb.OptionsError, match="worker_nice 0..19"):
        ServiceSettings(worker_nice=25)


def test_recent_median_is_the_retry_estimate_basis():
    from mlbench.service.metrics import Metrics

    metrics = Metrics()
    assert metrics.recent_median() is None
    for seconds in (5.0, 1.0, 3.0, 2.0, 4.0):
        metrics.observe_inference(seconds, 0.0)
    assert metrics.recent_median() == 3.0 and metrics.recent_median(n=2) == 4.0


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_in_process_apps_work_with_testclient_and_asgi_transport():
    from fastapi.testclient import TestClient

    settings = ServiceSettings(models={"hrnet": BrightModel()}, options={"input_size": 64}, warmup=False)
    with TestClient(create_app(settings)) as client:
        assert _post(client).json()["model_used"] == "hrnet"
        assert client.get("/health").json()["status"] == "healthy"

    async def no_lifespan() -> int:  # the service starts lazily on the first request
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/api/v1/segment", files={"file": ("a.png", PNG)})
            return response.status_code

    assert asyncio.run(no_lifespan()) == 200


# ---- executor="process": inference in worker processes that can be killed ------------------------
def test_process_workers_serve_cancel_kill_and_survive_a_crash():
    from mlbench.service.fakes import DyingModel, HungryModel

    models = {"hrnet": BrightModel(), "slow": SlowModel(5.0, steps=100), "hang": SlowModel(30.0, steps=1),
              "dying": DyingModel(), "hungry": HungryModel(8.0)}
    settings = ServiceSettings(executor="process", models=models, options={"input_size": 64}, timeout_s=1.0,
                               kill_grace_s=0.2, max_wait_s=60, breaker_failures=0, warmup=False, worker_threads=1,
                               worker_memory_bytes=1 << 30)
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=90) as client:
        _wait_ready(client, 90)  # a worker process imports torch and mlbench: 5-15 s on this machine
        assert _post(client).json()["polygons"] and server.service.pipelines["hrnet"].model._forward_pre_hooks == {}
        queue = lambda: client.get("/metrics", params={"format": "json"}).json()["queue"]  # noqa: E731
        pid = queue()["worker_processes"][0]["pid"]
        assert _post(client, model="slow").status_code == 504  # stops at the next layer: no kill
        assert _post(client).status_code == 200 and queue()["killed_after_timeout"] == 0
        started = time.perf_counter()
        hang = _post(client, model="hang")  # one 30 s layer: only a kill stops it
        assert hang.status_code == 504 and "killed 0.2 s after the cancel" in hang.json()["message"]
        assert time.perf_counter() - started < 4 and _post(client).status_code == 200  # waits for the new process
        after_kill = queue()["worker_processes"][0]
        assert after_kill["killed_after_timeout"] == 1 and after_kill["pid"] != pid and len(after_kill["respawn_s"]) == 1
        died = _post(client, model="dying")
        assert died.status_code == 500 and died.json()["error"] == "worker_died" and "exit code 3" in died.json()["message"]
        assert _post(client).status_code == 200 and queue()["worker_processes"][0]["died"] == 1
        pid = queue()["worker_processes"][0]["pid"]
        hungry = _post(client, model="hungry")  # 8 GiB past a 1 GiB limit: refused in the worker, which goes on
        assert hungry.status_code == 500 and hungry.json()["error"] == "out_of_memory", hungry.text
        assert "ran out of memory in stage 'forward'" in hungry.json()["message"]
        assert _post(client).status_code == 200 and queue()["worker_processes"][0]["pid"] == pid


def test_process_workers_refuse_models_that_cannot_be_pickled():
    from mlbench.service.core import Service

    class Local(BrightModel):  # a class defined in a function cannot be pickled
        pass

    service = Service(ServiceSettings(executor="process", models={"m": Local()}))
    with pytest.raises(mb.OptionsError, match=r"\['m'\] cannot be pickled.*use executor='thread'"):
        asyncio.run(service.start())
    assert service.pool.worker_objects == [] and not service.loaded  # nothing was spawned
    with pytest.raises(mb.OptionsError, match="executor='threads' is unknown"):
        ServiceSettings(executor="threads")


def test_a_worker_process_that_cannot_start_is_reported():
    from mlbench.service.work import ProcessWorker, WorkerDied

    with pytest.raises(WorkerDied, match=r"did not start \(exit code 1"):
        ProcessWorker(b"not a pickle", "fixed", {}, start_timeout_s=60)


# ---- the service's own checkpoints: --weights-dir ------------------------------------------------
def test_weights_dir_serves_the_services_training_dicts_at_their_widths_and_1024(tmp_path):
    import argparse

    from mlbench.models import CbamConfig

    widths = CbamConfig((8, 16, 24, 32, 40), 80)  # not the bundled small widths: read from the tensors
    saved = mb.build_model("cbam_resunet", widths=widths, seed=4)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in saved.state_dict().items()}, "epoch": 7,
                "best_iou": 0.9, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "resunet_small_best_model.pth")
    settings = ServiceSettings.as_served(weights_dir=str(tmp_path))
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").json()["models_loaded"] == 1
        assert list(client.get("/api/v1/models").json()["models"]) == ["resunet_small"]
        assert _post(client, model="resunet_small").status_code == 200
        served = server.app.state.service.pipelines["resunet_small"].model
    assert served.config == widths and mb.card(served).input_size == 1024
    assert all(torch.equal(a, b) for a, b in zip(served.state_dict().values(), saved.state_dict().values()))


def test_weights_dir_without_the_services_files_is_refused(tmp_path):
    from mlbench.service.settings import weights_files

    (tmp_path / "model.pth").write_bytes(b"x")
    with pytest.raises(mb.OptionsError, match=r"holds none of the service's checkpoint files.*hrnet_best_model\.pth"
                                              r".*it holds \['model\.pth'\]"):
        weights_files(tmp_path)
    with pytest.raises(mb.OptionsError, match=r"is not a folder"):
        weights_files(tmp_path / "nothing")
