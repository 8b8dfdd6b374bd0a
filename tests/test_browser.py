"""A real browser drives JupyterLab: open the tour, run all cells, click Next through every stage.

JupyterLab runs on 127.0.0.1 with a token on a free port, over a copy of the tour notebook
(so the saved outputs in git are never touched); Debian's headless Chromium is driven by
Playwright with ``executable_path`` (nothing is downloaded). Screenshots go to
``artifacts/browser/``. Skipped, with the reason, only when Chromium or Playwright is absent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_tour.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STAGES = ("decode", "preprocess", "forward", "postprocess", "polygons")
RUN_ALL_TIMEOUT_MS = 240_000


def chromium_path() -> str | None:
    """Debian's Chromium, or another on PATH (``MLBENCH_CHROMIUM`` overrides)."""
    for candidate in (os.environ.get("MLBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_lab_config(home: Path) -> dict[str, str]:
    """Private config/settings dirs: no news toast, no windowed notebook (every cell stays in the DOM)."""
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    return {"JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime")}


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}; see {ARTIFACTS / 'jupyter.log'}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer {url} within {timeout:.0f} s; see {ARTIFACTS / 'jupyter.log'}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of the tour notebook: yields (base url, token)."""
    if not NOTEBOOK.exists():
        pytest.fail(f"{NOTEBOOK} is missing")
    home = tmp_path_factory.mktemp("lab")
    work = home / "notebooks"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, **write_lab_config(home), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
               "--ServerApp.port_retries=0"] + (["--allow-root"] if hasattr(os, "getuid") and os.getuid() == 0 else [])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "jupyter.log", "w")
    proc = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/api/status?token={token}", proc)
        yield base, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (no /usr/bin/chromium); `make test` installs it with "
                    "`apt-get install -y chromium` when run as root")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed "
                                   "(`pip install playwright`; no browser download is needed)")
    with sync_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


KERNEL_IDLE = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }"""


CELL_PROBLEMS = """() => { const problems = [];
  window.jupyterapp.shell.currentWidget.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const tags = cell.model.getMetadata('tags') || [];
    const errors = cell.model.outputs.toJSON().filter(o => o.output_type === 'error');
    if (errors.length && !tags.includes('raises-exception'))
      problems.push(`cell ${index}: ${errors.map(e => e.ename + ': ' + e.evalue).join('; ')}`);
    if (cell.model.executionCount === null) problems.push(`cell ${index}: not executed`);
  });
  return problems; }"""


def open_and_run_all(page, base: str, token: str) -> None:
    page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate("""() => { window.__mlbenchRunAll = null;
      window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        ok => { window.__mlbenchRunAll = 'finished ' + ok; }, err => { window.__mlbenchRunAll = 'error ' + err; }); }""")
    page.wait_for_function("() => window.__mlbenchRunAll !== null", timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
    page.wait_for_function(KERNEL_IDLE, timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
    # run-all reports false when any cell raised; only cells tagged raises-exception may
    problems = page.evaluate(CELL_PROBLEMS)
    assert not problems, f"cells failed or did not run in JupyterLab: {problems}"
    page.wait_for_function("() => !document.querySelector('.jp-InputArea-prompt') || "
                           "![...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))",
                           timeout=RUN_ALL_TIMEOUT_MS, polling=1000)


def test_tour_runs_and_stepper_walks_every_stage_in_chromium(lab, browser):
    base, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        open_and_run_all(page, base, token)
        page.screenshot(path=str(ARTIFACTS / "00_after_run_all.png"))
        stepper = page.locator(".mlbench-stepper").first
        stepper.wait_for(state="visible", timeout=60_000)
        stepper.locator("button.mlbench-reset").click()
        stepper.locator(".mlbench-view[data-status='pending']").wait_for(state="attached", timeout=60_000)
        assert stepper.locator(".mlbench-stage-done").count() == 0
        seen = []
        for index, stage in enumerate(STAGES, start=1):
            stepper.locator("button.mlbench-next").click()
            view = stepper.locator(f".mlbench-view[data-stage='{stage}']")
            view.wait_for(state="attached", timeout=120_000)
            seen.append(view.inner_text())
            stepper.scroll_into_view_if_needed()
            stepper.screenshot(path=str(ARTIFACTS / f"{index:02d}_{stage}.png"))
            assert view.get_attribute("data-status") == "done", seen[-1]
            if stage == "postprocess":
                overlay = stepper.locator("img.mlbench-img-overlay")
                overlay.wait_for(state="visible", timeout=30_000)
                width = overlay.evaluate("img => img.complete ? img.naturalWidth : 0")
                assert width > 0, "the mask overlay image did not load"
        assert len(set(seen)) == len(STAGES), "the stage view did not change on every Next"
        assert stepper.locator(".mlbench-stage-done").count() == len(STAGES)
        assert not errors, f"JavaScript errors in the page: {errors}"
    finally:
        page.screenshot(path=str(ARTIFACTS / "99_final.png"), full_page=True)
        page.close()
