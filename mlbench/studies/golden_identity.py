"""Who produced a golden file's outputs: the model (how to build it again, what it is) and the environment.

:class:`ModelSpec` is what ``golden check`` builds the model from again: a bundled name, a
checkpoint, or a factory ``"module:callable"`` / ``"path/to/file.py:callable"`` that returns your
own ``nn.Module`` (a checkpoint loaded into it when given), plus the card fields you set; file
paths are stored relative to the golden file's folder. :func:`model_identity` is what the model
*is* (its card and a sha256 of its tensors, whatever the file format), :func:`environment` where
it ran: the versions of the packages that decode, resize and compute (as distributions, and as
the modules actually imported), Python, platform, device and torch threads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mlbench.errors import OptionsError
from mlbench.models.cards import ModelCard, attach_card, card as card_of
from mlbench.models.loading import load_model

__all__ = ["ModelSpec", "is_factory", "call_factory", "card_fields", "state_sha256", "model_identity", "environment", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("torch", "numpy", "pillow", "opencv-python-headless", "opencv-python", "tifffile", "imagecodecs",
                 "scipy", "safetensors", "mlbench")
"""The distributions whose versions every golden file records (``packages=`` adds more)."""
MODULES = (("torch", "torch"), ("numpy", "numpy"), ("Pillow", "PIL"), ("OpenCV", "cv2"), ("tifffile", "tifffile"))
"""(label, module): the versions the imported modules report (two OpenCV wheels can both be installed)."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the model again.

    ``model``: a bundled name, a checkpoint path, the architecture ``weights`` must be, or a
    factory ``"module:callable"`` / ``"file.py:callable"`` returning an ``nn.Module``;
    ``weights``: a checkpoint file (into the factory's module when there is one); ``card``: the
    card fields you set (``{"input_size": 128}``).
    """

    model: str = ""
    weights: str = ""
    card: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """The model, freshly loaded (eval mode for checkpoints and bundled names).

        Raises
        ------
        OptionsError
            Neither a model nor weights, or a factory that cannot be imported or returns no module.
        WeightsError, ModelError
            From :func:`mlbench.load_model`.
        """
        user = ModelCard.from_dict(self.card) if self.card else None
        if is_factory(self.model):
            net = call_factory(self.model)
            if self.weights:
                return load_model(Path(self.weights), model=net, card=user)
            return attach_card(net, card_of(net).merged(user))
        if self.weights:
            return load_model(Path(self.weights), model=self.model or None, card=user)
        if not self.model:
            raise OptionsError("no model to run: give a model (a bundled name, a checkpoint path or a factory "
                               "'module:callable') or weights=PATH (--model / --weights)")
        return load_model(self.model, card=user)

    def stored(self, base: Path) -> dict[str, Any]:
        """JSON form, file paths relative to ``base`` (the golden file's folder)."""
        return {"model": _relative(self.model, base), "weights": _relative(self.weights, base), "card": dict(self.card)}

    @classmethod
    def restored(cls, values: Mapping[str, Any], base: Path) -> ModelSpec:
        """The spec :meth:`stored` wrote, its relative file paths resolved against ``base``."""
        model, weights = values.get("model") or "", values.get("weights") or ""
        return cls(_absolute(model, base, always=False), _absolute(weights, base, always=True),
                   dict(values.get("card") or {}))


def _split(text: str) -> tuple[str, str]:
    """(file or name, ``:callable`` or "") of a model text."""
    if is_factory(text):
        target, _, name = text.rpartition(":")
        return target, ":" + name
    return text, ""


def _relative(text: str, base: Path) -> str:
    """``text`` with its file (a checkpoint, a factory's ``file.py``) written relative to ``base``; a name as it is."""
    target, rest = _split(text)
    if target and Path(target).is_file():
        target = Path(os.path.relpath(Path(target).resolve(), base)).as_posix()
    return target + rest


def _absolute(text: str, base: Path, always: bool) -> str:
    """The inverse of :func:`_relative`: a relative file path resolved against ``base`` (a model text only when it
    names a ``.py`` factory or a file that exists there: ``hrnet`` stays a name)."""
    target, rest = _split(text)
    path = Path(target)
    if target and not path.is_absolute() and (always or target.endswith(".py") or (base / path).is_file()):
        target = str((base / path).resolve())
    return target + rest


def is_factory(text: str) -> bool:
    """``"package.module:callable"`` or ``"path/file.py:callable"`` (a Windows drive ``C:\\...`` is not).

    >>> is_factory("my_models:make_unet"), is_factory("toys/net.py:build"), is_factory("hrnet"), is_factory("C:\\\\w.pth")
    (True, True, False, False)
    """
    target, sep, name = (text or "").rpartition(":")
    if not sep or not name.isidentifier():
        return False
    return target.endswith(".py") or all(part.isidentifier() for part in target.split("."))


def call_factory(text: str) -> torch.nn.Module:
    """The module a factory ``"package.module:callable"`` or ``"path/file.py:callable"`` returns (its weights
    are the factory's: pass --weights or mb.load_model(path, model=...) for a checkpoint)."""
    target, _, name = text.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise OptionsError(f"model factory {text!r}: {path} is not a file (absolute {path.absolute()}); expected "
                               "'path/to/file.py:callable' naming a Python file that defines the callable")
        module_name = "mlbench_factory_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise OptionsError(f"model factory {text!r}: cannot import {target!r} ({type(exc).__name__}: {exc}); "
                               "install it, run from the folder that holds it, or give 'path/to/file.py:callable'") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise OptionsError(f"model factory {text!r}: {target} has no callable {name!r}; expected a function that "
                           "returns an nn.Module")
    net = factory()
    if not isinstance(net, torch.nn.Module):
        raise OptionsError(f"model factory {text!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def card_fields(given: ModelCard | Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's card fields as JSON values (a golden file must be able to rebuild them)."""
    if given is None:
        return {}
    fields = {k: getattr(given, k) for k, o in given.origins.items() if o == "user"} if isinstance(given, ModelCard) \
        else dict(given)
    ModelCard.from_dict(fields)  # refuse unknown fields and bad values now
    if any(callable(v) for v in fields.values()):
        raise OptionsError(f"card fields {sorted(k for k, v in fields.items() if callable(v))} are callables, which a "
                           "golden file cannot store; build the model with a factory 'module:callable' that attaches "
                           "its card (mb.attach_card) instead")
    return json.loads(json.dumps(fields))


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the state dict (name, dtype, shape, bytes): the weights, whatever the file."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """What the model is, for the model diff: its card (file paths left out) and the hash of its tensors."""
    values = {k: v for k, v in card_of(model).to_dict().items() if k not in ("source", "origins")}
    return values | {"module": type(model).__qualname__, "state_sha256": state_sha256(model)}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _device(device: str) -> str:
    if not str(device).startswith("cuda"):
        return str(device)
    try:
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    except (AssertionError, RuntimeError) as exc:  # a CPU-only build, or no such GPU
        return f"{device} (unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def environment(packages: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """Where outputs were computed: Python, platform, device, torch threads, the versions of
    :data:`DISTRIBUTIONS` and ``packages`` (None when not installed) and of the imported modules."""
    modules = {}
    for label, name in MODULES:
        try:
            modules[label] = getattr(importlib.import_module(name), "__version__", None)
        except ImportError:
            modules[label] = None
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "device": _device(device),
            "torch_threads": torch.get_num_threads(),
            "packages": {name: _version(name) for name in dict.fromkeys((*DISTRIBUTIONS, *packages))},
            "modules": modules}
