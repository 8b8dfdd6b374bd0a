"""Test-session settings shared by the unit tests, the doctests and the notebooks (nbval kernels
inherit this process's environment).

Saving a case signs it with a local key (mlbench/cases/signing.py), created on first use in the
user's config folder. The suite uses a key of its own in a temporary folder instead, so running the
tests never writes into the home folder.
"""

import os
import tempfile
from pathlib import Path

# One torch (OpenMP) thread per process, set before anything imports torch; notebook kernels and the browser
# test's JupyterLab inherit it. The suite runs two workers on a 2-core machine (pyproject's addopts), each
# with a notebook kernel beside it: with two threads each, OpenMP's spinning threads wait on descheduled
# ones, and notebook 01's Run All took 117 s instead of 36 s. Tests that need a count set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

if "MLBENCH_CASE_KEY_FILE" not in os.environ:
    _keys = Path(tempfile.mkdtemp(prefix="mlbench-test-keys-"))
    os.environ["MLBENCH_CASE_KEY_FILE"] = str(_keys / "case-signing.key")


def pytest_collection_modifyitems(session, config, items):
    """The browser test first: with ``-n 2 --dist loadscope --no-loadscope-reorder`` (pyproject's addopts) its
    module, the suite's longest (every notebook run in JupyterLab), starts at once on one worker while the other
    worker takes the rest; started last, it would run alone at the end and set the suite's time."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_browser.py")
