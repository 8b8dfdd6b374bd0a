"""Execute notebooks in place and save them as JupyterLab would: `python scripts/execute_notebook.py NB...`.

Outputs stay in git (nbval compares them); execution counts are renumbered, per-cell
metadata (timings, ids of widget views aside) is removed so that a re-run changes nothing but
real output changes. The file is written in the form JupyterLab itself writes after a Run All and
a save, so that the lab opens it unmodified and a Run All in the lab changes no saved output
(only the random ids of widget views, and in an error's traceback the kernel's temporary file name
and the absolute paths this script shortens; nbval ignores all three):

- nbformat 4.5 with an id on every cell (JupyterLab upgrades older files and adds ids on open);
- notebook metadata ``kernelspec`` (name, display name, language of the kernel spec) and the
  kernel's full ``language_info``, which JupyterLab writes into the model when the kernel starts
  (any difference, the Python version included, marks the notebook modified on open);
- consecutive stream outputs of one name merged, carriage returns and backspaces applied, as
  JupyterLab's output area does (the kernel flushes a long cell's prints in several messages);
- signed in this machine's trust database, as the server signs a notebook it saves (``make lab``
  runs ``jupyter trust`` on the notebooks for everyone else).

Run from the repository root with the project's venv; the kernel is this interpreter.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbformat.sign import NotebookNotary
from nbformat.v4.nbbase import random_cell_id

KEEP_CELL_METADATA = {"tags"}
KERNEL = "python3"


REPO = str(Path(__file__).resolve().parents[1]) + "/"
# A notebook's own temporary folder (tempfile.mkdtemp: /tmp/tmpab12cd34) is this run's, not the reader's.
# "/tmp/<tmpdir>" still matches sanitize.cfg's [temp paths] rule, so nbval compares it as before.
TEMP_DIR = re.compile(re.escape(tempfile.gettempdir()) + r"/tmp\w+")


def _machine_paths(out: nbformat.NotebookNode) -> None:
    """No paths of this machine in saved outputs: tracebacks relative to the repository, temp folders named."""
    kind = out.get("output_type")
    if kind == "error":
        out.traceback = [TEMP_DIR.sub("/tmp/<tmpdir>", line.replace(REPO, "")) for line in out.traceback]
    elif kind == "stream":
        out.text = TEMP_DIR.sub("/tmp/<tmpdir>", out.text)
    else:
        data = out.get("data", {})
        if "text/plain" in data:
            data["text/plain"] = TEMP_DIR.sub("/tmp/<tmpdir>", data["text/plain"])
        if "text/html" in data:  # %load_ext mlbench folds the full traceback into HTML
            data["text/html"] = TEMP_DIR.sub("/tmp/<tmpdir>", data["text/html"].replace(REPO, ""))


def _overwrite(buffer: str, index: int, text: str) -> tuple[str, int]:
    """JupyterLab's stream text processing (``OutputAreaModel.processText``): write ``text`` into ``buffer``
    at ``index``; a carriage return goes back to the line start, a backspace deletes, a newline appends."""
    for piece, control in re.findall(r"([^\n\b\r]*)([\n\b\r]?)", text):
        buffer, index = buffer[:index] + piece + buffer[index + len(piece):], index + len(piece)
        if control == "\b" and index > 0 and buffer[index - 1] != "\n":
            buffer, index = buffer[:index - 1] + buffer[index + 1:], index - 1
        elif control == "\r":
            while index > 0 and buffer[index - 1] != "\n":
                index -= 1
        elif control == "\n":
            buffer += "\n"
            index = len(buffer)
    return buffer, index


def merge_streams(outputs: list) -> list:
    """Consecutive stream outputs of one name as one output, as JupyterLab's output area keeps them."""
    merged: list = []
    index = 0
    for out in outputs:
        if out.get("output_type") != "stream":
            merged.append(out)
            continue
        if merged and merged[-1].get("output_type") == "stream" and merged[-1].name == out.name:
            merged[-1].text, index = _overwrite(merged[-1].text, index, out.text)
        else:
            out.text, index = _overwrite("", 0, out.text)
            merged.append(out)
    return merged


def lab_form(nb: nbformat.NotebookNode, language_info: dict) -> None:
    """The notebook-level form JupyterLab gives a notebook it opened and saved: nbformat 4.5, cell ids,
    the kernel spec's name/display name/language and the kernel's ``language_info``."""
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    nb.nbformat, nb.nbformat_minor = 4, max(5, nb.get("nbformat_minor", 0))
    nb.metadata = {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": KERNEL},
                   "language_info": dict(language_info)}
    seen: set[str] = set()
    for cell in nb.cells:
        if not cell.get("id") or cell.id in seen:
            cell.id = random_cell_id()
        seen.add(cell.id)


def scrub(nb: nbformat.NotebookNode) -> None:
    """Cell metadata but tags removed, execution counts renumbered, outputs without machine paths, streams merged."""
    count = 0
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA}
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = merge_streams(cell.outputs)
            for out in cell.outputs:
                _machine_paths(out)
                if "execution_count" in out:
                    out.execution_count = count
                out.pop("metadata", None) if out.get("output_type") == "stream" else None


def execute(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, allow_errors=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    lab_form(nb, nb.metadata["language_info"])  # set by the client from the kernel's own info
    scrub(nb)
    with NotebookNotary() as notary:
        notary.sign(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - started


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: executed in {execute(Path(arg)):.1f} s")
