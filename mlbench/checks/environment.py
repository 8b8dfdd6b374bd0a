"""``mb.doctor()``: is this environment able to run the pipeline, and if not, why?

Python and platform; torch's build (CUDA and cuDNN compiled in) and whether CUDA works;
each GPU through NVML (name, driver, memory, processes) or a plain sentence saying why
there is none; CPU and RAM; every package mlbench declares (core and extras, read from its
installed metadata) against its PEP 440 range, each import tried in a fresh subprocess so a
broken native library is reported with its exact error; the bundled weights against their checksums; optionally a service's ``/health``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from mlbench.checks.environment_probes import (
    Requirement,
    declared_requirements,
    gpu_status,
    install_command,
    probe_service,
    torch_status,
    weights_status,
)
from mlbench.findings import ReportText

__all__ = ["EnvReport", "PackageCheck", "doctor", "check_import", "check_imports", "check_packages", "add_doctor_command"]


@dataclass(frozen=True, repr=False)
class PackageCheck(ReportText):
    """One required package: installed version vs range, and whether it imports. The text is one line."""

    name: str
    module: str
    required: str
    extra: str
    version: str | None
    version_ok: bool
    imports: bool | None
    error: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.version_ok and self.imports is not False

    def text(self) -> str:
        """``name  version  need range  imports  ok``, and the error and fix when not ok."""
        state = "ok" if self.ok else "PROBLEM"
        imported = {True: "imports", False: "import FAILS", None: "import not tried"}[self.imports]
        line = f"{self.name:<24} {self.version or 'not installed':<12} need {self.required or 'any':<14} {imported:<17} {state}"
        return line + (f"\n    error: {self.error}\n    fix: {self.fix}" if not self.ok else "")


@dataclass(frozen=True, repr=False)
class EnvReport(ReportText):
    """What :func:`doctor` found. ``text()`` (also ``str``, ``repr``) is the report; ``.to_dict()`` for JSON."""

    python: str
    platform: str
    torch: dict
    gpu: dict
    cpu: dict
    packages: tuple = ()
    weights: dict = field(default_factory=dict)
    service: dict | None = None

    @property
    def problems(self) -> list[str]:
        """Every finding that needs action, one sentence each."""
        found = [f"{p.name}: {p.error or 'version ' + str(p.version) + ' outside ' + p.required} -> {p.fix}"
                 for p in self.packages if not p.ok and not (p.extra and p.version is None)]
        found += list(self.torch.get("problems", [])) + list(self.gpu.get("problems", [])) + list(self.weights.get("problems", []))
        if self.service is not None and not self.service.get("ok"):
            found.append(f"service {self.service.get('url')}: {self.service.get('error')}")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready data, with ``problems`` and ``ok``."""
        out = asdict(self)
        out["packages"] = [asdict(p) | {"ok": p.ok} for p in self.packages]
        out["problems"], out["ok"] = self.problems, self.ok
        return out

    def text(self) -> str:
        """The report: python, torch, GPUs, CPU, one line per package, weights, service, problems."""
        t, g, c = self.torch, self.gpu, self.cpu
        lines = [f"EnvReport: {'OK' if self.ok else str(len(self.problems)) + ' problem(s)'}",
                 f"python   {self.python} on {self.platform}",
                 f"torch    {t.get('version')} (CUDA build: {t.get('cuda_build') or 'none, CPU-only build'}, "
                 f"cuDNN: {t.get('cudnn') or 'none'}); CUDA usable: {t.get('cuda_available')}",
                 f"         {t.get('summary', '')}", f"gpu      {g.get('summary')}"]
        lines += [f"  GPU {d['index']}: {d['name']}, driver {d['driver']}, {d['memory_used_mib']:.0f}/{d['memory_total_mib']:.0f} MiB used, "
                  f"{len(d['processes'])} process(es)" for d in g.get("devices", [])]
        lines.append(f"cpu      {c.get('cores')} core(s), RAM {c.get('ram_total_gib', 0):.1f} GiB total, {c.get('ram_available_gib', 0):.1f} GiB available")
        lines.append("packages:")
        lines += ["  " + p.text().replace("\n", "\n  ") for p in self.packages]
        lines.append(f"weights  {self.weights.get('summary', 'not checked')}")
        if self.service is not None:
            lines.append(f"service  {self.service.get('summary')}")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check_import(module: str, *, python: str | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[bool, str]:
    """Try ``import module`` in a fresh interpreter; return (ok, the last line of the error).

    A fresh process means a crash (a missing ``libGL.so.1``, an ABI clash, a segfault)
    cannot take this process down, and a module already imported here does not hide it.
    """
    try:
        proc = subprocess.run([python or sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=timeout, env=env if env is not None else dict(os.environ))
    except subprocess.TimeoutExpired:
        return False, f"import {module} did not finish within {timeout:.0f} s"
    if proc.returncode == 0:
        return True, ""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    if proc.returncode < 0:
        return False, f"the interpreter was killed by signal {-proc.returncode} while importing {module}"
    return False, lines[-1] if lines else f"exit status {proc.returncode}"


_IMPORT_ALL = """
import importlib, json, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        error = ""
    except BaseException as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        error = type(exc).__name__ + (": " + lines[0] if lines else "")
    print(json.dumps([name, error]), flush=True)
"""


def check_imports(modules: list[str], *, python: str | None = None, timeout: float = 300) -> dict[str, tuple[bool, str]]:
    """Try each import in one fresh interpreter; modules left unanswered (a crash) are retried alone.

    Returns ``{module: (ok, error line)}``. One process for all keeps this to about one
    ``import torch``; a module that kills the interpreter is then isolated by :func:`check_import`.
    """
    results: dict[str, tuple[bool, str]] = {}
    try:
        proc = subprocess.run([python or sys.executable, "-c", _IMPORT_ALL, *modules], capture_output=True, text=True,
                              timeout=timeout)
        for line in proc.stdout.splitlines():
            name, error = json.loads(line)
            results[name] = (not error, error)
    except (subprocess.TimeoutExpired, ValueError):
        pass
    for name in modules:
        if name not in results:
            results[name] = check_import(name, python=python, timeout=timeout)
    return results


def _version_ok(version: str | None, required: str) -> bool:
    """Whether an installed version is inside a PEP 440 range (``>=2023.1,<2027``, ``~=4.8``, ``!=1.2``).

    A local label (``2.13.0+cpu``) is ignored; an unparsable version is outside every range.
    """
    if version is None:
        return False
    try:
        return SpecifierSet(required).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _fix_for(requirement: Requirement, version: str | None, error: str) -> str:
    from mlbench.failures._triage import triage

    if version is None:
        return f"{install_command(requirement)} (it is not installed in {sys.prefix})"
    if error:
        return triage(error, casebook=False).fix
    return f"pip install '{requirement.name}{requirement.specifier}'"


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _package(requirement: Requirement, version: str | None, result: tuple[bool, str] | None) -> PackageCheck:
    name, extra = requirement.name, requirement.extra
    ok_import, error = result if result is not None and version is not None else (None, "")
    if version is None:
        error = f"{name} is not installed" + (f" (needed for the '{extra}' extra)" if extra else "")
    version_ok = _version_ok(version, requirement.specifier) or (bool(extra) and version is None)
    fix = "" if version_ok and ok_import is not False else _fix_for(requirement, version, error)
    return PackageCheck(name, requirement.module, requirement.specifier, extra, version, version_ok, ok_import, error, fix)


def check_packages(*, imports: bool = True) -> tuple[PackageCheck, ...]:
    """Every package mlbench declares (core and extras, from its metadata) against this environment.

    Parameters
    ----------
    imports : bool
        Also try each installed package's import in a fresh interpreter (:func:`check_imports`).
    """
    requirements = declared_requirements()
    if not requirements:
        return (PackageCheck("mlbench", "mlbench", "", "", None, False, None,
                             "mlbench's requirements cannot be read: it is not installed (no package metadata) "
                             "and no pyproject.toml is beside it", "pip install -e <the mlbench checkout>"),)
    versions = {r.name: _installed(r.name) for r in requirements}
    results = check_imports([r.module for r in requirements if versions[r.name] is not None]) if imports else {}
    return tuple(_package(r, versions[r.name], results.get(r.module)) for r in requirements)


def _cpu() -> dict[str, Any]:
    out: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine()}
    try:
        import psutil

        memory = psutil.virtual_memory()
        out.update(ram_total_gib=round(memory.total / 2**30, 1), ram_available_gib=round(memory.available / 2**30, 1))
    except ImportError:
        out["problem"] = "psutil is not installed: RAM not measured (pip install psutil)"
    return out


def doctor(*, imports: bool = True, url: str | None = None) -> EnvReport:
    """Check this environment; returns an :class:`EnvReport` (never raises for a finding).

    Parameters
    ----------
    imports : bool
        Try every package's import in a subprocess (about one ``import torch``); False only reads versions.
    url : str, optional
        A running service to probe at ``URL/health``.
    """
    return EnvReport(
        python=platform.python_version(), platform=f"{platform.system()} {platform.machine()}",
        torch=torch_status(), gpu=gpu_status(), cpu=_cpu(), packages=check_packages(imports=imports), weights=weights_status(),
        service=probe_service(url) if url else None,
    )


def add_doctor_command(sub) -> None:
    """Register ``mlbench doctor [--json] [--url URL] [--no-imports]``."""
    p = sub.add_parser("doctor", help="check Python, torch/CUDA, GPUs, packages, weights (and a service)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--url", default=None, help="also probe a running service's /health, e.g. http://127.0.0.1:8000")
    p.add_argument("--no-imports", action="store_true", help="read versions only; do not try imports in subprocesses")
    p.set_defaults(run=_doctor_cli)


def _doctor_cli(args) -> int:
    report = doctor(imports=not args.no_imports, url=args.url)
    print(json.dumps(report.to_dict(), indent=1, default=str) if args.json else report.text())
    return 0 if report.ok else 1
