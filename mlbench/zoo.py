"""The bundled small models: trained weights in ``data/weights`` and their manifest.

``load_model`` never fetches anything: the weights ship with the project and are
checked against the sha256 recorded in ``data/weights/manifest.json`` before loading,
with ``strict=True`` so a file that does not fit cannot load silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError
from .models import build_model, resolve_name
from .paths import data_dir, sha256_file

__all__ = ["load_model", "load_manifest", "weights_path"]


def load_manifest() -> dict[str, Any]:
    """The weights manifest: per model its file, sha256, widths, recipe and measured IoU."""
    path = data_dir() / "weights" / "manifest.json"
    if not path.exists():
        raise WeightsError(
            f"weights manifest not found at {path}; the bundled weights are missing: "
            "run `python -m mlbench.train` to train them, or restore data/weights from git"
        )
    return json.loads(path.read_text())


def weights_path(name: str) -> Path:
    """Path of the bundled weights file of model ``name`` (aliases accepted)."""
    entry = _entry(resolve_name(name))
    return data_dir() / "weights" / entry["file"]


def _entry(name: str) -> dict[str, Any]:
    models = load_manifest()["models"]
    if name not in models:
        raise WeightsError(f"no bundled weights for {name!r} in the manifest (it has {sorted(models)}); "
                           "run `python -m mlbench.train --models " + name + "`")
    return models[name]


def load_model(name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The small model ``name`` with its bundled trained weights, in eval mode.

    Raises
    ------
    WeightsError
        When the file is missing or its sha256 differs from the manifest.
    """
    from safetensors.torch import load_file

    canonical = resolve_name(name)
    entry = _entry(canonical)
    path = data_dir() / "weights" / entry["file"]
    if not path.exists():
        raise WeightsError(f"weights file {path} is missing (working directory {Path.cwd()}); "
                           "restore it from git or run `python -m mlbench.train`")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"weights file {path} has sha256 {actual[:16]}... but the manifest expects {entry['sha256'][:16]}...; "
            "the file was changed or damaged: restore it from git, or retrain with `python -m mlbench.train` "
            "(which rewrites the manifest)"
        )
    model = build_model(canonical, size="small")
    model.load_state_dict(load_file(str(path)), strict=True)
    model.mlbench_input_size = int(entry["input_size"])
    model.mlbench_weights_sha256 = actual
    return model.to(device).eval()
