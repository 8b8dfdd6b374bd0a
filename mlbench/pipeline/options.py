"""Pipeline options and the presets that name whole option sets.

``"fixed"`` is the careful default; ``"as_served"`` reproduces the historic service
byte for byte, bugs included, so that a production failure can be replayed. A notebook
reproduces a failure by choosing the preset or the single option that caused it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from mlbench.errors import OptionsError
from mlbench.models.cards import INTERPOLATIONS, NORMALIZATIONS, RESIZES, ModelCard

__all__ = ["parse_option_pairs", "PipelineOptions", "PRESETS", "PRESET_NAMES", "make_options", "reject_unknown_options", "STAGE_OF_OPTION"]

_CHOICES = {
    "decoder": ("careful", "pil"),
    "resize": (None, *RESIZES),
    "interpolation": (None, *INTERPOLATIONS),
    "scaling": ("dynamic", "divide_255"),
    "normalize": (None, "none", "card", *NORMALIZATIONS),
    "sigmoid": ("always", "if_outside_unit"),
    "hierarchy": ("tree", "as_served"),
    "train_mode": ("eval", "refuse", "keep"),
}
_FROM_CARD = {"resize": "resize", "interpolation": "interpolation", "normalize": "normalization",
              "input_size": "input_size", "threshold": "threshold"}
"""Options that, left at None, take the model card's value."""


@dataclass(frozen=True)
class PipelineOptions:
    """Every knob of the pipeline. Defaults are the ``fixed`` preset.

    Options left at None take the model's card value (:func:`mlbench.card`): the recipe the
    weights were trained with. A preset or an explicit value overrides the card, which is how the
    ``as_served`` preset replays the service's historic recipe.

    Attributes
    ----------
    decoder : "careful" keeps 16-bit and float data (:func:`mlbench.read_image`);
        "pil" is the service's ``PIL.Image.open``.
    convert_rgb : with the "pil" decoder, call ``convert('RGB')`` (clips 16-bit at 255).
        False reproduces the refactor that crashed on grayscale images.
    resize : one of :data:`mlbench.models.cards.RESIZES` ("stretch" to ``input_size`` squared,
        aspect not kept, as served; "letterbox", "pad", "downscale", "none").
    input_size : model input side in pixels (the card's: 1024 for checkpoints, the trained size
        for the bundled small models).
    interpolation : "area" (float, no ringing), "lanczos" (PIL, as served), "bilinear" or
        "bilinear-antialias".
    scaling : "dynamic" divides by the effective bit depth's maximum (255, 4095, 65535);
        "divide_255" divides by 255 whatever the data.
    normalize : one of :data:`mlbench.models.cards.NORMALIZATIONS` ("imagenet" applies the card's
        mean/std), or "none" (the [0, 1] values as they are: the service forgot the mean/std).
    sigmoid : "always" (the models emit logits) or "if_outside_unit" (only when the
        output leaves [0, 1], the service's heuristic).
    threshold : probability above which (strictly) a pixel is foreground, 0.1..0.9 as the API.
    train_mode : a model left in train mode with BatchNorm or Dropout: "eval" runs the forward in
        eval mode and warns (the model's own flags restored afterwards), "refuse" raises, "keep"
        runs it as it is (to reproduce that bug).
    detect_holes : find inner contours (holes) too.
    min_area : contours with a smaller area (pixels) are dropped.
    hierarchy : "tree" types and parents polygons by nesting depth; "as_served" keeps the
        service's bug (parent looked up only among polygons already emitted).
    device : where the forward runs.
    """

    decoder: str = "careful"
    convert_rgb: bool = True
    resize: str | None = None
    input_size: int | None = None
    interpolation: str | None = None
    scaling: str = "dynamic"
    normalize: str | None = None
    sigmoid: str = "always"
    threshold: float | None = None
    detect_holes: bool = True
    min_area: float = 50.0
    hierarchy: str = "tree"
    device: str = "cpu"
    train_mode: str = "eval"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise OptionsError(f"option {name}={value!r} is not allowed; expected one of {allowed}")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise OptionsError(f"option threshold={self.threshold!r} is outside (0, 1); the service accepts 0.1..0.9")
        if self.input_size is not None and int(self.input_size) < 16:
            raise OptionsError(f"option input_size={self.input_size!r} is too small; expected >= 16 or None")
        if self.min_area < 0:
            raise OptionsError(f"option min_area={self.min_area!r} is negative; expected >= 0 (the service uses 50)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-ready)."""
        return asdict(self)

    def resolved(self, card: ModelCard) -> "PipelineOptions":
        """These options with every None filled from ``card`` (what a run actually uses)."""
        values = {option: getattr(card, field) for option, field in _FROM_CARD.items() if getattr(self, option) is None}
        if callable(values.get("normalize")):
            values["normalize"] = "card"  # the card's own callable: the preprocess stage calls it
        return replace(self, **values) if values else self

    def changed(self, other: "PipelineOptions") -> list[str]:
        """Names of the options whose values differ from ``other``."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


PRESETS: dict[str, dict[str, Any]] = {
    "fixed": {},
    "as_served": {
        "decoder": "pil",
        "convert_rgb": True,
        "resize": "stretch",
        "interpolation": "lanczos",
        "scaling": "divide_255",
        "normalize": "none",
        "sigmoid": "if_outside_unit",
        "hierarchy": "as_served",
    },
}

PRESET_NAMES = tuple(PRESETS)
"""``("fixed", "as_served")``: the names every preset choice offers (CLI, widgets, service)."""

# The first stage whose output an option changes; later stages are re-run too.
STAGE_OF_OPTION = {
    "decoder": "decode", "convert_rgb": "decode",
    "resize": "preprocess", "input_size": "preprocess", "interpolation": "preprocess",
    "scaling": "preprocess", "normalize": "preprocess", "device": "forward", "train_mode": "forward",
    "sigmoid": "postprocess", "threshold": "postprocess",
    "detect_holes": "polygons", "min_area": "polygons", "hierarchy": "polygons",
}


def make_options(preset: str = "fixed", **overrides: Any) -> PipelineOptions:
    """Options from a preset name plus explicit overrides.

    Raises
    ------
    OptionsError
        For an unknown preset or option name.
    """
    if preset not in PRESETS:
        raise OptionsError(f"preset={preset!r} is unknown; expected one of {sorted(PRESETS)}")
    reject_unknown_options(overrides)
    return replace(PipelineOptions(), **{**PRESETS[preset], **overrides})


def reject_unknown_options(options: dict[str, Any]) -> None:
    """Refuse option names that :class:`PipelineOptions` does not have, naming the closest valid one.

    The one check behind :func:`make_options`, ``mb.Pipeline(model, **options)`` and
    ``Run.with_options(**changes)``.

    Parameters
    ----------
    options : dict
        Option names and the values given for them.

    Raises
    ------
    OptionsError
        ``unknown option 'treshold' (treshold=0.3); did you mean 'threshold'? valid: convert_rgb, ...``
    """
    valid = sorted(f.name for f in fields(PipelineOptions))
    unknown = [name for name in options if name not in valid]
    if not unknown:
        return
    close = {name: difflib.get_close_matches(name, valid, n=1) for name in unknown}
    if len(unknown) == 1:
        name = unknown[0]
        head = f"unknown option {name!r} ({name}={options[name]!r})" + (f"; did you mean {close[name][0]!r}?" if close[name] else "")
    else:
        head = "unknown options " + ", ".join(f"{n!r}" + (f" (did you mean {close[n][0]!r}?)" if close[n] else "") for n in unknown)
    raise OptionsError(f"{head}{' ' if head.endswith('?') else '; '}valid: {', '.join(valid)}")


def parse_option_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """Command-line ``--option NAME=VALUE`` pairs as pipeline options; a VALUE that is JSON is
    decoded (``threshold=0.4`` a float, ``resize=none`` the string), the names are checked when
    the options are made.

    >>> parse_option_pairs(["threshold=0.4", "resize=none"])
    {'threshold': 0.4, 'resize': 'none'}
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise OptionsError(f"--option {pair!r} is not NAME=VALUE; expected e.g. --option resize=none")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options
