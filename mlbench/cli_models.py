"""``--weights PATH`` and ``--card JSON``: how every command that takes a model is given one.

``mlbench/cli.py`` adds both flags to each command of its ``MODEL_COMMANDS`` table with
:func:`add_model_options` and, before the command runs, turns ``--model NAME`` (or ``--models``),
``--weights PATH`` and ``--card JSON`` into models with :func:`resolve_model_options`, through
:func:`mlbench.load_model`. The commands themselves keep working with names alone:

- neither flag: the name (or the command's default) is left as it is, for the command to load;
- ``--weights PATH``: the checkpoint, its architecture and widths read from its tensors (with
  ``--model NAME`` it must be that architecture); ``--weights`` may repeat where a command takes
  several models, each one model named by its card;
- ``--card JSON`` (a JSON object, or ``@file.json``): card fields (``{"input_size": 512}``) over
  what the weights or the manifest say, for the checkpoint or the named model;
- ``--model path/file.py:callable`` (or ``package.module:callable``): your own architecture, built by
  that factory; with ``--weights`` the checkpoint is loaded into it (as ``mb.load_model(path, model=...)``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mlbench.errors import OptionsError
from mlbench.models import list_models, resolve_name
from mlbench.models.cards import ModelCard, attach_card, card, card_fields_from_text
from mlbench.models.loading import load_model
from mlbench.studies.golden_identity import call_factory, is_factory

__all__ = ["ModelOptions", "add_model_options", "resolve_model_options", "read_card"]

_CARD_HELP = ("card fields as a JSON object, or @file.json, over what the weights say, e.g. "
              '\'{"input_size": 512, "normalization": "x/255"}\' (fields: see mb.ModelCard)')


def _bundled(args: argparse.Namespace, name: str) -> torch.nn.Module:
    return load_model(name)


@dataclass(frozen=True)
class ModelOptions:
    """How one command takes its model.

    Parameters
    ----------
    many : the command takes several (``--models``, ``--weights`` repeatable) instead of one (``--model``).
    build : how a named model is made when ``--card`` applies to it (default: the bundled trained weights).
    note : said after the ``--weights`` help, e.g. what the checkpoint replaces.
    """

    many: bool = False
    build: Callable[[argparse.Namespace, str], torch.nn.Module] = _bundled
    note: str = ""


def add_model_options(parser: argparse.ArgumentParser, options: ModelOptions) -> None:
    """Add ``--weights PATH`` and ``--card JSON`` to ``parser``, whose ``--model`` (or ``--models``, or
    positional ``model``) default is kept for :func:`resolve_model_options`."""
    dest = "models" if options.many else "model"
    parser.set_defaults(model_options=options, model_default=parser.get_default(dest), **{dest: None})
    if options.many:
        weights = "checkpoint file to run next to --models (repeatable; each is one model, named by its card)"
    else:
        weights = "checkpoint file (.pth, .pt, .safetensors): architecture and widths read from its tensors; " \
                  "with a model name it must be that architecture; for your own architecture give its factory, " \
                  "--model path/file.py:callable"
    parser.add_argument("--weights", metavar="PATH", action="append" if options.many else "store",
                        help=weights + (f"; {options.note}" if options.note else ""))
    parser.add_argument("--card", metavar="JSON", help=_CARD_HELP + ("; for every model" if options.many else ""))


def resolve_model_options(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``model`` (or ``models``) resolved from ``--model``, ``--weights`` and ``--card``;
    unchanged for a command without those options.

    Raises
    ------
    OptionsError
        A bad ``--card``, no model at all, or two models of one name.
    WeightsError
        A ``--weights`` file that is missing, unreadable, or fits no architecture (or not ``--model``).
    """
    options = getattr(args, "model_options", None)
    if options is None:
        return args
    user = read_card(args.card)
    if options.many:
        args.models = _several(args, options, user)
    else:
        args.model = _one(args, options, user)
    return args


def _one(args: argparse.Namespace, options: ModelOptions, user: ModelCard | None) -> torch.nn.Module | str:
    if isinstance(args.model, str) and is_factory(args.model):  # your own architecture
        built = call_factory(args.model)
        if args.weights:
            return load_model(Path(args.weights), model=built, card=user)
        return built if user is None else _carded(built, user)
    if args.weights:
        return load_model(Path(args.weights), model=args.model, card=user)
    name = args.model or args.model_default
    if name is None:
        raise OptionsError(f"`mlbench {args.command}` needs a model: a name ({' | '.join(list_models())}) or "
                           f"--weights PATH; e.g. mlbench {args.command} hrnet, or mlbench {args.command} --weights model.pth")
    return name if user is None else _carded(options.build(args, name), user)


def _several(args: argparse.Namespace, options: ModelOptions, user: ModelCard | None) -> list[torch.nn.Module | str]:
    weights = args.weights or []
    names = args.models or ([] if weights else list(args.model_default or list_models()))
    models = [_named(args, options, user, name) for name in names]
    return _distinct(models + [load_model(Path(path), card=user) for path in weights])


def _named(args: argparse.Namespace, options: ModelOptions, user: ModelCard | None, name: str) -> torch.nn.Module | str:
    """One model of ``--models``: a factory's module, else the name (built now only when a card applies)."""
    if is_factory(name):
        built = call_factory(name)
        return built if user is None else _carded(built, user)
    return name if user is None else _carded(options.build(args, name), user)


def _carded(model: torch.nn.Module, user: ModelCard) -> torch.nn.Module:
    return attach_card(model, card(model).merged(user))


def _name(model: torch.nn.Module | str) -> str:
    return resolve_name(model) if isinstance(model, str) else card(model).name


def _distinct(models: list[torch.nn.Module | str]) -> list[torch.nn.Module | str]:
    """The models, a checkpoint whose card name another model has renamed after its path (as given).

    Raises
    ------
    OptionsError
        When two models still share a name (the same name given twice, or a ``--card`` name).
    """
    names = [_name(m) for m in models]
    for i, model in enumerate(models):
        if names.count(names[i]) > 1 and not isinstance(model, str):
            found = card(model)
            if found.origin("name") != "user" and Path(found.source).is_file():
                models[i] = attach_card(model, found.changed("checkpoint", name=found.source))
    names = [_name(m) for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionsError(f"two models are named {twice} (names {names}); each model needs its own name: "
                           "give each name once, drop 'name' from --card, or rename one of the checkpoint files")
    return models


def read_card(text: str | None) -> ModelCard | None:
    """The card ``--card`` gives: a JSON object, or ``@file.json``; None without ``--card``.

    Raises
    ------
    OptionsError
        A missing file, text that is not JSON, not an object, or a field or value a card refuses.
    """
    if text is None:
        return None
    values = card_fields_from_text(text)
    where = "--card" if not text.startswith("@") else f"--card {text}"
    try:
        return ModelCard.from_dict(values)
    except OptionsError as exc:
        raise OptionsError(f"{where}: {exc}") from None
