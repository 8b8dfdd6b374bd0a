"""``%load_ext mlbench`` in a real kernel: the diagnosis first, a short traceback, the full one folded."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from mlbench.ipython_ext import short_traceback_lines


def run_cells(*sources: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    return nb


def test_a_failing_cell_shows_the_diagnosis_a_short_traceback_and_the_full_one_folded():
    nb = run_cells("%load_ext mlbench", "import mlbench as mb\nmb.segment(b'<html>not an image</html>', 'cbam_resunet')")
    outputs = nb.cells[1].outputs
    shown = next(o for o in outputs if o.output_type == "display_data")
    error = next(o for o in outputs if o.output_type == "error")
    assert shown.data["text/plain"].startswith("mlbench triage: image_format")
    html = shown.data["text/html"]
    assert "<details><summary>full traceback (" in html and "Traceback" in html
    assert error.ename == "StageError" and len(error.traceback) <= 25
    assert error.traceback[0] == "Traceback (most recent call last, shortened):"
    assert "frame(s) inside libraries, in the folded traceback" in "\n".join(error.traceback)
    assert outputs.index(shown) < outputs.index(error)  # the explanation comes first


def test_the_cell_still_fails_and_unloading_restores_plain_tracebacks():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%load_ext mlbench"),
                                         nbformat.v4.new_code_cell("1 / 0")])
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    plain = run_cells("%load_ext mlbench", "%unload_ext mlbench", "1 / 0")
    assert [o.output_type for o in plain.cells[2].outputs] == ["error"]


def test_short_traceback_keeps_the_first_and_innermost_frames():
    def inner():
        raise RuntimeError("deep")

    def middle():
        inner()

    def outer():
        middle()

    try:
        outer()
    except RuntimeError as exc:
        lines = short_traceback_lines(exc, frames=2)
    assert lines[0].startswith("Traceback") and lines[-1] == "RuntimeError: deep"
    assert "in test_short_traceback_keeps_the_first_and_innermost_frames" in lines[1]
    assert any("frame(s) inside libraries" in line for line in lines) and "in inner" in "\n".join(lines)
