"""A real browser drives JupyterLab over every notebook: open, Run All, look at what rendered.

One JupyterLab server (127.0.0.1, a token, a free port) serves a copy of the numbered notebooks
(``notebooks/NN_*.ipynb``, read from the folder, so new and rewritten notebooks are covered) in a
temporary tree shaped like the repository (``data/`` links to the real one), trusted with
``jupyter trust`` as ``make lab`` does; the saved outputs in git are never touched. One headless
Chromium page (Debian's, driven by Playwright with ``executable_path``: nothing is downloaded) opens
each notebook in turn and checks:

- it opens unmodified (JupyterLab marks a notebook modified when its metadata is not the form it
  writes itself: ``scripts/execute_notebook.py`` saves that form) and trusted;
- Run All finishes within a bound; no cell has an error output unless it is tagged
  ``raises-exception``, every code cell ran, no widget failed to display, no JavaScript error;
- every failure-class notebook (all but the tour, the model comparison and the sweep) renders at
  least one figure (an ``<img>`` of an image output, not a widget's).

Then the tour, still open: a lab save after Run All changes no saved output except what nbval
ignores; its Stepper walks every stage with Next; an image and a broken file uploaded through the
Stepper's file input give the decoded image and a clear error. Screenshots and timings go to
``artifacts/browser/``. Skipped, with the reason, only when Chromium or Playwright is absent.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TOUR = "00_tour.ipynb"
NUMBERED = re.compile(r"^(\d\d)_\w+\.ipynb$")
NO_FAILURE_CLASS = {"00", "10", "12"}
"""The tour, the model comparison and the sweep: the notebooks not required to show a figure."""
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STAGES = ("decode", "preprocess", "forward", "postprocess", "polygons")
OPEN_TIMEOUT_MS = 120_000
RUN_ALL_TIMEOUT_MS = 420_000  # one notebook; nbval allows 300 s per cell, the slowest notebook takes about a minute
STAGE_TIMEOUT_MS = 120_000


def numbered_notebooks() -> list[Path]:
    return sorted(path for path in NOTEBOOKS.glob("*.ipynb") if NUMBERED.match(path.name))


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
    """Private config/settings/data dirs: no news toast, no windowed notebook (every cell stays in the DOM),
    a trust database of its own."""
    labconfig = home / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    return {"JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTER_DATA_DIR": str(home / "data")}


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


@pytest.fixture(scope="module")
def lab(tmp_path_factory, browser):
    """A JupyterLab server over a trusted copy of the notebooks: yields (base url, token, tree root)."""
    home = tmp_path_factory.mktemp("lab")
    tree = home / "repo"
    (tree / "notebooks").mkdir(parents=True)
    (tree / "data").symlink_to(ROOT / "data")  # a notebook may name ../data/ like the repository's own
    for notebook in numbered_notebooks():
        shutil.copy(notebook, tree / "notebooks" / notebook.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, **write_lab_config(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    trust = Path(sys.executable).with_name("jupyter-trust")
    subprocess.run([str(trust) if trust.exists() else "jupyter-trust",
                    *sorted(str(p) for p in (tree / "notebooks").glob("*.ipynb"))],
                   env=env, check=True, capture_output=True, timeout=120)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tree}", "--LabApp.expose_app_in_browser=True",
               "--ServerApp.port_retries=0"] + (["--allow-root"] if hasattr(os, "getuid") and os.getuid() == 0 else [])
    log = open(ARTIFACTS / "jupyter.log", "w")
    proc = subprocess.Popen(command, env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/api/status?token={token}", proc)
        yield base, token, tree
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# ---- JupyterLab, reached through window.jupyterapp; every helper finds its notebook by path ----------------
FIND = "const find = (path) => [...window.jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === path);"

OPEN = """async (path) => { FIND const app = window.jupyterapp;
  const w = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
  await w.context.ready; await w.sessionContext.ready; app.shell.activateById(w.id); return w.id; }"""

KERNEL_IDLE = """(path) => { FIND const w = find(path);
  const k = w && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }"""

ALL_RAN = """(path) => { FIND const w = find(path);
  const k = w && w.sessionContext.session && w.sessionContext.session.kernel;
  if (!k || k.status !== 'idle') { window.__mlbenchIdleSince = null; return false; }
  window.__mlbenchIdleSince = window.__mlbenchIdleSince || Date.now();
  const code = w.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
  if (code.every(c => c.model.executionCount !== null)) return true;
  const failed = code.some(c => !(c.model.getMetadata('tags') || []).includes('raises-exception') &&
    c.model.outputs.toJSON().some(o => o.output_type === 'error'));
  return failed && Date.now() - window.__mlbenchIdleSince > 5000; }"""
"""Run All is over: every code cell ran and the kernel is idle, or a cell not tagged ``raises-exception``
failed (the kernel drops the cells queued after it) and the kernel stayed idle for 5 s. Run All's own promise
settles at the first error, an expected one included, and the kernel idles for moments between cells."""

OPEN_STATE = """async (path) => { FIND const w = find(path); await w.sessionContext.session.kernel.info;
  await new Promise(r => setTimeout(r, 500));  // the kernel's language_info reaches the model after its info
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  return {dirty: w.context.model.dirty, untrusted: code.filter(c => !c.model.trusted).length, cells: code.length}; }"""

RUN_ALL = """(path) => { FIND const app = window.jupyterapp, w = find(path); app.shell.activateById(w.id);
  window.__mlbenchRunAll = null; window.__mlbenchIdleSince = null;
  app.commands.execute('notebook:clear-all-cell-outputs')
    .then(() => app.commands.execute('notebook:run-all-cells'))
    .then(ok => { window.__mlbenchRunAll = 'finished ' + ok; }, err => { window.__mlbenchRunAll = 'error ' + err; }); }"""

CELL_PROBLEMS = """(path) => { FIND const problems = [];
  find(path).content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const tags = cell.model.getMetadata('tags') || [];
    const errors = cell.model.outputs.toJSON().filter(o => o.output_type === 'error');
    if (errors.length && !tags.includes('raises-exception'))
      problems.push(`cell ${index}: ${errors.map(e => e.ename + ': ' + e.evalue).join('; ')}`);
    if (cell.model.executionCount === null && cell.model.sharedModel.getSource().trim())
      problems.push(`cell ${index}: not executed`);
  });
  if (find(path).node.innerText.includes('Error displaying widget')) problems.push('a widget failed to display');
  return problems; }"""

FIGURES = """(path) => { FIND const imgs = [...find(path).node.querySelectorAll('.jp-OutputArea .jp-RenderedImage img')];
  const loaded = imgs.filter(i => i.complete && i.naturalWidth > 0);
  if (loaded.length) loaded[0].scrollIntoView({block: 'center'});
  return loaded.length; }"""

PANEL_ID = """(path) => { FIND return find(path).id; }"""

SAVE = """async (path) => { FIND await find(path).context.save(); }"""

CLOSE = """async (path) => { FIND const w = find(path); if (!w) return;
  await w.sessionContext.shutdown(); w.context.model.dirty = false; w.dispose(); }"""
OPEN, KERNEL_IDLE, ALL_RAN, OPEN_STATE, RUN_ALL, CELL_PROBLEMS, FIGURES, PANEL_ID, SAVE, CLOSE = (
    js.replace("FIND", FIND, 1) for js in (OPEN, KERNEL_IDLE, ALL_RAN, OPEN_STATE, RUN_ALL, CELL_PROBLEMS, FIGURES, PANEL_ID,
                                           SAVE, CLOSE))
PAGE_ERRORS: list[str] = []
"""JavaScript errors of the page since the running test began."""


def _timings(name: str, seconds: float) -> None:
    """Keep each notebook's Run All time beside the screenshots (the suite's time budget is watched)."""
    path = ARTIFACTS / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = round(seconds, 1)
    path.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def page(lab, browser):
    """One page for every notebook: JupyterLab loads once."""
    base, token, _tree = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.on("pageerror", lambda exc: PAGE_ERRORS.append(str(exc)))
    (ARTIFACTS / "timings.json").unlink(missing_ok=True)
    page.goto(f"{base}/lab?token={token}", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp !== undefined && window.jupyterapp.shell !== undefined",
                           timeout=OPEN_TIMEOUT_MS)
    page.wait_for_selector(".jp-LabShell", timeout=OPEN_TIMEOUT_MS)
    try:
        yield page
    finally:
        page.screenshot(path=str(ARTIFACTS / "99_final.png"))
        page.close()


RAN: dict[str, Path] = {}
"""Notebooks that ran cleanly in this session -> their path in the lab's tree (the tour stays open)."""


@pytest.mark.parametrize("notebook", numbered_notebooks(), ids=lambda p: p.name)
def test_notebook_opens_clean_runs_all_and_renders_in_jupyterlab(notebook, lab, page):
    _base, _token, tree = lab
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    path, stem = f"notebooks/{notebook.name}", notebook.stem
    PAGE_ERRORS.clear()
    started = time.monotonic()
    page.evaluate(OPEN, path)
    page.wait_for_function(KERNEL_IDLE, arg=path, timeout=OPEN_TIMEOUT_MS, polling=500)
    state = page.evaluate(OPEN_STATE, path)
    found: list[str] = []  # every problem of this notebook, so that one run names them all
    if state["dirty"]:
        found.append("it opens modified: its metadata is not the form JupyterLab writes; re-run "
                     f"`python scripts/execute_notebook.py {path}`")
    if state["untrusted"]:
        found.append(f"{state['untrusted']} of {state['cells']} code cells untrusted after `jupyter trust`")
    try:
        page.evaluate(RUN_ALL, path)
        page.wait_for_function("() => window.__mlbenchRunAll !== null", timeout=RUN_ALL_TIMEOUT_MS, polling=1000)
        try:
            page.wait_for_function(ALL_RAN, arg=path, timeout=RUN_ALL_TIMEOUT_MS, polling=500)
        except PlaywrightTimeout:  # the cells that did not run are named below
            found.append(f"Run All did not finish within {RUN_ALL_TIMEOUT_MS // 1000} s")
        _timings(notebook.name, time.monotonic() - started)
        found += page.evaluate(CELL_PROBLEMS, path)
        if NUMBERED.match(notebook.name).group(1) not in NO_FAILURE_CLASS:
            try:
                page.wait_for_function(FIGURES, arg=path, timeout=30_000, polling=500)
            except PlaywrightTimeout:
                found.append("no figure rendered (an <img> of an image output): a failure notebook shows one")
        figures = page.evaluate(FIGURES, path)  # scrolls the first figure into view for the screenshot
        page.screenshot(path=str(ARTIFACTS / f"{stem}.png"))
        found += [f"JavaScript error: {error}" for error in PAGE_ERRORS]
        if notebook.name == TOUR and not found:
            assert figures >= 2, f"the tour shows {figures} figure(s); expected the fixed mask and the as-served one"
            panel = page.locator(f".jp-NotebookPanel[id='{page.evaluate(PANEL_ID, path)}']")
            for kind, selector in (("figure", ".jp-OutputArea .jp-RenderedImage"), ("stepper", ".mlbench-stepper")):
                for index, element in enumerate(panel.locator(selector).all(), start=1):
                    element.scroll_into_view_if_needed()
                    element.screenshot(path=str(ARTIFACTS / f"{stem}_{kind}_{index}.png"))
            page.evaluate(SAVE, path)  # for the saved-output comparison below; the tour stays open for the Stepper
        assert not found, f"{notebook.name} in JupyterLab:\n" + "\n".join(f"- {problem}" for problem in found)
        RAN[notebook.name] = tree / path
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"{stem}_failed.png"))
        raise
    finally:
        if notebook.name != TOUR or notebook.name not in RAN:
            page.evaluate(CLOSE, path)  # shut the kernel down: one kernel at a time on a 2-core runner


# ---- the tour, still open ----------------------------------------------------------------------------------
def _tour_ran() -> Path:
    if TOUR not in RAN:
        pytest.skip(f"{TOUR} did not run cleanly in JupyterLab (see its test above)")
    return RAN[TOUR]


def _sanitizers() -> list[tuple[re.Pattern, str]]:
    config = configparser.ConfigParser(interpolation=None)
    config.read(NOTEBOOKS / "sanitize.cfg")
    return [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]


def _compared(nb: nbformat.NotebookNode) -> list:
    """What nbval compares of each code cell's outputs, sanitised; plus the notebook's form (ids, metadata)."""
    rules = _sanitizers()

    def clean(text: str) -> str:
        for pattern, replace in rules:
            text = pattern.sub(replace, text)
        return text

    cells = []
    for cell in nb.cells:
        entry = [cell.get("id"), cell.cell_type, cell.source]
        if cell.cell_type == "code" and "nbval-ignore-output" not in cell.metadata.get("tags", []):
            for out in cell.outputs:
                data = out.get("data", {})
                entry.append((out.output_type, out.get("name"), clean(out.get("text", "")), sorted(data), {
                    mime: clean(value) for mime, value in data.items() if isinstance(value, str)
                    and mime not in ("image/png", "image/jpeg")}))
        cells.append(entry)
    return [nb.nbformat, nb.nbformat_minor, nb.metadata, cells]


def test_a_lab_run_all_and_save_changes_no_saved_output_of_the_tour(page):
    saved = nbformat.read(_tour_ran(), as_version=4)
    original = nbformat.read(NOTEBOOKS / TOUR, as_version=4)
    before, after = _compared(original), _compared(saved)
    assert before[:3] == after[:3], "the lab saved the tour in another form (nbformat version or metadata)"
    for old, new in zip(before[3], after[3]):
        assert old == new, f"a lab Run All + save changed the tour's cell {old[0]}:\n{old}\n---\n{new}"
    assert len(before[3]) == len(after[3])


def _tour_stepper(page):
    tour = page.locator(f".jp-NotebookPanel[id='{page.evaluate(PANEL_ID, f'notebooks/{TOUR}')}']")
    stepper = tour.locator(".mlbench-stepper").first  # the reader's own Stepper: no cell of the tour drives it
    stepper.wait_for(state="visible", timeout=60_000)
    stepper.scroll_into_view_if_needed()
    return stepper


def test_tour_stepper_walks_every_stage_in_chromium(page):
    _tour_ran()
    PAGE_ERRORS.clear()
    stepper = _tour_stepper(page)
    stepper.locator("button.mlbench-reset").click()
    stepper.locator(".mlbench-view[data-status='pending']").wait_for(state="attached", timeout=60_000)
    assert stepper.locator(".mlbench-stage-done").count() == 0
    seen = []
    for index, stage in enumerate(STAGES, start=1):
        stepper.locator("button.mlbench-next").click()
        view = stepper.locator(f".mlbench-view[data-stage='{stage}']")
        # the stage's view may already be on the page as "pending" (after Reset): wait until the click has run it
        stepper.locator(f".mlbench-view[data-stage='{stage}']:not([data-status='pending'])").wait_for(
            state="attached", timeout=STAGE_TIMEOUT_MS)
        seen.append(view.inner_text())
        stepper.scroll_into_view_if_needed()
        stepper.screenshot(path=str(ARTIFACTS / f"stepper_{index:02d}_{stage}.png"))
        assert view.get_attribute("data-status") == "done", seen[-1]
        if stage == "postprocess":
            overlay = stepper.locator("img.mlbench-img-overlay")
            overlay.wait_for(state="visible", timeout=30_000)
            assert overlay.evaluate("img => img.complete ? img.naturalWidth : 0") > 0, "the mask overlay did not load"
    assert len(set(seen)) == len(STAGES), "the stage view did not change on every Next"
    assert stepper.locator(".mlbench-stage-done").count() == len(STAGES)
    assert not PAGE_ERRORS, f"JavaScript errors in the page: {PAGE_ERRORS}"


def test_tour_stepper_uploads_an_image_and_says_what_is_wrong_with_a_broken_file(page, tmp_path):
    from playwright.sync_api import expect

    _tour_ran()
    PAGE_ERRORS.clear()
    good = tmp_path / "my_cells.png"
    shutil.copy(ROOT / "data" / "samples" / "spheroids_8bit.png", good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:300])  # a PNG cut short, like an interrupted upload
    stepper = _tour_stepper(page)
    button = stepper.locator("button.widget-upload")  # ipywidgets' FileUpload: its <input type=file> opens on click
    status = stepper.locator(".mlbench-status")

    def upload(path: Path) -> None:
        with page.expect_file_chooser(timeout=30_000) as chooser:
            button.click()
        chooser.value.set_files(str(path))

    upload(good)
    image_select = stepper.locator("select").nth(1).element_handle()  # the image dropdown (the model's comes first)
    page.wait_for_function("s => s.selectedIndex >= 0 && s.options[s.selectedIndex].textContent.replace(/\\u00a0/g, ' ')"
                           " === 'upload: my_cells.png'", arg=image_select, timeout=STAGE_TIMEOUT_MS)
    stepper.locator(".mlbench-status-ready").wait_for(state="attached", timeout=STAGE_TIMEOUT_MS)  # not busy: a click counts
    stepper.locator("button.mlbench-reset").click()  # back to the start, the upload selected
    expect(status).to_contain_text("on upload: my_cells.png", timeout=STAGE_TIMEOUT_MS)
    stepper.locator("button.mlbench-next").click()
    decoded = stepper.locator(".mlbench-view[data-stage='decode'][data-status='done']")
    decoded.wait_for(state="attached", timeout=STAGE_TIMEOUT_MS)
    assert "format png, shape (512, 512), dtype uint8" in decoded.inner_text()
    picture = stepper.locator("img.mlbench-img-image")
    picture.wait_for(state="visible", timeout=30_000)
    assert picture.evaluate("img => img.complete ? img.naturalWidth : 0") > 0, "the decoded upload did not show"
    stepper.screenshot(path=str(ARTIFACTS / "upload_image.png"))

    upload(broken)  # the decode stage on view runs again, on the broken file
    failed = stepper.locator(".mlbench-view[data-stage='decode'][data-status='failed']")
    failed.wait_for(state="attached", timeout=STAGE_TIMEOUT_MS)
    expect(stepper.locator(".mlbench-status-error")).to_contain_text("decode failed", timeout=30_000)
    stepper.screenshot(path=str(ARTIFACTS / "upload_broken.png"))
    assert "truncated" in status.inner_text() and "truncated" in failed.inner_text(), failed.inner_text()
    assert stepper.locator("img.mlbench-img-image").count() == 0, "a picture is shown for a file that did not decode"
    assert not PAGE_ERRORS, f"JavaScript errors in the page: {PAGE_ERRORS}"
