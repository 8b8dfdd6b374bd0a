"""A model's input recipe and output head, as its card states them: pure functions on arrays.

Input: the image's channels made what the model takes (grey <-> RGB, said in a note), its values
normalised (:data:`mlbench.models.cards.NORMALIZATIONS`), its geometry planned and applied
(stretch, letterbox, pad to a multiple, downscale above a side). Output: the head read as the card
says (sigmoid, softmax over K classes with foreground classes, fg/bg logits, argmax) into a
foreground probability, and the geometry undone so the probability lands on the image's pixels.
A head that does not fit its card is an error naming both, never a silent channel 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from mlbench.errors import ModelError, OptionsError
from mlbench.models.cards import ModelCard

__all__ = ["Geometry", "plan_geometry", "apply_geometry", "undo_geometry", "to_channels", "normalize_unit",
           "read_head", "Head"]


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels sit in the model input.

    ``image_hw`` is the decoded image's size, ``content_hw`` the size it was resized to, ``input_hw``
    the model input's size and ``offset`` the (top, left) of the content in the input (the rest is
    padding, zeros after normalisation).
    """

    image_hw: tuple[int, int]
    content_hw: tuple[int, int]
    input_hw: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def padded(self) -> bool:
        return self.content_hw != self.input_hw


def _up_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_geometry(image_hw: tuple[int, int], resize: str, input_size: int, multiple: int = 1,
                  max_side: int | None = None) -> Geometry:
    """The geometry of one image under a resize rule (see :data:`mlbench.models.cards.RESIZES`).

    >>> plan_geometry((300, 400), "letterbox", 256, 32)
    Geometry(image_hw=(300, 400), content_hw=(192, 256), input_hw=(256, 256), offset=(32, 0))
    >>> plan_geometry((300, 400), "pad", 256, 32).input_hw
    (320, 416)
    """
    height, width = (int(v) for v in image_hw)
    if resize == "stretch":
        return Geometry((height, width), (input_size, input_size), (input_size, input_size))
    if resize == "none":
        return Geometry((height, width), (height, width), (height, width))
    if resize == "letterbox":
        scale = input_size / max(height, width)
        content = (max(1, round(height * scale)), max(1, round(width * scale)))
        side = _up_to(input_size, multiple)
        return Geometry((height, width), content, (side, side), ((side - content[0]) // 2, (side - content[1]) // 2))
    if resize in ("pad", "downscale"):
        limit = max_side or input_size
        scale = min(1.0, limit / max(height, width)) if resize == "downscale" else 1.0
        content = (max(1, round(height * scale)), max(1, round(width * scale)))
        return Geometry((height, width), content, (_up_to(content[0], multiple), _up_to(content[1], multiple)))
    raise OptionsError(f"resize={resize!r} is unknown; expected one of stretch, letterbox, pad, downscale, none")


def _resize(image: np.ndarray, hw: tuple[int, int], interpolation: str) -> np.ndarray:
    """(H, W[, C]) float32 -> ``hw``; ``area`` shrinks by area and enlarges bilinearly."""
    if image.shape[:2] == hw:
        return image.copy()
    if interpolation in ("bilinear", "bilinear-antialias"):
        tensor = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[..., None]))
        out = torch.nn.functional.interpolate(tensor.permute(2, 0, 1)[None], size=hw, mode="bilinear",
                                              align_corners=False, antialias=interpolation == "bilinear-antialias")
        out = out[0].permute(1, 2, 0).numpy()
        return out if image.ndim == 3 else out[..., 0]
    import cv2

    shrink = hw[0] * hw[1] < image.shape[0] * image.shape[1]
    flag = cv2.INTER_LANCZOS4 if interpolation == "lanczos" else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    out = cv2.resize(image, (hw[1], hw[0]), interpolation=flag)
    return out[..., None] if image.ndim == 3 and out.ndim == 2 else out  # OpenCV drops a single channel axis


def apply_geometry(image: np.ndarray, geometry: Geometry, interpolation: str = "area") -> np.ndarray:
    """Resize (H, W[, C]) float32 ``image`` to the content size and pad it to the input size with zeros."""
    content = _resize(image, geometry.content_hw, interpolation)
    if not geometry.padded:
        return content
    out = np.zeros(geometry.input_hw + content.shape[2:], dtype=content.dtype)
    top, left = geometry.offset
    out[top:top + content.shape[0], left:left + content.shape[1]] = content
    return out


def undo_geometry(values: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(H', W'[, K]) model-resolution ``values`` -> the image's (H, W[, K]): crop the content, resize bilinearly.

    The output's grid may differ from the input's (HRNet maps 250 to 252): the content box is
    scaled to it. Without padding this is one bilinear resize, exactly the service's.
    """
    import cv2

    values = np.asarray(values, dtype=np.float32)
    if geometry.padded:
        sy, sx = values.shape[0] / geometry.input_hw[0], values.shape[1] / geometry.input_hw[1]
        (top, left), (height, width) = geometry.offset, geometry.content_hw
        values = values[round(top * sy):round((top + height) * sy), round(left * sx):round((left + width) * sx)]
    if values.shape[:2] != geometry.image_hw:
        values = cv2.resize(values, geometry.image_hw[::-1], interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(values)


def _layout_hint(shape: tuple[int, ...]) -> str:
    """How to make an (H, W[, C]) image of an array of ``shape``: move the channels last, drop a
    batch axis, or pick a page or channel."""
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] > 4:
        return f"it looks channel-first (C, H, W); pass np.moveaxis(image, 0, -1), shape {(*shape[1:], shape[0])}"
    if len(shape) == 4 and shape[0] == 1:
        return f"it has a batch axis of 1; pass image[0], shape {shape[1:]}"
    return "pick one page or channel first (e.g. image[..., 0]), or save the channels you need as an RGB image"


def to_channels(image: np.ndarray, channels: int) -> tuple[np.ndarray, str]:
    """(H, W[, C]) -> (H, W, ``channels``), and a note when the kind changed (empty otherwise).

    Grey is replicated to RGB; RGB becomes grey by luminance (0.299 R + 0.587 G + 0.114 B, as
    Pillow's ``convert('L')``); an alpha channel, if still there, is dropped.
    """
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise OptionsError(f"image of shape {image.shape} has no 1, 3 or 4 channels last: {_layout_hint(image.shape)}")
    image = image[..., :3]
    if image.shape[2] == channels:
        return image, ""
    if channels == 3:
        return np.repeat(image, 3, axis=2), "grey image replicated to the 3 channels the model takes"
    weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    grey = (image.astype(np.float32) @ weights)[..., None].astype(image.dtype if image.dtype.kind == "f" else np.float32)
    return grey, "RGB image turned grey (luminance) for the 1-channel model"


def normalize_unit(unit: np.ndarray, card: ModelCard, normalization=None) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] -> the model's input values, by ``normalization`` (default the card's)."""
    how = card.normalization if normalization is None else normalization
    if callable(how):
        out = np.asarray(how(unit.copy()), dtype=np.float32)
        if out.shape != unit.shape:
            raise OptionsError(f"the card's normalization callable returned shape {out.shape}; expected the input's "
                               f"{unit.shape} (H, W, C)")
        return out
    if how in ("x/255", "none"):
        return unit.astype(np.float32, copy=True)
    if how == "x/255-0.5":
        return unit.astype(np.float32) - np.float32(0.5)
    if how == "imagenet":
        return (unit.astype(np.float32) - np.float32(card.mean)) / np.float32(card.std)
    if how == "percentile":
        lo, hi = np.percentile(unit, [1.0, 99.0])
        return np.clip((unit - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)
    if how == "clahe":
        import cv2

        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        planes = [clahe.apply(np.round(unit[..., c] * 65535).astype(np.uint16)) for c in range(unit.shape[2])]
        return (np.stack(planes, axis=2).astype(np.float32) / np.float32(65535.0))
    raise OptionsError(f"normalization={how!r} is unknown; expected imagenet, x/255, x/255-0.5, percentile, clahe, "
                       "none or a callable")


@dataclass(frozen=True)
class Head:
    """A raw output read as the card's head: per-pixel foreground probability at the model's resolution,
    and for an ``argmax`` head the per-class probabilities (the mask is their argmax, not a threshold)."""

    probability: np.ndarray
    classes: np.ndarray | None = None
    sigmoid_applied: bool = False


def read_head(output: torch.Tensor, card: ModelCard, rule: str = "always") -> Head:
    """(1, C, H, W) raw output -> :class:`Head`, checked against the card.

    ``rule`` is the sigmoid rule of a one-channel head: ``always`` or the service's
    ``if_outside_unit`` (a sigmoid only when the output leaves [0, 1]).

    Raises
    ------
    ModelError
        When the output's channels do not fit the card's head (both named, and the card to pass).
    """
    if output.dim() == 3 and output.shape[0] == 1:
        raise ModelError(f"the model returned shape {tuple(output.shape)}, maps without a channel axis; expected "
                         "(1, C, H, W): wrap it in a module whose forward returns model(x).unsqueeze(1)")
    if output.dim() != 4 or output.shape[0] != 1:
        raise ModelError(f"the model returned shape {tuple(output.shape)}; expected (1, C, H, W) maps: a model "
                         "that returns a dict or tuple needs a wrapper returning the main map")
    values = output.detach().float().cpu()[0]
    channels, expected = values.shape[0], card.output_channels
    if (expected is not None and channels != expected) or (expected is None and channels < 2):
        raise ModelError(_head_mismatch(channels, card))
    if card.output == "probability":
        low, high = float(values.min()), float(values.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ModelError(f"the card says the model outputs probabilities, but its output runs from {low:.4g} to "
                             f"{high:.4g}, outside [0, 1]: these are logits; use ModelCard(output='sigmoid')")
        return Head(values[0].clamp(0, 1).numpy().copy(), sigmoid_applied=False)
    if card.output == "sigmoid":
        outside = bool(values.min() < 0 or values.max() > 1)
        apply = rule == "always" or outside
        if apply and not outside and values.numel() >= 64 and float(values.max() - values.min()) > 0.5:
            warnings.warn(f"the model's output lies in [0, 1] ({float(values.min()):.3f} to {float(values.max()):.3f}) "
                          "and spans most of it, as probabilities do, and the card's head puts a sigmoid on it: if "
                          "the model ends in a sigmoid, a second one makes every pixel foreground; pass "
                          "ModelCard(output='probability') for such a model", UserWarning, stacklevel=3)
        return Head((torch.sigmoid(values[0]) if apply else values[0]).numpy().copy(), sigmoid_applied=apply)
    if card.output == "fg_bg":
        return Head(torch.sigmoid(values[1] - values[0]).numpy().copy(), sigmoid_applied=True)
    if max(card.foreground) >= channels:
        raise ModelError(f"the card names foreground classes {list(card.foreground)} but the output has {channels} "
                         f"channels (classes 0..{channels - 1}); fix the card's foreground")
    soft = torch.softmax(values, dim=0)
    fg = soft[list(card.foreground)].sum(dim=0).numpy().copy()
    return Head(fg, soft.permute(1, 2, 0).numpy().copy() if card.output == "argmax" else None, sigmoid_applied=True)


def _head_mismatch(channels: int, card: ModelCard) -> str:
    wanted = card.output_channels or "2 or more"
    if channels == 1:
        fix = "ModelCard(output='sigmoid') for a one-channel logit head"
    elif channels == 2:
        fix = ("ModelCard(output='softmax', foreground=[1]) for two class logits (background, foreground), or "
               "output='fg_bg'")
    else:
        fix = f"ModelCard(output='softmax' or 'argmax', classes={channels}, foreground=[...the foreground classes])"
    return (f"the model's output has {channels} channel(s) but its card says output={card.output!r} "
            f"({wanted} channel(s)); reading one channel silently would invert or empty the mask. Pass {fix}")
