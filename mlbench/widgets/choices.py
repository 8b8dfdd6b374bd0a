"""What the Stepper chooses from: models and images, each under the name its dropdown shows.

Pure bookkeeping, no ipywidgets. A model is a bundled name, a checkpoint path or an
``nn.Module``; it is loaded once, when first asked for, by the loader (default
:func:`mlbench.load_model`). An image is a bundled sample (with its ground truth), a file, bytes
or an array.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from mlbench.errors import ModelError, OptionsError
from mlbench.models.cards import card
from mlbench.models.registry import resolve_name
from mlbench.samples.bundled import load_sample

__all__ = ["ModelChoices", "ImageChoices", "ModelSource"]

ModelSource = Union[str, Path, torch.nn.Module]
"""A bundled name (or service id), a checkpoint path, or a model."""


def bundled_name(source: Any) -> str | None:
    """The bundled model ``source`` is (canonical name), or None.

    A string that is a bundled name or alias (and no file of that name exists); a module whose
    card took its name from the weights manifest (what :func:`mlbench.load_model` gives for a
    bundled name).
    """
    if isinstance(source, torch.nn.Module):
        found = card(source)
        return bundled_name(found.name) if found.origin("name") == "manifest" else None
    if not isinstance(source, str) or Path(source).exists():
        return None
    try:
        return resolve_name(source)
    except ModelError:
        return None


def _check_source(source: Any) -> None:
    if not isinstance(source, (str, Path, torch.nn.Module)):
        raise OptionsError(f"a model must be a bundled name, a checkpoint path (str or Path) or an nn.Module, got "
                           f"{type(source).__name__}; e.g. models={{'production': 'weights/best.pth', 'candidate': net}}")


class ModelChoices:
    """Display name -> model source, in order, with the models loaded so far.

    Parameters
    ----------
    loader : callable
        ``source -> nn.Module`` for names and paths (modules are used as they are).
    """

    def __init__(self, loader: Callable[[Any], torch.nn.Module]) -> None:
        self.loader = loader
        self.sources: dict[str, ModelSource] = {}
        self.loaded: dict[str, torch.nn.Module] = {}

    @property
    def names(self) -> list[str]:
        """The display names, in the order they were added."""
        return list(self.sources)

    def extend(self, models: ModelSource | Mapping[str, ModelSource] | list | tuple) -> list[str]:
        """Add one source, a list of sources, or a mapping ``{display name: source}``; returns their names."""
        if isinstance(models, Mapping):
            return [self.add(source, name) for name, source in models.items()]
        if isinstance(models, (list, tuple)):
            return [self.add(source) for source in models]
        return [self.add(models)]

    def add(self, source: ModelSource, name: str | None = None) -> str:
        """Add ``source`` under ``name`` (default: :meth:`default_name`) and return the name it got.

        A source already there without a new name keeps its entry. A name that is a bundled
        model's but not its source gets the kind appended (``"hrnet (checkpoint)"``); a name
        taken by another entry gets a number.

        Raises
        ------
        OptionsError
            When ``source`` is not a name, a path or a module, or ``name`` is not a non-empty string.
        """
        _check_source(source)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise OptionsError(f"a model's display name must be a non-empty string, got {name!r}")
        same = self._find(source) if name is None else None
        if same is not None:
            return same
        label = name or self.default_name(source)
        if bundled_name(label) is not None and bundled_name(label) != bundled_name(source):
            label = f"{label} ({'module' if isinstance(source, torch.nn.Module) else 'checkpoint'})"
        base, number = label, 2
        while label in self.sources:
            label, number = f"{base} ({number})", number + 1
        self.sources[label] = source
        if isinstance(source, torch.nn.Module):
            self.loaded[label] = source
        return label

    def _find(self, source: ModelSource) -> str | None:
        """The name of the entry that is the same model as ``source`` (a module there is used from now on)."""
        bundled = bundled_name(source)
        for label, known in self.sources.items():
            if known is source or (bundled is not None and bundled_name(known) == bundled) or (
                    isinstance(source, (str, Path)) and isinstance(known, (str, Path)) and _same_file(source, known)):
                if isinstance(source, torch.nn.Module):
                    self.loaded[label] = source
                return label
        return None

    @staticmethod
    def default_name(source: ModelSource) -> str:
        """A module's card name (else its class name), a path's file stem, a bundled name as given."""
        if isinstance(source, torch.nn.Module):
            return card(source).name or type(source).__name__
        return source if bundled_name(source) is not None else Path(source).stem or str(source)

    def remove(self, name: str) -> None:
        """Forget the entry ``name`` (and its loaded model)."""
        self.sources.pop(name, None)
        self.loaded.pop(name, None)

    def load(self, name: str) -> torch.nn.Module:
        """The model of entry ``name``, loaded by the loader the first time (errors propagate, nothing is kept)."""
        if name not in self.loaded:
            self.loaded[name] = self.loader(self.sources[name])
        return self.loaded[name]


def _same_file(a: str | Path, b: str | Path) -> bool:
    if bundled_name(a) is not None or bundled_name(b) is not None:
        return False
    return Path(a).expanduser().absolute() == Path(b).expanduser().absolute()


class ImageChoices:
    """Display name -> ``(source, image, truth)``: the bundled samples (loaded when first asked for) and the
    images opened since (``image`` and ``truth`` None: the decode stage reads ``source``)."""

    def __init__(self, samples: list[str]) -> None:
        self.samples = list(samples)
        self.sources: dict[str, tuple[Any, np.ndarray | None, np.ndarray | None]] = {}

    @property
    def names(self) -> list[str]:
        """The samples, then the images opened, in order."""
        return self.samples + [name for name in self.sources if name not in self.samples]

    def add(self, name: str, source: Any) -> str:
        """Add (or replace) the image ``name``; returns ``name``."""
        self.sources[name] = (source, None, None)
        return name

    def get(self, name: str) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        """``(source, image, truth)`` of ``name``; a sample's image and ground truth are loaded once."""
        if name not in self.sources:
            sample = load_sample(name)
            self.sources[name] = (sample.path, sample.image, sample.mask)
        return self.sources[name]
