"""The individual checks of :func:`mlbench.checks.environment`: torch/CUDA, NVML GPUs, weights, a service,
and the requirements mlbench declares.

Each status returns a plain JSON-ready dict with a one-line ``summary`` and a ``problems`` list
of sentences (what is wrong, why, and what to do). Every CUDA and NVML call is guarded:
on a machine without a GPU they say so, and why, instead of raising.

The requirements are read from the installed package's metadata (``pyproject.toml``'s
``dependencies`` and ``optional-dependencies``, as pip recorded them), never copied by hand.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement as _ParsedRequirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

__all__ = ["torch_status", "gpu_status", "weights_status", "probe_service", "explain_nvml_error", "no_cuda_reason", "Requirement",
           "declared_requirements", "pyproject_requirement_lines", "requirement_for_module", "install_command", "IMPORT_NAMES"]

IMPORT_NAMES = {"pillow": "PIL.Image", "opencv-python-headless": "cv2", "scipy": "scipy.ndimage",
                "safetensors": "safetensors.torch", "nvidia-ml-py": "pynvml", "python-multipart": "python_multipart",
                "scikit-image": "skimage"}
"""The module imported to check a distribution where it is not the distribution's own name (a submodule
where that is the part that loads native code); any other ``a-b`` is checked as ``import a_b``."""

_MISMATCH = ("the NVIDIA kernel module and the user-space driver library (libnvidia-ml) have different versions, "
             "usually because the driver was upgraded and the old kernel module is still loaded; reboot, or unload "
             "and reload the modules (rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia; nvidia-smi); inside a "
             "container, the image must not ship its own driver libraries: let the NVIDIA container toolkit mount the host's")


def torch_status() -> dict[str, Any]:
    """torch's version, the CUDA/cuDNN it was built with, and whether CUDA works here."""
    import torch

    out: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "problems": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out["cuda_available"] = bool(torch.cuda.is_available())
            out["device_count"] = int(torch.cuda.device_count()) if out["cuda_available"] else 0
        except Exception as exc:  # a broken driver can raise here
            out["cuda_available"], out["device_count"], out["cuda_error"] = False, 0, f"{type(exc).__name__}: {exc}"
    if caught:
        out["cuda_warning"] = str(caught[0].message).strip().splitlines()[0]
    try:
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # cuDNN missing from a CUDA build
        out["cudnn"] = None
    if out["cuda_build"] is None:
        out["summary"] = "CPU-only build of torch: it never uses a GPU, whatever the machine has"
    elif out["cuda_available"]:
        out["summary"] = f"CUDA {out['cuda_build']} build, {out['device_count']} GPU(s) usable"
    else:
        reason = _unusable_reason(out)
        out["summary"] = f"CUDA {out['cuda_build']} build but CUDA is not usable: {reason}"
        out["problems"].append(f"torch is a CUDA build but cannot use CUDA ({reason}); see the gpu line for why, "
                               "or install the CPU wheel if this machine has no GPU")
    return out


def _unusable_reason(status: dict[str, Any]) -> str:
    """Why a CUDA build of torch cannot use CUDA: its warning or error, a hiding CUDA_VISIBLE_DEVICES, or no driver."""
    return (status.get("cuda_warning") or status.get("cuda_error") or _environment_gpu_hint()
            or "no NVIDIA driver or GPU visible to this process")


def no_cuda_reason(status: dict[str, Any] | None = None) -> str | None:
    """None when torch can use a CUDA device here, else why not, in one line (for scripts that skip).

    Parameters
    ----------
    status : dict, optional
        A :func:`torch_status` result; default: measured now.

    Examples
    --------
    >>> no_cuda_reason({"cuda_available": False, "cuda_build": None, "version": "2.13.0+cpu"})
    'no CUDA device: torch.cuda.is_available() is False (CPU build of torch 2.13.0)'
    """
    status = torch_status() if status is None else status
    if status.get("cuda_available"):
        return None
    if status.get("cuda_build") is None:
        why = f"CPU build of torch {str(status.get('version')).split('+')[0]}"
    else:
        why = f"torch {status.get('version')} is a CUDA {status['cuda_build']} build, but {_unusable_reason(status)}"
    return f"no CUDA device: torch.cuda.is_available() is False ({why})"


def explain_nvml_error(exc: BaseException) -> str:
    """A plain sentence for an NVML error: what it means here and what to do."""
    name, text = type(exc).__name__, str(exc)
    if "LibraryNotFound" in name or "Library Not Found" in text:
        devices = "no /dev/nvidia* device files either" if not list(Path("/dev").glob("nvidia*")) else "but /dev/nvidia* exist"
        return (f"no GPU: the NVIDIA driver library libnvidia-ml.so.1 is not on this machine ({name}; {devices}); "
                "either there is no NVIDIA GPU and driver here, or this container was started without --gpus all "
                "and the NVIDIA container toolkit")
    if "DriverNotLoaded" in name or "Driver Not Loaded" in text:
        return f"no GPU: the NVIDIA driver is installed but its kernel module is not loaded ({name}); run `sudo modprobe nvidia` or reboot"
    if "RmVersionMismatch" in name or "version mismatch" in text.lower():
        return f"GPU unusable: driver/library version mismatch ({name}): {_MISMATCH}"
    if "NoPermission" in name or "Insufficient Permissions" in text:
        return f"GPU not accessible: no permission to open /dev/nvidia* ({name}); add the user to the video group or run the container with --gpus"
    return f"GPU status unknown: NVML failed with {name}: {text}"


def gpu_status() -> dict[str, Any]:
    """Each GPU through NVML (name, driver, memory, processes), or why there is none."""
    try:
        import pynvml
    except ImportError as exc:
        return {"summary": f"GPU not checked: {exc} (pip install nvidia-ml-py)", "devices": [], "problems": []}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        summary = explain_nvml_error(exc)
        problems = [summary] if summary.startswith("GPU unusable") or "not loaded" in summary else []
        return {"summary": summary, "devices": [], "problems": problems, "error": type(exc).__name__}
    try:
        return _devices(pynvml)
    finally:
        pynvml.nvmlShutdown()


def _devices(pynvml: Any) -> dict[str, Any]:
    driver = _text(pynvml.nvmlSystemGetDriverVersion())
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            procs = [{"pid": p.pid, "used_mib": round((p.usedGpuMemory or 0) / 2**20, 1)}
                     for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except pynvml.NVMLError:
            procs = []
        devices.append({"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)), "driver": driver,
                        "memory_used_mib": round(memory.used / 2**20, 1), "memory_total_mib": round(memory.total / 2**20, 1),
                        "processes": procs})
    summary = f"{len(devices)} GPU(s), driver {driver}" if devices else f"NVML works (driver {driver}) but reports no GPU"
    return {"summary": summary, "devices": devices, "driver": driver, "problems": []}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def weights_status() -> dict[str, Any]:
    """The bundled weights: manifest present, every file present with the recorded sha256."""
    from mlbench.paths import data_dir, sha256_file

    folder = data_dir() / "weights"
    manifest = folder / "manifest.json"
    if not manifest.exists():
        problem = "bundled weights missing: data/weights/manifest.json not found; run `python -m mlbench.train` or restore data/weights"
        return {"summary": problem, "models": {}, "problems": [problem]}
    models, problems = {}, []
    for name, entry in json.loads(manifest.read_text()).get("models", {}).items():
        path = folder / entry["file"]
        actual = sha256_file(path) if path.exists() else None
        ok = actual == entry.get("sha256")
        models[name] = {"file": entry["file"], "sha256": actual, "ok": ok}
        if not ok:
            problems.append(f"weights {entry['file']}: " + ("missing" if actual is None else "sha256 differs from the manifest")
                            + "; restore data/weights from git or retrain")
    summary = f"{sum(m['ok'] for m in models.values())}/{len(models)} bundled weight file(s) match their sha256"
    return {"summary": summary, "models": models, "problems": problems}


def probe_service(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET ``url/health``: status code, time, and the body's fields, or the error."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/health"
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 (user-given URL)
            body = response.read(1 << 16).decode("utf-8", "replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        return _service(url, False, f"HTTP {exc.code} {exc.reason} from {target}", started, status=exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return _service(url, False, f"{target} did not answer: {reason}", started)
    try:
        data = json.loads(body)
    except ValueError:
        data = {"body": body[:200]}
    return _service(url, status == 200, "" if status == 200 else f"HTTP {status}", started, status=status, health=data)


def _service(url: str, ok: bool, error: str, started: float, **extra: Any) -> dict[str, Any]:
    seconds = round(time.perf_counter() - started, 3)
    health = extra.get("health", {})
    summary = (f"{url} healthy: status={health.get('status')}, models_loaded={health.get('models_loaded')}, "
               f"gpu_available={health.get('gpu_available')}" if ok else f"{url} NOT healthy: {error}")
    return {"url": url, "ok": ok, "error": error, "seconds": seconds, "summary": summary, **extra}


def _environment_gpu_hint() -> str:
    """CUDA_VISIBLE_DEVICES set to hide every GPU is a common surprise."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU" if value in ("", "-1") else ""


@dataclass(frozen=True)
class Requirement:
    """One package mlbench declares: the distribution, the module that checks it, its range, its extra.

    ``extra`` is ``""`` for a core dependency, else the extra(s) that pull it in (``"gpu, bench"``).
    """

    name: str
    module: str
    specifier: str
    extra: str


def declared_requirements() -> tuple[Requirement, ...]:
    """The requirements mlbench declares, extras included, one per package, core ones first.

    Read from the installed metadata (``importlib.metadata.requires("mlbench")``); for a checkout
    used without ``pip install -e .`` (on ``sys.path`` only), from the ``pyproject.toml`` beside the
    package. Empty when neither can be read. A requirement whose marker excludes this machine
    (``sys_platform == "win32"``) is left out.
    """
    found: dict[str, Requirement] = {}
    lines, extras = _requirement_lines()
    for line in lines:
        parsed = _ParsedRequirement(line)
        groups = [extra for extra in ("", *extras) if _applies(parsed.marker, extra)]
        if not groups:
            continue
        key = canonicalize_name(parsed.name)
        new = Requirement(parsed.name, IMPORT_NAMES.get(key, key.replace("-", "_")), _spec_text(parsed.specifier),
                          "" if "" in groups else ", ".join(groups))
        found[key] = _merge(found[key], new) if key in found else new
    return tuple(sorted(found.values(), key=lambda r: bool(r.extra)))


def _applies(marker: Marker | None, extra: str) -> bool:
    """Whether a requirement belongs to ``extra`` (``""``: the core) on this machine."""
    return not extra if marker is None else marker.evaluate({"extra": extra})


def _requirement_lines() -> tuple[list[str], list[str]]:
    """Requirement strings (``'fastapi>=0.164; extra == "service"'``) and the extras' names."""
    try:
        return list(metadata.requires("mlbench") or []), list(metadata.metadata("mlbench").get_all("Provides-Extra") or [])
    except metadata.PackageNotFoundError:
        return pyproject_requirement_lines(Path(__file__).resolve().parents[2] / "pyproject.toml")


def pyproject_requirement_lines(path: Path) -> tuple[list[str], list[str]]:
    """The same strings from a ``pyproject.toml`` (``([], [])`` when it cannot be read, or before Python 3.11).

    Parameters
    ----------
    path : Path
        A ``pyproject.toml`` with a ``[project]`` table.

    Returns
    -------
    tuple of (list of str, list of str)
        Requirement strings, optional ones with ``; extra == "name"`` appended, and the extras' names.
    """
    try:
        import tomllib

        project = tomllib.loads(Path(path).read_text())["project"]
    except (ImportError, OSError, KeyError, ValueError):
        return [], []
    optional = project.get("optional-dependencies", {})
    lines = list(project.get("dependencies", []))
    lines += [f'{line}; extra == "{extra}"' for extra, group in optional.items() for line in group]
    return lines, list(optional)


def _merge(old: Requirement, new: Requirement) -> Requirement:
    """One package listed twice (core and an extra, or two extras): the ranges joined, core wins."""
    spec = old.specifier if old.specifier == new.specifier else _spec_text(SpecifierSet(old.specifier) & SpecifierSet(new.specifier))
    extras = "" if not old.extra or not new.extra else ", ".join(dict.fromkeys((old.extra + ", " + new.extra).split(", ")))
    return Requirement(old.name, old.module, spec, extras)


def _spec_text(spec: SpecifierSet) -> str:
    """``>=4.66,<5``: lower bounds first (packaging sorts them as text, ``<5,>=4.66``)."""
    return ",".join(sorted((str(s) for s in spec), key=lambda s: (not s.startswith((">", "~", "=")), s)))


def requirement_for_module(module: str, requirements: tuple[Requirement, ...] | None = None) -> Requirement | None:
    """The declared requirement that provides ``module`` (``fastapi.responses`` -> fastapi), or None.

    Parameters
    ----------
    module : str
        A module name as an ``ImportError`` gives it (``ModuleNotFoundError.name``).
    requirements : tuple of Requirement, optional
        Where to look; default :func:`declared_requirements`.
    """
    top = module.split(".")[0]
    for requirement in declared_requirements() if requirements is None else requirements:
        if top in (requirement.module.split(".")[0], canonicalize_name(requirement.name).replace("-", "_")):
            return requirement
    return None


def install_command(requirement: Requirement) -> str:
    """The pip command that installs a requirement: the extra for an optional one, the range for a core one.

    >>> install_command(Requirement("fastapi", "fastapi", ">=0.164", "service"))
    "pip install 'mlbench[service]'"
    >>> install_command(Requirement("tqdm", "tqdm", ">=4.66,<5", ""))
    "pip install 'tqdm>=4.66,<5'"
    """
    if requirement.extra:
        return f"pip install 'mlbench[{requirement.extra.split(', ')[0]}]'"
    return f"pip install '{requirement.name}{requirement.specifier}'"
