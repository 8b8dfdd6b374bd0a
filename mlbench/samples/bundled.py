"""The bundled sample images with ground truth, listed in ``data/samples/index.json``.

Each sample is one image file in one of the formats the service meets (8-bit PNG,
16-bit and 12-bit TIFF, RGB JPEG, RGBA PNG, multi-page TIFF, real microscopy) plus its
instance labels. Files are checked against their recorded sha256 when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlbench.errors import DataError
from mlbench.findings import ReportText
from mlbench.image.read import ImageReport, read_image
from mlbench.paths import data_dir, sha256_file

__all__ = ["Sample", "list_samples", "load_sample", "sample_index"]


@dataclass(frozen=True, repr=False)
class Sample(ReportText):
    """A bundled image: ``image`` as decoded by :func:`read_image`, ``mask`` instance labels or None."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    path: Path
    report: ImageReport
    description: str

    def text(self) -> str:
        objects = "no ground truth" if self.mask is None else f"{len(np.unique(self.mask)) - (0 in self.mask)} labelled objects"
        return f"Sample({self.name}: {self.path.name}, {self.image.shape} {self.image.dtype}, {objects})"


def sample_index() -> dict[str, dict[str, Any]]:
    """Name -> entry (file, labels, description, source, licence, sha256) of every sample."""
    path = data_dir() / "samples" / "index.json"
    if not path.exists():
        raise DataError(f"sample index not found at {path}; restore data/samples from git")
    return {entry["name"]: entry for entry in json.loads(path.read_text())["samples"]}


def list_samples() -> list[str]:
    """Names of the bundled samples, sorted."""
    return sorted(sample_index())


def _checked(folder: Path, file: str, expected: str) -> Path:
    path = folder / file
    if not path.exists():
        raise DataError(f"sample file {path} is missing; restore data/samples from git")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"sample file {path} has sha256 {actual[:16]}..., expected {expected[:16]}...; restore it from git")
    return path


def load_sample(name: str) -> Sample:
    """Load a bundled sample by name (see :func:`list_samples`).

    Raises
    ------
    DataError
        For an unknown name or a file that fails its checksum.
    """
    index = sample_index()
    if name not in index:
        raise DataError(f"no sample named {name!r}; available: {sorted(index)}")
    entry = index[name]
    folder = data_dir() / "samples"
    path = _checked(folder, entry["file"], entry["sha256"])
    image, report = read_image(path)
    mask = None
    if entry.get("labels"):
        labels_path = _checked(folder, entry["labels"], entry["labels_sha256"])
        mask = read_image(labels_path)[0].astype(np.int32)
    return Sample(name, image, mask, path, report, entry.get("description", ""))
