"""Where the bundled data lives: ``data/`` at the repository root, or ``$MLBENCH_DATA``."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["data_dir", "sha256_file", "cut_machine_paths"]


def data_dir() -> Path:
    """The data folder (samples, weights, cases); ``MLBENCH_DATA`` overrides the default."""
    override = os.environ.get("MLBENCH_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "data"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cut_machine_paths(text: str) -> str:
    """A traceback with every ``File "..."`` path cut to its last two parts (no machine paths), and a
    notebook cell's temporary file (``/tmp/ipykernel_<pid>/<hash>.py``) named ``<cell>``.

    >>> cut_machine_paths('File "/srv/app/mlbench/pipeline/run.py", line 3 | File "/tmp/ipykernel_7/123.py", line 1')
    'File ".../pipeline/run.py", line 3 | File "<cell>", line 1'
    """
    text = re.sub(r'File "[^"]*ipykernel_\d+[/\\]\w+\.py"', 'File "<cell>"', text)
    return re.sub(r'File "(?:[^"]*[/\\])?([^"/\\]+[/\\][^"/\\]+)"', r'File ".../\1"', text)
