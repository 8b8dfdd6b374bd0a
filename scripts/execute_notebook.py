"""Execute notebooks in place and scrub their metadata: `python scripts/execute_notebook.py NB...`.

Outputs stay in git (nbval compares them); execution counts are renumbered, per-cell
metadata (timings, ids of widget views aside) and kernel details are removed so that a
re-run changes nothing but real output changes. Run from the repository root with the
project's venv; the kernel is this interpreter.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KEEP_CELL_METADATA = {"tags"}


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
    elif "text/plain" in out.get("data", {}):
        out.data["text/plain"] = TEMP_DIR.sub("/tmp/<tmpdir>", out.data["text/plain"])


def scrub(nb: nbformat.NotebookNode) -> None:
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    count = 0
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA}
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                _machine_paths(out)
                if "execution_count" in out:
                    out.execution_count = count
                out.pop("metadata", None) if out.get("output_type") == "stream" else None


def execute(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    scrub(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - started


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: executed in {execute(Path(arg)):.1f} s")
