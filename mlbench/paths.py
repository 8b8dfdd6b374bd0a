"""Where the bundled data lives: ``data/`` at the repository root, or ``$MLBENCH_DATA``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["data_dir", "sha256_file"]


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
