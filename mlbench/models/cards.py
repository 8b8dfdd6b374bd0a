"""A model's card: everything mlbench does with a model, in one record, with where each value came from.

The pipeline, the probes, the widgets, the service and the CLI read a model's recipe (input size,
channels, normalisation, resize), its head (sigmoid, softmax, fg/bg logits, argmax) and its
identity (name, architecture, widths, source file and sha256) from its card, never from loose
attributes. Bundled models get their card from the weights manifest, checkpoints from their
tensors, a user's model from the user (``mb.load_model(path, model=net, card=mb.ModelCard(...))``),
and what nobody said is a default, marked as such: ``mb.card(model)`` shows each value's origin.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from mlbench.errors import OptionsError
from mlbench.findings import ReportText

__all__ = ["ModelCard", "card", "attach_card", "card_fields_from_text", "IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "RESIZES",
           "INTERPOLATIONS", "OUTPUTS", "ORIGINS", "SERVICE_INPUT_SIZE"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)
"""ImageNet's statistics for one grey channel (the means of the three): a grey model's defaults."""
SERVICE_INPUT_SIZE = 1024
"""The side the service stretched every image to: the input size nobody set."""

NORMALIZATIONS = ("imagenet", "x/255", "x/255-0.5", "percentile", "clahe")
"""After scaling to [0, 1] by bit depth: ``imagenet`` subtracts ``mean`` and divides by ``std``
(per channel); ``x/255`` keeps [0, 1]; ``x/255-0.5`` centres it; ``percentile`` stretches the
image's own p1..p99 to [0, 1]; ``clahe`` equalises contrast locally (OpenCV CLAHE) first. A
callable ``f(image) -> image`` on the (H, W, C) float32 [0, 1] image is a recipe of your own."""
RESIZES = ("stretch", "letterbox", "pad", "downscale", "none")
"""``stretch`` to ``input_size`` squared (aspect not kept, as served); ``letterbox`` scales the long
side to ``input_size`` and pads the rest; ``pad`` pads to a multiple of ``input_multiple`` at the
image's own size; ``downscale`` shrinks (aspect kept) only above ``max_side``, then pads to the
multiple; ``none`` feeds the image as it is."""
INTERPOLATIONS = ("area", "lanczos", "bilinear", "bilinear-antialias")
OUTPUTS = ("sigmoid", "softmax", "fg_bg", "argmax", "probability")
"""``sigmoid``: one channel of logits; ``softmax``: K class logits, the foreground probability is
the sum over ``foreground``; ``fg_bg``: two logits (background, foreground); ``argmax``: K class
logits, a pixel is foreground when its top class is in ``foreground`` (no threshold);
``probability``: one channel already through the model's own sigmoid, values in [0, 1]."""
ORIGINS = ("user", "checkpoint", "manifest", "architecture", "case", "default")

_CHOICES = {"resize": RESIZES, "interpolation": INTERPOLATIONS, "output": OUTPUTS}


@dataclass(frozen=True, repr=False)
class ModelCard(ReportText):
    """What mlbench does with one model. Every field is optional: unset ones take defaults.

    Parameters
    ----------
    name : the name shown in widgets, reports and responses.
    architecture : ``hrnet``, ``cbam_resunet``, ``ma_resunet`` or the class name of a user's model.
    widths : the width configuration, as text.
    parameters : the parameter count.
    source : where the weights came from (a file path, ``bundled``, ``built``).
    sha256 : of the weights file.
    input_size : the side the model runs at (the service: 1024).
    input_multiple, min_input_size : H and W must be multiples of this, and at least that.
    channels : 1 (grey) or 3 (RGB); an image of the other kind is converted, and the run says so.
    normalization : one of :data:`NORMALIZATIONS` or a callable.
    mean, std : per-channel statistics of ``imagenet`` normalisation (any values: your data's).
    resize, interpolation, max_side : the geometry, see :data:`RESIZES`.
    output, classes, foreground : the head, see :data:`OUTPUTS`; ``classes`` None reads K from the output.
    threshold : foreground probability above which (strictly) a pixel is foreground.
    origins : field -> one of :data:`ORIGINS`; fields not listed are defaults.
    """

    name: str = ""
    architecture: str = ""
    widths: str = ""
    parameters: int | None = None
    source: str = ""
    sha256: str = ""
    input_size: int = SERVICE_INPUT_SIZE
    input_multiple: int = 1
    min_input_size: int = 1
    channels: int = 3
    normalization: str | Callable[[Any], Any] = "imagenet"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "stretch"
    interpolation: str = "area"
    max_side: int | None = None
    output: str = "sigmoid"
    classes: int | None = None
    foreground: tuple[int, ...] = (1,)
    threshold: float = 0.5
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "foreground", tuple(int(v) for v in self.foreground))
        origins = dict(self.origins)
        if not origins:  # built by hand: what differs from the defaults was said by the user
            origins = {f.name: "user" for f in fields(self) if f.name != "origins" and getattr(self, f.name) != f.default}
        object.__setattr__(self, "origins", origins)
        _check(self)

    def changed(self, origin: str = "user", **values: Any) -> ModelCard:
        """A copy with ``values`` set and their origin recorded (``user`` unless said otherwise)."""
        unknown = sorted(set(values) - {f.name for f in fields(self)} - {"origins"})
        if unknown:
            raise OptionsError(f"ModelCard has no field(s) {unknown}; fields are {card_fields()}")
        if origin not in ORIGINS:
            raise OptionsError(f"origin {origin!r} is unknown; expected one of {ORIGINS}")
        return replace(self, **values, origins={**self.origins, **{k: origin for k in values}})

    def merged(self, other: ModelCard | None) -> ModelCard:
        """This card with every field ``other`` set explicitly (its non-default origins) on top."""
        if other is None:
            return self
        return self.changed("user", **{k: getattr(other, k) for k in other.origins if other.origins[k] == "user"})

    def origin(self, name: str) -> str:
        """Where ``name``'s value came from."""
        return self.origins.get(name, "default")

    @property
    def output_channels(self) -> int | None:
        """The channels the head must emit: 1 for sigmoid, 2 for fg_bg, ``classes`` otherwise
        (None: any number from 2, read from the output)."""
        return {"sigmoid": 1, "probability": 1, "fg_bg": 2}.get(self.output, self.classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a callable normalisation by its name) and their origins."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "origins"}
        if callable(self.normalization):
            out["normalization"] = f"callable {getattr(self.normalization, '__name__', 'function')}"
        out["foreground"], out["mean"], out["std"] = list(self.foreground), list(self.mean), list(self.std)
        out["origins"] = {name: self.origin(name) for name in card_fields()}
        return out

    def text(self) -> str:
        rows = [f"ModelCard({self.name or self.architecture or 'unnamed model'})"]
        for name in card_fields():
            value = getattr(self, name)
            if name in ("mean", "std") and self.normalization != "imagenet":
                continue
            if callable(value):
                value = f"callable {getattr(value, '__name__', 'function')}"
            rows.append(f"  {name:<15} {value!s:<40} ({self.origin(name)})")
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        rows = [(name, getattr(self, name), self.origin(name)) for name in card_fields()]
        return self._html(f"ModelCard {self.name or self.architecture}", (("field", "value", "from"), rows))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "user") -> ModelCard:
        """A card from JSON-like ``values`` (e.g. ``--card '{"channels": 1}'``); each value's origin is ``origin``."""
        if not isinstance(values, Mapping):
            raise OptionsError(f"a card must be a mapping of field -> value, got {type(values).__name__}; "
                               'e.g. {"normalization": "x/255-0.5", "channels": 1}')
        return cls().changed(origin, **{k: v for k, v in values.items() if k != "origins"})


def card_fields_from_text(text: str, where: str = "--card") -> dict[str, Any]:
    """The card fields a command line gives: a JSON object, or ``@file.json`` naming a file of one.

    The fields are not checked here (:meth:`ModelCard.from_dict` does that); ``where`` names the
    option in the errors.

    Raises
    ------
    OptionsError
        A missing file, text that is not JSON, or JSON that is not an object.
    """
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise OptionsError(f"{where} {text}: {path} is not a file (absolute path {path.absolute()}); "
                               "expected @FILE.json naming a JSON file, or the JSON object itself")
        text, where = path.read_text(), f"{where} {text}"
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptionsError(f"{where} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno} of {text!r}); "
                           f"expected an object, e.g. {where.split()[0]} '{{\"input_size\": 512}}'") from None
    if not isinstance(values, dict):
        raise OptionsError(f"{where} is {type(values).__name__} JSON; expected an object, "
                           f"e.g. {where.split()[0]} '{{\"input_size\": 512}}'")
    return values


def card_fields() -> list[str]:
    """The card's field names, in order (``origins`` aside)."""
    return [f.name for f in fields(ModelCard) if f.name != "origins"]


def _check(c: ModelCard) -> None:
    """Refuse a card that cannot be right, naming the field, the value and what is allowed."""
    for name, allowed in _CHOICES.items():
        if getattr(c, name) not in allowed:
            raise OptionsError(f"ModelCard {name}={getattr(c, name)!r} is not one of {allowed}")
    if not (callable(c.normalization) or c.normalization in NORMALIZATIONS):
        raise OptionsError(f"ModelCard normalization={c.normalization!r} is not one of {NORMALIZATIONS} "
                           "or a callable f(image) -> image")
    if c.channels not in (1, 3):
        raise OptionsError(f"ModelCard channels={c.channels!r}: expected 1 (grey) or 3 (RGB)")
    if c.normalization == "imagenet" and (len(c.mean) != c.channels or len(c.std) != c.channels):
        raise OptionsError(f"ModelCard mean {c.mean} and std {c.std} must have one value per channel "
                           f"({c.channels}); for a grey model pass e.g. mean={GREY_MEAN}, std={GREY_STD}")
    if any(s <= 0 for s in c.std):
        raise OptionsError(f"ModelCard std={c.std}: every value must be > 0")
    if c.input_size < 16 or c.input_multiple < 1 or c.min_input_size < 1:
        raise OptionsError(f"ModelCard input_size={c.input_size}, input_multiple={c.input_multiple}, "
                           f"min_input_size={c.min_input_size}: expected input_size >= 16 and the others >= 1")
    if not 0.0 < float(c.threshold) < 1.0:
        raise OptionsError(f"ModelCard threshold={c.threshold!r} is outside (0, 1)")
    _check_head(c)


def _check_head(c: ModelCard) -> None:
    if c.output in ("softmax", "argmax"):
        if c.classes is not None and c.classes < 2:
            raise OptionsError(f"ModelCard output={c.output!r} needs classes >= 2, got {c.classes}; a one-channel "
                               "head is output='sigmoid'")
        top = c.classes - 1 if c.classes else None
        bad = [k for k in c.foreground if k < 0 or (top is not None and k > top)]
        if bad or not c.foreground:
            raise OptionsError(f"ModelCard foreground={list(c.foreground)} must name classes in 0..{top if top else 'K-1'}"
                               " (class 0 is usually the background): e.g. foreground=[1]")
    elif c.classes not in (None, c.output_channels):
        raise OptionsError(f"ModelCard output={c.output!r} has {c.output_channels} channel(s) but classes="
                           f"{c.classes}; leave classes at its default or use output='softmax'")


def card(model: torch.nn.Module) -> ModelCard:
    """The card of ``model``: the one attached by :func:`mlbench.load_model`, else one derived from
    the model (the three known architectures know their input multiple and minimum size), with
    every other value a default.

    Raises
    ------
    OptionsError
        When ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise OptionsError(f"mb.card expects an nn.Module, got {type(model).__name__}; load one with mb.load_model")
    attached = getattr(model, "mlbench_card", None)
    if isinstance(attached, ModelCard):
        if attached.origin("channels") == "default" and _first_conv_channels(model) == 1 != attached.channels:
            grey = {k: v for k, v in (("mean", GREY_MEAN), ("std", GREY_STD)) if attached.origin(k) == "default"}
            return attached.changed("architecture", channels=1, **grey)  # a card that did not say; the model does
        return attached
    return architecture_card(model)


def input_multiple(model: torch.nn.Module) -> int:
    """The multiple the model's input sides must be: its card's or its class's, whichever is larger."""
    return max(1, int(getattr(model, "input_multiple", 1)), card(model).input_multiple)


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    """The input channels of the model's first 2-D convolution (None without one)."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if first is None else first.in_channels


def architecture_card(model: torch.nn.Module) -> ModelCard:
    """What the model's class says about itself: name, architecture, widths, parameters, multiple,
    minimum; and one grey channel (with :data:`GREY_MEAN`, :data:`GREY_STD`) when its first
    convolution takes one, which three channels would crash."""
    arch = getattr(type(model), "mlbench_name", "") or type(model).__name__
    values: dict[str, Any] = {"name": arch, "architecture": arch,
                              "parameters": sum(p.numel() for p in model.parameters())}
    config = getattr(model, "config", None)
    if config is not None and getattr(type(model), "mlbench_name", ""):
        values["widths"] = repr(config)
    for key in ("input_multiple", "min_input_size"):
        if isinstance(getattr(type(model), key, None), int):
            values[key] = getattr(type(model), key)
    if _first_conv_channels(model) == 1:  # a grey model: fed 3 channels, its first conv would refuse them
        values.update(channels=1, mean=GREY_MEAN, std=GREY_STD)
    return ModelCard().changed("architecture", **values)


def attach_card(model: torch.nn.Module, model_card: ModelCard) -> torch.nn.Module:
    """Give ``model`` its card (``model.mlbench_card``) and return the model."""
    if not isinstance(model_card, ModelCard):
        raise OptionsError(f"card must be a mb.ModelCard, got {type(model_card).__name__}; "
                           "e.g. mb.ModelCard(normalization='x/255', channels=1)")
    model.mlbench_card = model_card
    return model
