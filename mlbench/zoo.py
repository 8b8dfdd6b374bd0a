"""Models with weights: the bundled small ones, and checkpoints from a training run or production.

``load_model`` never fetches anything. A bundled name loads the weights that ship in
``data/weights``, checked against the sha256 in its manifest. A path loads a checkpoint (the
service's training dicts with an ``argparse.Namespace``, DataParallel prefixes, plain state
dicts, safetensors) through :func:`mlbench.read_checkpoint`, which never unpickles code; the
architecture and its widths are read from the tensors. Every load is ``strict=True``, so a file
that does not fit cannot load silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, WeightsError
from .models import build_model, config_from_state_dict, list_models, resolve_name
from .paths import data_dir, sha256_file

__all__ = ["load_model", "load_checkpoint", "load_manifest", "weights_path", "SERVICE_INPUT_SIZE"]

SERVICE_INPUT_SIZE = 1024
"""The side the service stretched every image to; the input size of a loaded checkpoint."""


def load_manifest(weights_dir: Path | None = None) -> dict[str, Any]:
    """The weights manifest: per model its file, sha256, widths, recipe and measured IoU."""
    path = (weights_dir or data_dir() / "weights") / "manifest.json"
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


def _entry(name: str, weights_dir: Path | None = None) -> dict[str, Any]:
    models = load_manifest(weights_dir)["models"]
    if name not in models:
        raise WeightsError(f"no bundled weights for {name!r} in the manifest (it has {sorted(models)}); "
                           "run `python -m mlbench.train --models " + name + "`")
    return models[name]


def load_model(source: str | Path, *, model: str | torch.nn.Module | None = None,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model with trained weights, in eval mode: a bundled name or a checkpoint file.

    Parameters
    ----------
    source : str or Path
        A bundled model name or service id (``"hrnet"``, ``"resunet_small"`` ...): the small
        trained weights of ``data/weights``. Anything else is a checkpoint path (see
        :func:`load_checkpoint`).
    model : str or nn.Module, optional
        For a checkpoint: the architecture name to expect, or your own module to load into.
    device : str or torch.device

    Raises
    ------
    WeightsError
        A bundled file missing or changed (sha256), or a checkpoint that cannot be read safely
        or does not fit.
    ModelError
        ``source`` is neither a known name nor an existing file.
    """
    if isinstance(source, str) and not _looks_like_path(source):
        try:
            name = resolve_name(source)
        except ModelError as exc:
            raise ModelError(f"{exc} It is not a file either ({Path(source).absolute()} does not exist): "
                             "pass a bundled name or the path of a checkpoint.") from None
        if model is not None:
            raise ModelError(f"model= applies to checkpoint files; {source!r} is a bundled model: "
                             f"call mb.load_model({source!r}) without it, or pass the path of your checkpoint")
        return load_trained(name, data_dir() / "weights").to(device)
    return load_checkpoint(source, model=model).to(device)


def _looks_like_path(source: str) -> bool:
    return Path(source).exists() or any(sep in source for sep in "/\\") or Path(source).suffix != ""


def load_checkpoint(path: str | Path, *, model: str | torch.nn.Module | None = None) -> torch.nn.Module:
    """Load a checkpoint file into the architecture its tensors describe, strictly, on the CPU.

    The service's ``weights/<id>_best_model.pth`` training dicts, DataParallel or ``_orig_mod``
    prefixes, plain state dicts and safetensors files all load; nothing in the file is run
    (:func:`mlbench.read_checkpoint`). The widths come from the tensors, as the service's own
    loader reads them, and the input size is the service's 1024 px
    (``model.mlbench_input_size``; override it with the ``input_size`` pipeline option).

    Parameters
    ----------
    path : str or Path
    model : str or nn.Module, optional
        The architecture to expect (a name or service id; the file must fit it), or a module of
        your own to load the tensors into (strict; the error lists the keys that do not fit).

    Raises
    ------
    WeightsError
        The file is unreadable, unsafe, damaged, or fits no architecture (or not ``model``);
        the message carries the checkpoint report.
    """
    from .weights import read_checkpoint

    state_dict, report = read_checkpoint(path, model)
    if isinstance(model, torch.nn.Module):
        net = model
    else:
        fit = report.best_fit
        name = resolve_name(model) if model is not None else (fit.model if fit and fit.score == 1.0 else None)
        if name is None:
            raise WeightsError(f"{path} fits none of the known architectures {list_models()} exactly (best: {fit}); "
                               "pass your own module: mb.load_model(path, model=MyNet())\n" + str(report))
        net = build_model(name, widths=config_from_state_dict(name, state_dict))
    net.load_state_dict(state_dict, strict=True)
    net.mlbench_input_size = SERVICE_INPUT_SIZE
    net.mlbench_weights_sha256 = report.sha256
    net.mlbench_source = str(path)
    return net.eval()


def load_trained(name: str, weights_dir: Path) -> torch.nn.Module:
    """The small model ``name`` from the weights and manifest in ``weights_dir``, eval mode, on CPU.

    :func:`load_model` reads the bundled folder; ``python -m mlbench.train --out DIR`` evaluates
    what it wrote in ``DIR`` through this same check.
    """
    from safetensors.torch import load_file

    canonical = resolve_name(name)
    entry = _entry(canonical, weights_dir)
    path = weights_dir / entry["file"]
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
    return model.eval()
