"""Test-session settings shared by the unit tests, the doctests and the notebooks (nbval kernels
inherit this process's environment).

Saving a case signs it with a local key (mlbench/cases/signing.py), created on first use in the
user's config folder. The suite uses a key of its own in a temporary folder instead, so running the
tests never writes into the home folder.
"""

import os
import tempfile
from pathlib import Path

if "MLBENCH_CASE_KEY_FILE" not in os.environ:
    _keys = Path(tempfile.mkdtemp(prefix="mlbench-test-keys-"))
    os.environ["MLBENCH_CASE_KEY_FILE"] = str(_keys / "case-signing.key")
