"""From a decoded image to the model's input tensor, as the model's card and the options say.

The careful path makes the channels the card asks for, scales by the data's real bit depth,
normalises as the weights were trained (the card's recipe) and applies the card's geometry in
float. The served path is the historic one: an 8-bit RGB PIL image, Lanczos stretch, ``/255`` and
(in its first version) no mean/std. Every function returns a new array; inputs are never modified.
"""

from __future__ import annotations

import numpy as np
import torch

from mlbench.models.cards import IMAGENET_MEAN, IMAGENET_STD, ModelCard
from mlbench.pipeline.options import PipelineOptions
from mlbench.pipeline.recipe import Geometry, apply_geometry, normalize_unit, plan_geometry, to_channels

__all__ = ["to_unit_range", "preprocess_array", "scale_divisor", "normalize_tensor",
           "input_geometry"]


def scale_divisor(image: np.ndarray) -> float:
    """The value that maps the data's full range to 1.0, from its effective bit depth.

    uint8 -> 255; 16-bit containers -> 2**bits - 1 with bits rounded up to 10, 12, 14 or 16
    (so 12-bit-in-16 camera data is not left at 6% brightness); floats already in [0, 1] -> 1.
    """
    if image.dtype == np.bool_:
        return 1.0
    if np.issubdtype(image.dtype, np.floating):
        top = float(np.nanmax(image)) if image.size else 1.0
        return 1.0 if top <= 1.0 else (255.0 if top <= 255.0 else 65535.0)
    if image.dtype == np.uint8:
        return 255.0
    top = int(image.max()) if image.size else 0
    for bits in (8, 10, 12, 14, 16, 32):
        if top <= 2**bits - 1:
            return float(2**bits - 1)
    return float(np.iinfo(image.dtype).max)


def to_unit_range(image: np.ndarray, scaling: str) -> np.ndarray:
    """float32 copy of ``image`` scaled to [0, 1] ("dynamic") or divided by 255 ("divide_255")."""
    divisor = scale_divisor(image) if scaling == "dynamic" else 255.0
    return image.astype(np.float32) / np.float32(divisor)


def input_geometry(image_hw: tuple[int, int], options: PipelineOptions, card: ModelCard) -> Geometry:
    """Where the image sits in the model input, from the resolved options and the card."""
    return plan_geometry(image_hw, options.resize, options.input_size, card.input_multiple, card.max_side)


def preprocess_array(image: np.ndarray, options: PipelineOptions, card: ModelCard | None = None,
                     notes: list[str] | None = None) -> torch.Tensor:
    """The careful path: (H, W[, C]) any dtype -> (1, C, H', W') float32 tensor.

    Parameters
    ----------
    image : array
        Decoded image, container dtype kept.
    options : PipelineOptions
        ``scaling``, ``normalize``, ``resize``, ``input_size`` and ``interpolation`` are used
        (None ones are taken from ``card``).
    card : ModelCard, optional
        The model's card (channels, mean/std, input multiple); default: a 3-channel ImageNet model.
    notes : list, optional
        Receives a sentence when the image's channels were converted for the model.
    """
    card = card or ModelCard()
    options = options.resolved(card)
    image, note = to_channels(image, card.channels)
    if note and notes is not None:
        notes.append(note)
    unit = to_unit_range(image, options.scaling)
    values = normalize_unit(unit, card, None if options.normalize == "card" else options.normalize)
    geometry = input_geometry(image.shape[:2], options, card)
    note = _distortion_note(geometry)
    if note and notes is not None:
        notes.append(note)
    placed = apply_geometry(values, geometry, options.interpolation)
    return torch.from_numpy(np.ascontiguousarray(placed.transpose(2, 0, 1)))[None]


DISTORTION_NOTED = 4.0
"""The change of aspect ratio (one axis scaled this many times more than the other) from which a
stretch is noted: beyond it objects are squashed past what a model trained on squares has seen."""


def _distortion_note(geometry: Geometry) -> str | None:
    """A sentence when the geometry stretches one axis far more than the other, else None."""
    (height, width), (out_h, out_w) = geometry.image_hw, geometry.content_hw
    ratio = (out_h / height) / (out_w / width)
    ratio = max(ratio, 1 / ratio)
    if ratio < DISTORTION_NOTED:
        return None
    return (f"stretching the {height}x{width} image to {out_h}x{out_w} changes its aspect ratio {ratio:.0f}-fold: "
            "objects are squashed along one axis and the mask will not follow their shapes; crop the image into "
            "squarer pieces, or use resize='pad' (mb.predict_tiled for large ones)")


def normalize_tensor(tensor: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Mean/std (ImageNet's by default) on a (N, 3, H, W) or (3, H, W) tensor, as torchvision's Normalize.

    A tensor with one channel fails exactly like the service did after its refactor:
    ``output with shape [1, H, W] doesn't match the broadcast shape [3, H, W]``.
    """
    mean = torch.tensor(mean, dtype=tensor.dtype)[:, None, None]
    std = torch.tensor(std, dtype=tensor.dtype)[:, None, None]
    out = tensor.clone()
    return out.sub_(mean).div_(std)
