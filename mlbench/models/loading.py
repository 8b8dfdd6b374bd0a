"""Models with weights, each with its card: the bundled small ones, and checkpoints from anywhere.

``load_model`` never fetches anything. A bundled name loads the weights that ship in
``data/weights``, checked against the sha256 in its manifest, with the card the manifest gives. A
path loads a checkpoint (the service's training dicts with an ``argparse.Namespace``, DataParallel,
Lightning, EMA and plain state dicts, safetensors) through the checkpoint reader, which never
unpickles code; the architecture and widths of the three known models are read from the tensors,
and anything else loads into the user's own module (or a factory registered with
:func:`register_model`). Every load is ``strict=True``: a file that does not fit cannot load
silently, and the error lists the keys that did not fit.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mlbench.budgets import Budgets, describe_file
from mlbench.errors import MlbenchWarning, ModelError, OptionsError, WeightsError
from mlbench.models.cards import IMAGENET_MEAN, IMAGENET_STD, ModelCard, architecture_card, attach_card, card
from mlbench.models.checkpoint_io import read_state_dict
from mlbench.models.fitting import diff_keys, known_keys, rank_architectures
from mlbench.models.registry import ALIASES, REGISTERED, build_model, config_from_state_dict, list_models, resolve_name
from mlbench.paths import data_dir, sha256_file

__all__ = ["load_model", "load_checkpoint", "load_trained", "register_model", "registered_models", "load_manifest",
           "weights_path", "manifest_card", "shared_model", "clear_shared_models", "file_sha256", "SHARED_MAX"]




def register_model(name: str, factory: Callable[[], torch.nn.Module], card: ModelCard | None = None) -> None:
    """Make ``name`` an architecture ``load_model(path, model=name)`` can build: ``factory()`` returns
    an untrained module, ``card`` says how to run it.

    Raises
    ------
    OptionsError
        When ``name`` is a bundled architecture or alias, or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name or name.lower() in (*list_models(), *ALIASES):
        raise OptionsError(f"register_model needs a new name, got {name!r}; {list_models()} and their aliases "
                           "are taken by the bundled architectures")
    if not callable(factory):
        raise OptionsError(f"register_model({name!r}, factory): factory must be callable returning an nn.Module, "
                           f"got {type(factory).__name__}")
    REGISTERED[name] = (factory, card)


def registered_models() -> list[str]:
    """Names given to :func:`register_model`, sorted."""
    return sorted(REGISTERED)


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


def load_model(source: str | Path, *, model: str | torch.nn.Module | None = None, card: ModelCard | None = None,
               key: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A model with trained weights and its card, in eval mode: a bundled name or a checkpoint file.

    Parameters
    ----------
    source : str or Path
        A bundled model name or service id (``"hrnet"``, ``"resunet_small"`` ...): the small trained
        weights of ``data/weights``. Anything else is a checkpoint path (see :func:`load_checkpoint`).
    model : str or nn.Module, optional
        For a checkpoint: the architecture to expect (a bundled or registered name), or your own
        module to load the tensors into.
    card : ModelCard, optional
        What you know about the model (recipe, head, name); its fields win over what was read.
    key : str, optional
        For a training dict holding several state dicts (model and EMA): which one to load.
    device : str or torch.device

    Raises
    ------
    WeightsError
        A bundled file missing or changed (sha256), or a checkpoint that cannot be read safely or
        does not fit.
    ModelError
        ``source`` is neither a known name nor an existing file.

    Examples
    --------
    >>> import mlbench as mb
    >>> net = mb.load_model("resunet_small")
    >>> mb.card(net).architecture, mb.card(net).input_size, mb.card(net).origin("input_size")
    ('cbam_resunet', 256, 'manifest')
    """
    if isinstance(source, str) and not _looks_like_path(source):
        try:
            name = resolve_name(source)
        except ModelError as exc:
            raise ModelError(f"{exc} It is not a file either ({Path(source).absolute()} does not exist): "
                             "pass a bundled name or the path of a checkpoint.") from None
        if model is not None or key is not None:
            raise ModelError(f"model= and key= apply to checkpoint files; {source!r} is a bundled model: "
                             f"call mb.load_model({source!r}) without them, or pass the path of your checkpoint")
        net = load_trained(name, data_dir() / "weights")
        return _to_device(attach_card(net, mb_card(net).merged(card)), device)
    return _to_device(load_checkpoint(source, model=model, card=card, key=key), device)


def _to_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``model.to(device)``, with an error that names the device and what this machine has instead
    of torch's (``AssertionError: Torch not compiled with CUDA enabled``, ``Invalid device string``)."""
    try:
        return model.to(device)
    except (AssertionError, RuntimeError, ModuleNotFoundError) as exc:
        if not re.search(r"not compiled with|not linked with|Invalid device|invalid device ordinal|no CUDA GPUs|"
                         r"Expected one of|Cannot access accelerator|No module named", str(exc)):
            raise  # out of memory on the device, a driver error: not the argument's fault
        have = (f"pass device='cpu' or one of cuda:0..cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available()
                else "this machine has no usable GPU: pass device='cpu'")
        raise OptionsError(f"device={device!r} cannot be used ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                           f"{have} (`mlbench doctor` shows what is visible)") from exc


mb_card = card  # the accessor, under a name the ``card`` argument does not hide


def _looks_like_path(source: str) -> bool:
    return Path(source).exists() or any(sep in source for sep in "/\\") or Path(source).suffix != ""


def load_checkpoint(path: str | Path, *, model: str | torch.nn.Module | None = None, card: ModelCard | None = None,
                    key: str | None = None, budgets: Budgets | None = None) -> torch.nn.Module:
    """Load a checkpoint file strictly into the architecture its tensors describe, or into ``model``.

    The widths of the known architectures come from the tensors, as the service's own loader reads
    them; the card records the file, its sha256, the architecture and widths (origin
    ``checkpoint``), the service's 1024 px input unless ``card`` says otherwise, and ``card``'s fields.

    ``budgets`` bounds reading the file (:class:`~mlbench.budgets.Budgets`; default the
    ``MLBENCH_MAX_*`` environment variables, else the defaults).

    Raises
    ------
    WeightsError
        The file is missing, not a regular file (a FIFO, a device), unreadable, unsafe, over a
        budget, damaged, or fits no architecture (or not ``model``).
    """
    kind, words = describe_file(path)  # before Path(): Path("") is "."
    given, path = os.fspath(path), Path(path)
    if kind == "missing":
        raise WeightsError(f"checkpoint {given!r} is not a file: it {words} (absolute path tried {path.absolute()}, "
                           f"working directory {Path.cwd()}); check the path, relative paths resolve against the "
                           "working directory")
    if kind != "regular":
        raise WeightsError(f"checkpoint {given!r} is not a regular file: it {words}; refused before opening it "
                           "(reading it could block or never end); pass the path of the checkpoint file itself")
    registered = REGISTERED.get(model) if isinstance(model, str) else None
    read = read_state_dict(path, path.stat().st_size, known_keys(None if registered else model), key, budgets)
    if read.state_dict is None or read.blocking:
        problems = "; ".join(f"[{code}] {message}" for code, message in read.problems if code in read.blocking)
        raise WeightsError(f"cannot load {path}: {problems or read.container or 'no state dict found'}. "
                           f"mb.check_weights({str(path)!r}) gives the full report")
    net, base = _target(path, read.state_dict, model, registered)
    _load_strict(net, read.state_dict, path)
    named = {"name": path.stem} if base.origin("name") in ("architecture", "default") else {}
    found = base.changed("checkpoint", source=str(path), sha256=file_sha256(path),
                         parameters=sum(p.numel() for p in net.parameters()), **named)
    return attach_card(net, found.merged(card)).eval()


def _target(path: Path, state_dict, model, registered) -> tuple[torch.nn.Module, ModelCard]:
    """The module to load into and its starting card."""
    if isinstance(model, torch.nn.Module):
        return model, mb_card(model)
    if registered is not None:
        factory, registered_card = registered
        net = factory()
        if not isinstance(net, torch.nn.Module):
            raise OptionsError(f"the factory registered as {model!r} returned {type(net).__name__}, not an nn.Module")
        return net, architecture_card(net).merged(registered_card)
    fits = rank_architectures(state_dict)
    name = resolve_name(model) if model is not None else (fits[0].model if fits[0].score == 1.0 else None)
    if name is None:
        raise WeightsError(f"{path} fits none of the known architectures {list_models()} exactly (best: {fits[0]}); "
                           "pass your own module: mb.load_model(path, model=MyNet(), card=mb.ModelCard(...)), "
                           f"or see mb.check_weights({str(path)!r})")
    try:
        net = build_model(name, widths=config_from_state_dict(name, state_dict))
    except WeightsError as exc:
        raise WeightsError(f"{path} is not a {name} checkpoint: {exc} Best fit: {fits[0]}") from None
    return net, architecture_card(net).changed("checkpoint", widths=repr(net.config))


def _load_strict(net: torch.nn.Module, state_dict, path: Path) -> None:
    diff = diff_keys(state_dict, net.state_dict())
    if diff["missing"] or diff["unexpected"] or diff["shape"]:
        first = (diff["missing"] + diff["unexpected"] + diff["shape"])[:3]
        raise WeightsError(f"{path} does not fit {type(net).__name__}: {len(diff['missing'])} missing, "
                           f"{len(diff['unexpected'])} unexpected, {len(diff['shape'])} shape mismatches "
                           f"(first: {first}); load into the model the checkpoint was trained with")
    net.load_state_dict(state_dict, strict=True)


def manifest_card(name: str, entry: dict[str, Any], path: Path, net: torch.nn.Module) -> ModelCard:
    """The card of a bundled model, from its manifest entry."""
    norm = entry.get("normalization", {})
    values = {"name": name, "source": f"bundled {path.name}", "sha256": entry["sha256"],
              "input_size": int(entry["input_size"]), "normalization": "imagenet",
              "mean": tuple(norm.get("mean", IMAGENET_MEAN)), "std": tuple(norm.get("std", IMAGENET_STD))}
    return architecture_card(net).changed("manifest", **values)


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
    actual = file_sha256(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"weights file {path} has sha256 {actual[:16]}... but the manifest expects {entry['sha256'][:16]}...; "
            "the file was changed or damaged: restore it from git, or retrain with `python -m mlbench.train` "
            "(which rewrites the manifest)"
        )
    model = build_model(canonical, size="small")
    model.load_state_dict(load_file(str(path)), strict=True)
    return attach_card(model, manifest_card(canonical, entry, path, model)).eval()


SHARED_MAX = 4
"""How many models :func:`shared_model` keeps (least recently used dropped first)."""


@dataclass
class _Shared:
    stamp: tuple[int, ...]  # the file's identity and change stamp when its sha256 was taken
    sha256: str
    model: torch.nn.Module
    tensors: list[torch.Tensor]  # parameters and buffers, to see in-place changes by their versions
    versions: int


_SHARED: OrderedDict[tuple[str, str], _Shared] = OrderedDict()
_SHAS: dict[str, tuple[tuple[int, ...], str]] = {}  # resolved path -> (stamp, sha256)
_LOCK = threading.Lock()


def shared_model(source: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model ``load_model(source)`` gives, loaded once and shared by the calls that name it.

    ``mb.segment(image, "hrnet")``, ``mb.Pipeline("hrnet")``, the CLI and the Stepper name models
    instead of holding them; loading each time read and hashed the weights file and built the
    network again (1.3-2.8x the cost of segmenting with a loaded model). The cache keeps the
    :data:`SHARED_MAX` most recently used models, keyed by the weights file (a bundled name's or
    the path, resolved) and the device. Each call checks the file's stamp (device, inode, size,
    modification and change times): when it moved, the file's sha256 is taken again, and a new
    sha256 loads the model again (an overwritten weights file is never served stale), the same one
    keeps it. :func:`clear_shared_models` empties the cache.

    The returned module is shared, in eval mode: use it for inference only. Do not train it, change
    its weights or its mode; a caller that wants to change a model takes its own copy with
    :func:`load_model`. A shared model found changed in place anyway (a parameter's version moved,
    or it was put in train mode) is dropped and loaded again, with a warning.

    Raises
    ------
    WeightsError, ModelError, OptionsError
        As :func:`load_model`, when the model cannot be loaded.
    """
    path = _weights_file(source)
    key = (str(path.resolve()), str(torch.device(device)))
    with _LOCK:
        hit = _SHARED.get(key)
        if hit is not None and _serves(hit, path):
            _SHARED.move_to_end(key)
            return hit.model
        model = load_model(source, device=device)  # also when the file is gone: it raises the WeightsError
        tensors = [*model.parameters(), *model.buffers()]
        _SHARED[key] = _Shared(_stamp(path), file_sha256(path), model, tensors, _version_sum(tensors))
        _SHARED.move_to_end(key)
        while len(_SHARED) > SHARED_MAX:
            _SHARED.popitem(last=False)
        return model


def clear_shared_models() -> int:
    """Forget every model :func:`shared_model` keeps (and the cached file hashes); returns how many."""
    with _LOCK:
        count = len(_SHARED)
        _SHARED.clear()
        _SHAS.clear()
        return count


def _serves(entry: _Shared, path: Path) -> bool:
    """Whether a cached model may serve: its file holds the same bytes, and nobody changed the model in place."""
    try:
        stamp = _stamp(path)
    except OSError:
        return False
    if stamp != entry.stamp:
        if file_sha256(path) != entry.sha256:
            return False
        entry.stamp = stamp  # touched or copied over with the same bytes: the model stays
    if entry.model.training or _version_sum(entry.tensors) != entry.versions:
        warnings.warn(f"the shared model for {path} was changed in place (trained, or its weights or mode changed); "
                      "it is loaded again. Shared models are for inference only: take your own copy with "
                      "mb.load_model(...) to change one", MlbenchWarning, stacklevel=4)
        return False
    return True


def _version_sum(tensors: list[torch.Tensor]) -> int:
    return sum(t._version for t in tensors)


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes when a file is written, replaced or truncated (the change time cannot be set back)."""
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, hashed again only when its stamp (device, inode, size, modification and
    change times) moved: loading a bundled model checks its file against the manifest each time."""
    where = str(Path(path).resolve())
    stamp = _stamp(Path(where))
    known = _SHAS.get(where)
    if known is not None and known[0] == stamp:
        return known[1]
    digest = sha256_file(where)
    _SHAS[where] = (stamp, digest)
    return digest


def _weights_file(source: str | Path) -> Path:
    """The file ``load_model(source)`` reads: a bundled name's weights, or the path itself."""
    if isinstance(source, str) and not _looks_like_path(source):
        manifest = data_dir() / "weights" / "manifest.json"
        return _bundled_file(resolve_name(source), manifest.stat().st_mtime_ns if manifest.exists() else 0)
    return Path(source)


@lru_cache(maxsize=16)
def _bundled_file(name: str, manifest_version: int) -> Path:
    """A bundled model's weights file, read from the manifest once per manifest version."""
    return weights_path(name)
