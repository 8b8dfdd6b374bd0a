"""The environment doctor: this CPU machine, broken imports in subprocesses, NVML errors, a service probe."""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from importlib import metadata
from pathlib import Path

import pytest

import mlbench.checks.environment_probes as probes
from mlbench.checks.environment import (
    EnvReport,
    PackageCheck,
    _version_ok,
    add_doctor_command,
    check_import,
    check_imports,
    check_packages,
    doctor,
)
from mlbench.checks.environment_probes import (
    Requirement,
    declared_requirements,
    explain_nvml_error,
    gpu_status,
    install_command,
    no_cuda_reason,
    probe_service,
    pyproject_requirement_lines,
    requirement_for_module,
    torch_status,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _env_with(path) -> dict:
    return {**os.environ, "PYTHONPATH": str(path)}


def test_doctor_on_this_machine_without_imports():
    report = doctor(imports=False)
    assert report.torch["version"].startswith("2.")
    assert report.cpu["cores"] >= 1 and report.cpu["ram_total_gib"] > 0
    names = [p.name for p in report.packages]
    assert names[:3] == ["torch", "numpy", "pillow"] and all(p.imports is None for p in report.packages)
    assert {"tqdm", "packaging", "fastapi", "distributed", "nvidia-ml-py"} <= set(names)
    data = json.loads(json.dumps(report.to_dict(), default=str))
    assert data["packages"][0]["name"] == "torch" and "problems" in data
    assert report.text().splitlines()[1].startswith("python   3.")


def test_the_report_is_its_text_not_a_dataclass_dump():
    report = doctor(imports=False)
    assert repr(report) == str(report) == report.text() and report.text().startswith("EnvReport: ")
    assert "EnvReport(python=" not in repr(report) and "PackageCheck(" not in repr(report)
    printed = []
    report._repr_pretty_(type("Printer", (), {"text": lambda self, t: printed.append(t)})(), False)
    assert printed == [report.text()]
    tqdm_line = next(line for line in report.text().splitlines() if line.strip().startswith("tqdm "))
    assert "need >=4.66,<5 " in tqdm_line


def test_requirements_are_read_from_the_package_metadata_with_extras():
    found = {r.name: r for r in declared_requirements()}
    assert found["torch"] == Requirement("torch", "torch", ">=2.6", "")
    assert found["fastapi"].extra == "service" and found["ipywidgets"].extra == "lab"
    assert found["distributed"] == Requirement("distributed", "distributed", ">=2023.1,<2027", "dask")
    assert found["nvidia-ml-py"] == Requirement("nvidia-ml-py", "pynvml", ">=12.0", "gpu, bench")
    assert found["pillow"].module == "PIL.Image" and found["python-multipart"].module == "python_multipart"
    core = [r.name for r in declared_requirements() if not r.extra]
    assert core == [r.name for r in declared_requirements()][: len(core)]  # core first


def test_installed_metadata_matches_pyproject():
    """The installed metadata is pyproject.toml as pip recorded it: reinstall (pip install -e .) when this fails."""
    lines, extras = pyproject_requirement_lines(PYPROJECT)
    assert sorted(extras) == sorted(metadata.metadata("mlbench").get_all("Provides-Extra"))
    from packaging.requirements import Requirement as Parsed

    assert sorted(str(Parsed(x)) for x in lines) == sorted(str(Parsed(x)) for x in metadata.requires("mlbench"))


def test_a_checkout_without_metadata_reads_pyproject(monkeypatch):
    expected = declared_requirements()

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(probes.metadata, "requires", not_installed)
    assert declared_requirements() == expected
    assert pyproject_requirement_lines(PYPROJECT.parent / "no-such.toml") == ([], [])


def test_markers_merges_and_the_doctor_without_requirements(monkeypatch):
    lines = ['bar>=2', 'bar>=1; extra == "x"', 'baz; extra == "x"', 'baz<3; extra == "y"',
             'win-only; sys_platform == "nonexistent"', 'Some_Pkg~=1.4; extra == "y"']
    monkeypatch.setattr(probes, "_requirement_lines", lambda: (lines, ["x", "y"]))
    assert declared_requirements() == (Requirement("bar", "bar", ">=1,>=2", ""), Requirement("baz", "baz", "<3", "x, y"),
                                       Requirement("Some_Pkg", "some_pkg", "~=1.4", "y"))
    assert install_command(declared_requirements()[1]) == "pip install 'mlbench[x]'"
    assert install_command(declared_requirements()[0]) == "pip install 'bar>=1,>=2'"
    monkeypatch.setattr(probes, "_requirement_lines", lambda: ([], []))
    (check,) = check_packages(imports=False)
    assert check.name == "mlbench" and not check.ok and "cannot be read" in check.error


def test_module_to_requirement():
    assert requirement_for_module("fastapi.responses").extra == "service"
    assert requirement_for_module("PIL").name == "pillow" and requirement_for_module("pynvml").extra == "gpu, bench"
    assert requirement_for_module("starlette") is None


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
    assert _version_ok("2026.8.0", ">=2023.1,<2027") and not _version_ok("2027.1.0", ">=2023.1,<2027")
    assert not _version_ok("4.66.0", "<4.66") and _version_ok("4.9.1", "~=4.8") and not _version_ok("5.0", "~=4.8")
    assert not _version_ok("1.2", "!=1.2") and _version_ok("1.2.0rc1", ">=1.1") and _version_ok("0.1", "")
    assert not _version_ok("not-a-version", ">=1")


def test_a_version_outside_its_range_is_a_problem_with_the_range_to_install():
    requirement = Requirement("tqdm", "tqdm", ">=4.66,<5", "")
    from mlbench.checks.environment import _package

    check = _package(requirement, "5.1.0", (True, ""))
    assert not check.ok and check.fix == "pip install 'tqdm>=4.66,<5'"
    missing = _package(Requirement("fastapi", "fastapi", ">=0.164", "service"), None, None)
    assert missing.ok and missing.error == "fastapi is not installed (needed for the 'service' extra)"
    core = _package(requirement, None, None)
    assert not core.ok and core.fix.startswith("pip install 'tqdm>=4.66,<5' (it is not installed in ")


def test_problems_name_the_package_and_the_fix():
    broken = PackageCheck("opencv-python", "cv2", ">=4.8", "", "4.9.0", True, False,
                          "ImportError: libGL.so.1: cannot open shared object file", "use opencv-python-headless")
    report = EnvReport("3.11", "Linux", {"problems": []}, {"problems": []}, {}, (broken,), {"problems": []})
    assert report.problems == ["opencv-python: ImportError: libGL.so.1: cannot open shared object file -> use opencv-python-headless"]
    assert not report.ok and "import FAILS" in repr(broken) and repr(broken) == str(broken) == broken.text()


def test_no_cuda_reason():
    assert no_cuda_reason({"cuda_available": True}) is None
    assert no_cuda_reason({"cuda_available": False, "cuda_build": None, "version": "2.13.0+cpu"}) == (
        "no CUDA device: torch.cuda.is_available() is False (CPU build of torch 2.13.0)")
    built = {"cuda_available": False, "cuda_build": "12.8", "version": "2.13.0+cu128", "cuda_warning": "Found no NVIDIA driver"}
    assert no_cuda_reason(built) == ("no CUDA device: torch.cuda.is_available() is False (torch 2.13.0+cu128 is a "
                                     "CUDA 12.8 build, but Found no NVIDIA driver)")


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
