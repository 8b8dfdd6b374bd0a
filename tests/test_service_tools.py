"""The service's side routes: shape metrics, GPU monitoring (NVML mocked for the GPU branch) and
the metrics export that writes only inside its folder; and the refusals of the service's helpers."""

from __future__ import annotations

import asyncio
import json
import sys
import types

import httpx
import pytest
import torch

import mlbench as mb
from mlbench.service import ServiceSettings, create_app
from mlbench.service.failures import served_open, unknown_model
from mlbench.service.fakes import BrightModel, make_png
from mlbench.service.limits import Refusal, check_extension
from mlbench.service.monitoring import GpuMonitor, nvml_readings
from mlbench.service.shape_metrics import ContourError, METRIC_NAMES, shape_metrics, zero_metrics

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100]]


def _call(settings: ServiceSettings, method: str, path: str, **kwargs) -> httpx.Response:
    """One request to an in-process app (no lifespan: these routes need no model)."""
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def _settings(preset: str = "fixed", **changes) -> ServiceSettings:
    common = dict(models={"hrnet": BrightModel()}, warmup=False, **changes)
    return ServiceSettings.as_served(**common) if preset == "as_served" else ServiceSettings(**common)


# ---- shape metrics -----------------------------------------------------------------------------------
def test_shape_metrics_of_known_shapes():
    square = shape_metrics(SQUARE)
    assert list(square) == list(METRIC_NAMES) and square["Area"] == 10000.0 and square["FeretDiameterMax"] == 100.0
    holed = shape_metrics(SQUARE, [[[40, 40], [60, 40], [60, 60], [40, 60]]])
    assert holed["Area"] == 9600.0 and holed["Perimeter"] == 400.0 and holed["Compactness"] == square["Compactness"]
    swallowed = shape_metrics(SQUARE, [[[-10, -10], [110, -10], [110, 110], [-10, 110]]])
    assert swallowed["Area"] < 0 and swallowed["Circularity"] == swallowed["EquivalentDiameter"] == 0.0
    assert zero_metrics() == dict.fromkeys(METRIC_NAMES, 0.0)


@pytest.mark.parametrize("contour, holes, match, field", [
    ([], [], r"contour must be a non-empty list of \[x, y\] pairs .* shape \(0,\)", "contour"),
    ([[1, 2, 3]], [], r"contour must be .* got an array of shape \(1, 3\); send e.g.", "contour"),
    ([[1, 2], [3]], [], r"contour must be a list of \[x, y\] pairs of numbers \(", "contour"),
    ([[0, 0], [float("nan"), 1]], [], "finite numbers", "contour"),
    (SQUARE, [[[1, 1]], [[2]]], r"holes\[1\] must be", "holes"),
])
def test_shape_metrics_refuse_points_that_are_no_polygon(contour, holes, match, field):
    with pytest.raises(ContourError, match=match) as err:
        shape_metrics(contour, holes)
    assert err.value.field == field and isinstance(err.value, mb.OptionsError)


def test_metrics_routes_answer_bad_contours_per_preset():
    bad = {"contour": [], "holes": []}
    fixed = _call(_settings(), "POST", "/api/calculate-metrics", json=bad)
    assert fixed.status_code == 422 and fixed.json()["errors"][0]["loc"] == ["body", "contour"]
    assert fixed.json()["error"] == "invalid_contour" and "non-empty list" in fixed.json()["detail"]
    served = _call(_settings("as_served"), "POST", "/api/calculate-metrics", json=bad)
    assert served.status_code == 500 and served.json()["detail"].startswith("Failed to calculate metrics: contour must")
    batch = _call(_settings(), "POST", "/api/batch-calculate-metrics", json=[bad, {"contour": SQUARE}])
    assert batch.json()[0] == zero_metrics() and batch.json()[1]["Area"] == 10000.0


# ---- monitoring without a GPU (this machine) and with NVML and CUDA mocked ---------------------------
def test_nvml_readings_fall_back_without_nvml(monkeypatch):
    assert nvml_readings() == (0.0, None, None)  # no driver here: NVMLError_LibraryNotFound
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert nvml_readings() == (0.0, None, None)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA and NVML that report one 16 GiB GPU with 14 GiB allocated."""
    state = {"allocated": 14 * 1024 ** 3, "emptied": 0}

    class NVMLError(Exception):
        pass

    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=37),
        nvmlDeviceGetTemperature=lambda handle, sensor: 61,
        nvmlDeviceGetPowerUsage=lambda handle: (_ for _ in ()).throw(NVMLError("Not Supported")))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(name="Fake H200", total_memory=16 * 1024 ** 3))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: state["allocated"] + 1024 ** 3)

    def empty_cache() -> None:
        state["emptied"] += 1
        state["allocated"] -= 1024 ** 3

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    return state


def test_gpu_branch_reads_torch_and_nvml(fake_gpu):
    monitor = GpuMonitor()
    status = monitor.status()
    assert status["status"] == "active" and status["device"] == {"id": 0, "name": "Fake H200"}
    assert status["memory"] == {"allocated_mb": 14336.0, "reserved_mb": 15360.0, "free_mb": 2048.0,
                                "total_mb": 16384.0, "usage_percent": 87.5}
    assert status["utilization"] == {"gpu_percent": 37.0, "temperature_celsius": 61.0, "power_watts": None}
    pressure = monitor.memory_pressure()
    assert pressure["under_pressure"] and pressure["recommendation"] == "Reduce batch size"
    monitor.record("hrnet", 0.5, True)
    monitor.record("hrnet", 0.25, False, "boom")
    batches = monitor.batch_metrics()
    assert batches["statistics"] == {"total_batches": 2, "successful": 1, "failed": 1, "success_rate": 50.0,
                                     "avg_throughput_imgs_sec": 2.0, "avg_inference_time_ms": 500.0}
    assert batches["metrics"][1]["error"] == "boom" and batches["metrics"][0]["gpu_utilization"] == 37.0
    summary = monitor.summary()
    assert summary["status"] == "monitoring" and summary["device_name"] == "Fake H200"
    assert summary["total_images_processed"] == 1 and summary["batch_success_rate"] == 50.0
    cleared = monitor.clear_cache()
    assert cleared["status"] == "success" and cleared["memory_freed_mb"] == 1024.0 and fake_gpu["emptied"] == 1


def test_gpu_routes_answer_from_the_mocked_device(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    body = _call(_settings("as_served"), "GET", "/api/v1/monitoring/gpu/status").json()
    assert body["gpu_present"] is True and body["memory"]["usage_percent"] == 87.5
    health = _call(_settings("as_served"), "GET", "/api/v1/health").json()
    assert health["device"] == {"gpu_available": True, "device_count": 1, "device_name": "Fake H200"}


# ---- export-metrics: only inside its folder ------------------------------------------------------------
def _export(settings, filepath=None) -> httpx.Response:
    return _call(settings, "POST", "/api/v1/monitoring/gpu/export-metrics",
                 params={"filepath": filepath} if filepath is not None else None)


def test_export_writes_inside_its_folder(tmp_path):
    settings = _settings(metrics_export_dir=str(tmp_path / "exports"))
    named = _export(settings, "run1.json").json()
    assert named["status"] == "success" and named["filepath"] == str(tmp_path / "exports" / "run1.json")
    assert json.loads((tmp_path / "exports" / "run1.json").read_text())["summary"] == {"status": "no_data",
                                                                                       "gpu_available": False}
    default = _export(settings).json()["filepath"]
    assert default.startswith(str(tmp_path / "exports" / "gpu_metrics_")) and default.endswith(".json")


def test_export_is_off_without_a_folder():
    response = _export(_settings(), "x.json")
    assert response.status_code == 501 and "metrics_export_dir=FOLDER" in response.json()["detail"]
    with pytest.raises(Refusal, match="switched off"):
        GpuMonitor().export("x.json")


@pytest.mark.parametrize("filepath, match", [
    ("/etc/passwd", "is an absolute path"),
    ("a\0b.json", "holds a NUL byte"),
    (".", "names a folder"),
    ("../outside.json", r"climbs out with '\.\.'"),
    ("sub/../../outside.json", r"climbs out with '\.\.'"),
    ("link/x.json", "leaves the export folder through a symbolic link"),
    ("evil.json", "leaves the export folder through a symbolic link"),
    ("existing_dir", "names a folder"),
    ("missing/x.json", "a sub-folder that does not exist"),
])
def test_export_refuses_every_path_out_of_its_folder(tmp_path, filepath, match):
    folder, outside = tmp_path / "exports", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside)
    (folder / "evil.json").symlink_to(outside / "target.json")
    (folder / "existing_dir").mkdir()
    with pytest.raises(Refusal, match=match):
        GpuMonitor(str(folder)).export(filepath)
    response = _export(_settings(metrics_export_dir=str(folder)), filepath)
    assert response.status_code == 400 and response.json()["error"] == "export_path_refused"
    assert "send a plain relative name" in response.json()["detail"]
    assert list(outside.iterdir()) == [] and not (tmp_path / "outside.json").exists()


# ---- the refusals of the service's helpers ---------------------------------------------------------------
def test_served_helpers_refuse_with_the_services_texts():
    with pytest.raises(Refusal, match=r"^Invalid image file: cells\.tif\. Supported formats: PNG, JPG, JPEG, TIFF"):
        check_extension("cells.tif", (".png", ".jpg", ".jpeg", ".tiff", ".bmp"), batch=True)
    with pytest.raises(Refusal, match=r"^Segmentation failed: cannot identify image file <_io\.BytesIO") as err:
        served_open(b"<html></html>")
    assert err.value.status == 500 and err.value.item_error.startswith("cannot identify image file")
    served_open(make_png(32))  # an image passes
    refusal = unknown_model("unet", ["resunet_small", "hrnet"], "as_served")
    assert refusal.message == "Segmentation failed: Model unet not available. Choose from: ['hrnet', 'resunet_small']"
    assert unknown_model("unet", ["hrnet"], "fixed").status == 422


def test_a_failed_forward_answers_as_the_service_wrapped_it():
    """As served, a forward that raised became ``detail: {error: "Inference failed", message, model, ...}``."""
    from mlbench.service.fakes import FlakyModel

    png = make_png(48)
    flaky = lambda: dict(models={"hrnet": FlakyModel(failing=True)}, options={"input_size": 32})  # noqa: E731
    upload = {"files": {"file": ("a.png", png)}}
    detail = _call(ServiceSettings.as_served(**flaky()), "POST", "/api/v1/segment", **upload).json()["detail"]
    assert detail["error"] == "Inference failed" and detail["model"] == "hrnet" and detail["processing_time"] >= 0
    assert detail["message"] == "Inference failed for hrnet: injected failure on call 1 (FlakyModel)"
    batch = _call(ServiceSettings.as_served(**flaky()), "POST", "/api/v1/batch-segment",
                  files=[("files", ("a.png", png))]).json()
    assert batch["failed_count"] == 1 and batch["results"][0]["error"] == "Inference failed"
    fixed = _call(ServiceSettings(**flaky(), warmup=False), "POST", "/api/v1/segment", **upload)
    assert fixed.status_code == 500 and fixed.json()["error"] == "inference_failed"
    assert fixed.json()["detail"].startswith("Segmentation failed: stage 'forward' failed for model 'hrnet': Runtime")
