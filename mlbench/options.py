"""Pipeline options and the presets that name whole option sets.

``"fixed"`` is the careful default; ``"as_served"`` reproduces the historic service
byte for byte, bugs included, so that a production failure can be replayed. A notebook
reproduces a failure by choosing the preset or the single option that caused it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import OptionsError

__all__ = ["PipelineOptions", "PRESETS", "make_options", "IMAGENET_MEAN", "IMAGENET_STD", "STAGE_OF_OPTION"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CHOICES = {
    "decoder": ("careful", "pil"),
    "resize": ("stretch", "none"),
    "interpolation": ("area", "lanczos"),
    "scaling": ("dynamic", "divide_255"),
    "normalize": ("imagenet", "none"),
    "sigmoid": ("always", "if_outside_unit"),
    "hierarchy": ("tree", "as_served"),
}


@dataclass(frozen=True)
class PipelineOptions:
    """Every knob of the pipeline. Defaults are the ``fixed`` preset.

    Attributes
    ----------
    decoder : "careful" keeps 16-bit and float data (:func:`mlbench.read_image`);
        "pil" is the service's ``PIL.Image.open``.
    convert_rgb : with the "pil" decoder, call ``convert('RGB')`` (clips 16-bit at 255).
        False reproduces the refactor that crashed on grayscale images.
    resize : "stretch" to ``input_size`` x ``input_size`` (aspect not kept) or "none".
    input_size : model input side in pixels; None means the model's own default
        (1024 for full-size models, the trained size for the small ones).
    interpolation : "area" (float, no ringing) or "lanczos" (PIL, as served).
    scaling : "dynamic" divides by the effective bit depth's maximum (255, 4095, 65535);
        "divide_255" divides by 255 whatever the data.
    normalize : "imagenet" applies the mean/std the weights were trained with; "none" skips it.
    sigmoid : "always" (the models emit logits) or "if_outside_unit" (only when the
        output leaves [0, 1], the service's heuristic).
    threshold : probability above which (strictly) a pixel is foreground, 0.1..0.9 as the API.
    detect_holes : find inner contours (holes) too.
    min_area : contours with a smaller area (pixels) are dropped.
    hierarchy : "tree" types and parents polygons by nesting depth; "as_served" keeps the
        service's bug (parent looked up only among polygons already emitted).
    device : where the forward runs.
    """

    decoder: str = "careful"
    convert_rgb: bool = True
    resize: str = "stretch"
    input_size: int | None = None
    interpolation: str = "area"
    scaling: str = "dynamic"
    normalize: str = "imagenet"
    sigmoid: str = "always"
    threshold: float = 0.5
    detect_holes: bool = True
    min_area: float = 50.0
    hierarchy: str = "tree"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise OptionsError(f"option {name}={value!r} is not allowed; expected one of {allowed}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise OptionsError(f"option threshold={self.threshold!r} is outside (0, 1); the service accepts 0.1..0.9")
        if self.input_size is not None and int(self.input_size) < 16:
            raise OptionsError(f"option input_size={self.input_size!r} is too small; expected >= 16 or None")
        if self.min_area < 0:
            raise OptionsError(f"option min_area={self.min_area!r} is negative; expected >= 0 (the service uses 50)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-ready)."""
        return asdict(self)

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

# The first stage whose output an option changes; later stages are re-run too.
STAGE_OF_OPTION = {
    "decoder": "decode", "convert_rgb": "decode",
    "resize": "preprocess", "input_size": "preprocess", "interpolation": "preprocess",
    "scaling": "preprocess", "normalize": "preprocess", "device": "forward",
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
    known = {f.name for f in fields(PipelineOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OptionsError(f"unknown pipeline option(s) {unknown}; valid options are {sorted(known)}")
    return replace(PipelineOptions(), **{**PRESETS[preset], **overrides})
