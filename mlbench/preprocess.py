"""From a decoded image to the model's input tensor, as the options say.

The careful path scales by the data's real bit depth, makes three channels, resizes in
float and applies the normalisation the weights were trained with. The served path is
the historic one: an 8-bit RGB PIL image, Lanczos stretch, ``/255`` and (in its first
version) no mean/std. Every function returns a new array; inputs are never modified.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ImageError
from .options import IMAGENET_MEAN, IMAGENET_STD, PipelineOptions

__all__ = ["to_unit_range", "to_three_channels", "resize_image", "preprocess_array", "scale_divisor"]


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


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 3): grey replicated, alpha already dropped by the decoder."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, :3]
    raise ImageError(
        f"image of shape {image.shape} cannot be made into 3 channels; expected (H, W), (H, W, 1), "
        "(H, W, 3) or (H, W, 4): pick one page or channel first"
    )


def resize_image(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Stretch ``image`` (H, W[, C]) to ``size`` x ``size`` (aspect ratio not kept, as served)."""
    import cv2

    if image.shape[0] == size and image.shape[1] == size:
        return image.copy()
    if interpolation == "lanczos":
        flag = cv2.INTER_LANCZOS4
    else:
        flag = cv2.INTER_AREA if size < min(image.shape[:2]) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=flag)


def preprocess_array(image: np.ndarray, options: PipelineOptions, input_size: int) -> torch.Tensor:
    """The careful path: (H, W[, C]) any dtype -> (1, 3, S, S) float32 tensor.

    Parameters
    ----------
    image : array
        Decoded image, container dtype kept.
    options : PipelineOptions
        ``scaling``, ``resize``, ``interpolation`` and ``normalize`` are used.
    input_size : int
        Side S of the square model input when ``options.resize == "stretch"``.
    """
    unit = to_unit_range(to_three_channels(image), options.scaling)
    if options.resize == "stretch":
        unit = resize_image(unit, input_size, options.interpolation)
    tensor = torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))[None]
    if options.normalize == "imagenet":
        tensor = normalize_tensor(tensor)
    return tensor


def normalize_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std on a (N, 3, H, W) or (3, H, W) tensor, as torchvision's Normalize.

    A tensor with one channel fails exactly like the service did after its refactor:
    ``output with shape [1, H, W] doesn't match the broadcast shape [3, H, W]``.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype)[:, None, None]
    out = tensor.clone()
    return out.sub_(mean).div_(std)
