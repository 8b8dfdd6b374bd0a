"""Throw-away environments: this one plus one package at one version, for ``golden bisect``.

A :class:`ThrowawayEnv` is a virtual environment (``python -m venv --without-pip``) holding
``package==version``, installed with ``--no-deps`` (by pip, or by uv when it is on the PATH), and a
``.pth`` file that adds every site-packages folder of this interpreter *after* its own: the pinned
package shadows this environment's copy and everything else is shared. (``venv
--system-site-packages`` made from inside a venv would see the base interpreter's packages, not
this venv's; the ``.pth`` is what makes it "this environment plus one package".) Binary wheels
only: no version is built from source. Nothing leaves the machine but the package index queries
of pip (or uv), to the index they are configured with; with ``find_links`` a local folder of
wheels is used and no index at all. The folder is deleted on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Sequence

from packaging.version import InvalidVersion, Version

from mlbench.errors import MlbenchError, OptionsError

__all__ = ["ThrowawayEnv", "EnvFailure", "list_versions", "site_dirs", "INSTALLERS"]

INSTALLERS = ("auto", "pip", "uv")


class EnvFailure(MlbenchError, RuntimeError):
    """A throw-away environment could not be made, could not install its version, or its check gave no report."""


def site_dirs() -> list[str]:
    """This interpreter's site-packages folders, in ``sys.path`` order (the user's too, when enabled)."""
    dirs = [*getattr(site, "getsitepackages", list)(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _source_args(find_links: str | os.PathLike | None) -> list[str]:
    return [] if find_links is None else ["--no-index", "--find-links", str(Path(find_links).resolve())]


def _run(command: list[str], what: str, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise EnvFailure(f"{what} took longer than {timeout:g} s and was stopped") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise EnvFailure(f"{what} failed (exit {done.returncode}): {tail or 'no output'}")
    return done


def list_versions(package: str, lower: str | None = None, upper: str | None = None, *,
                  versions: Sequence[str] | None = None, find_links: str | os.PathLike | None = None,
                  python: str = sys.executable, timeout: float = 300) -> list[str]:
    """The versions of ``package`` from ``lower`` to ``upper`` (both included), oldest first: ``versions``
    when given, else those ``pip index versions`` finds (in ``find_links`` only, when given).

    Raises
    ------
    OptionsError
        A version that is not a PEP 440 version, or no list from the index (with pip's reason).
    """
    if versions is None:
        command = [python, "-m", "pip", "index", "versions", package, "--disable-pip-version-check", "--no-input",
                   *_source_args(find_links)]
        try:
            listed = _run(command, f"pip index versions {package}", timeout).stdout
        except EnvFailure as exc:
            raise OptionsError(f"cannot list the versions of {package!r}: {exc}; check the name and the index, "
                               "or give them: --versions 1.0,1.1,2.0 (--find-links DIR for a folder of wheels)") from None
        line = next((ln for ln in listed.splitlines() if ln.startswith("Available versions:")), "")
        versions = [v.strip() for v in line.partition(":")[2].split(",") if v.strip()]
    try:
        parsed = {Version(v): v for v in versions}
        low, high = (Version(b) if b else None for b in (lower, upper))
    except InvalidVersion as exc:
        raise OptionsError(f"{exc}: versions and bounds must be PEP 440 versions such as 4.8.1.78") from None
    return [parsed[v] for v in sorted(parsed) if (low is None or v >= low) and (high is None or v <= high)]


class ThrowawayEnv:
    """This environment plus ``package==version`` (see the module text), deleted on exit:
    ``with ThrowawayEnv("pillow", "11.3.0") as env: env.check("golden/hrnet.safetensors")["ok"]``.

    Raises
    ------
    OptionsError
        An unknown ``installer``, or ``installer="uv"`` without uv on the PATH.
    """

    def __init__(self, package: str, version: str, *, find_links: str | os.PathLike | None = None,
                 installer: str = "auto", python: str = sys.executable, timeout: float = 1800) -> None:
        if installer not in INSTALLERS:
            raise OptionsError(f"installer={installer!r}; expected one of {INSTALLERS}")
        uv = shutil.which("uv") if installer in ("auto", "uv") else None
        if installer == "uv" and uv is None:
            raise OptionsError("installer='uv' but uv is not on the PATH; install it (pip install uv) or use pip")
        self.package, self.version, self.find_links, self.uv = package, version, find_links, uv
        self.base, self.timeout = python, timeout
        self.root: Path | None = None
        self.python = ""

    def __enter__(self) -> ThrowawayEnv:
        self.root = Path(tempfile.mkdtemp(prefix="mlbench-bisect-"))
        try:
            self._create()
            self._install()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Delete the environment."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _create(self) -> None:
        env = self.root / "env"
        _run([self.base, "-m", "venv", "--without-pip", str(env)], "python -m venv", self.timeout)
        self.python = str(env / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
        purelib = _run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       "reading the new environment's site-packages", self.timeout).stdout.strip()
        lines = "; ".join(f"site.addsitedir({d!r})" for d in site_dirs())
        (Path(purelib) / "_mlbench_base_environment.pth").write_text(f"import site; {lines}\n")

    def _install(self) -> None:
        spec = f"{self.package}=={self.version}"
        options = ["--no-deps", "--only-binary", ":all:", *_source_args(self.find_links)]
        if self.uv:
            command = [self.uv, "pip", "install", "--python", self.python, *options, spec]
        else:
            command = [self.python, "-m", "pip", "install", "--ignore-installed", "--disable-pip-version-check",
                       "--no-input", "--quiet", *options, spec]
        _run(command, f"installing {spec}", self.timeout)

    def check(self, golden: str | os.PathLike, arguments: Sequence[str] = ()) -> dict[str, Any]:
        """``mlbench golden check GOLDEN --json`` run here; its report, after making sure it ran with our version.

        Raises
        ------
        EnvFailure
            No JSON report (the check crashed or refused), or another version of the package was imported.
        """
        command = [self.python, "-m", "mlbench", "golden", "check", str(Path(golden).resolve()), "--json",
                   "--package", self.package, *arguments]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise EnvFailure(f"the check with {self.package}=={self.version} ran longer than {self.timeout:g} s") from None
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise EnvFailure(f"the check with {self.package}=={self.version} gave no report (exit {done.returncode}): "
                             f"{tail or 'no output'}") from None
        found = report["environment"]["packages"].get(self.package)
        if found is None or Version(found) != Version(self.version):
            raise EnvFailure(f"the environment for {self.package}=={self.version} imported version {found} instead "
                             "(is the package on PYTHONPATH, or installed under another name?)")
        return report
