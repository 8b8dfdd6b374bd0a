"""The saved notebook outputs name no path of the machine that executed them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(re.escape(str(ROOT)) + r"|/tmp/tmp\w+|/root/|/home/\w+/")


def _output_texts(notebook: Path):
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            for text in (out.get("text", ""), out.get("traceback", []), out.get("data", {}).get("text/plain", "")):
                yield "".join(text) if isinstance(text, list) else text


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_saved_outputs_name_no_machine_path(notebook):
    found = [m.group(0) for text in _output_texts(notebook) for m in MACHINE_PATH.finditer(text)]
    assert not found, f"{notebook.name} outputs name machine paths {sorted(set(found))}; re-run scripts/execute_notebook.py"
