"""The environment doctor: this CPU machine, broken imports in subprocesses, NVML errors, a service probe."""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mlbench.doctor import EnvReport, PackageCheck, _version_ok, add_doctor_command, check_import, check_imports, doctor
from mlbench.doctor_checks import explain_nvml_error, gpu_status, probe_service, torch_status


def _env_with(path) -> dict:
    return {**os.environ, "PYTHONPATH": str(path)}


def test_doctor_on_this_machine_without_imports():
    report = doctor(imports=False)
    assert report.torch["version"].startswith("2.")
    assert report.cpu["cores"] >= 1 and report.cpu["ram_total_gib"] > 0
    names = [p.name for p in report.packages]
    assert names[:3] == ["torch", "numpy", "pillow"] and all(p.imports is None for p in report.packages)
    data = json.loads(json.dumps(report.to_dict(), default=str))
    assert data["packages"][0]["name"] == "torch" and "problems" in data
    assert repr(report).splitlines()[1].startswith("python   3.")


def test_every_gpu_line_says_why_there_is_none_here():
    torch_info, gpu = torch_status(), gpu_status()
    if torch_info["cuda_available"]:
        pytest.skip("this machine has a usable GPU (the GPU path is checked by bench/gpu_doctor.py)")
    assert torch_info["cuda_available"] is False
    assert "CPU-only build" in torch_info["summary"] or "CUDA is not usable" in torch_info["summary"]
    assert gpu["devices"] == [] and gpu["summary"].startswith(("no GPU", "GPU not checked", "GPU unusable"))


def test_nvml_errors_are_explained():
    mismatch = type("NVMLError_LibRmVersionMismatch", (Exception,), {})("RM has detected an NVML/RM version mismatch.")
    assert "reboot" in explain_nvml_error(mismatch) and "container toolkit" in explain_nvml_error(mismatch)
    missing = type("NVMLError_LibraryNotFound", (Exception,), {})("NVML Shared Library Not Found")
    assert explain_nvml_error(missing).startswith("no GPU: the NVIDIA driver library libnvidia-ml.so.1")
    not_loaded = type("NVMLError_DriverNotLoaded", (Exception,), {})("Driver Not Loaded")
    assert "modprobe nvidia" in explain_nvml_error(not_loaded)
    other = type("NVMLError_Unknown", (Exception,), {})("boom")
    assert explain_nvml_error(other) == "GPU status unknown: NVML failed with NVMLError_Unknown: boom"


def test_missing_and_broken_imports_in_a_subprocess(tmp_path):
    assert check_import("json") == (True, "")
    assert check_import("surely_not_installed_xyz") == (False, "ModuleNotFoundError: No module named 'surely_not_installed_xyz'")
    (tmp_path / "brokennative.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file" * 10)
    ok, error = check_import("brokennative", env=_env_with(tmp_path))
    assert not ok and error.startswith("ImportError") and "brokennative" in error
    (tmp_path / "fakegl.py").write_text("raise ImportError('libGL.so.1: cannot open shared object file: No such file or directory')")
    ok, error = check_import("fakegl", env=_env_with(tmp_path))
    assert error == "ImportError: libGL.so.1: cannot open shared object file: No such file or directory"


def test_check_imports_isolates_a_crashing_module(tmp_path, monkeypatch):
    (tmp_path / "crasher.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    results = check_imports(["json", "crasher", "email"])
    assert results["json"] == (True, "")
    assert results["crasher"] == (False, "the interpreter was killed by signal 9 while importing crasher")
    assert results["email"][0] is True


def test_version_ranges():
    assert _version_ok("2.13.0+cpu", ">=2.6") and not _version_ok("2.5.1", ">=2.6") and not _version_ok(None, ">=1")


def test_problems_name_the_package_and_the_fix():
    broken = PackageCheck("opencv-python", "cv2", ">=4.8", "", "4.9.0", True, False,
                          "ImportError: libGL.so.1: cannot open shared object file", "use opencv-python-headless")
    report = EnvReport("3.11", "Linux", {"problems": []}, {"problems": []}, {}, (broken,), {"problems": []})
    assert report.problems == ["opencv-python: ImportError: libGL.so.1: cannot open shared object file -> use opencv-python-headless"]
    assert not report.ok and "import FAILS" in repr(broken)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"status": "healthy", "models_loaded": 3, "gpu_available": False}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_service_probe():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        found = probe_service(url)
        assert found["ok"] and found["health"]["models_loaded"] == 3 and "healthy" in found["summary"]
    finally:
        server.shutdown()
        server.server_close()
    gone = probe_service(url, timeout=2)
    assert not gone["ok"] and "did not answer" in gone["error"]


def test_cli_json(capsys):
    parser = argparse.ArgumentParser()
    add_doctor_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--json", "--no-imports"])
    status = args.run(args)
    data = json.loads(capsys.readouterr().out)
    assert status == (0 if data["ok"] else 1) and data["torch"]["version"].startswith("2.")
