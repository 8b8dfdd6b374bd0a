"""Masks drawn over images, for people: ``mb.overlay``.

Pure functions: inputs are never modified, the palette is fixed and colour-blind safe
(Okabe-Ito), and the image is rescaled for display only (any bit depth).
"""

from __future__ import annotations

import numpy as np

from mlbench.errors import OptionsError

__all__ = ["overlay", "to_display", "label_colours", "PALETTE"]

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = {
    "prediction": (230, 159, 0),   # orange
    "true_positive": (0, 158, 115),  # bluish green
    "false_positive": (213, 94, 0),  # vermillion
    "false_negative": (86, 180, 233),  # sky blue
    "contour": (240, 228, 66),  # yellow
}


def to_display(image: np.ndarray) -> np.ndarray:
    """(H, W[, C]) any dtype -> (H, W, 3) uint8, stretched between the 0.5 and 99.5 percentiles.

    An image whose percentiles coincide (a constant image) has nothing to stretch: it is shown
    on its dtype's scale instead (:func:`display_range`), so a constant 255 uint8 image is white.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise OptionsError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {np.shape(image)}")
    lo, hi = display_range(array, np.asarray(image).dtype)
    scaled = (np.nan_to_num(array, nan=lo) - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def display_range(values: np.ndarray, dtype: np.dtype) -> tuple[float, float]:
    """The ``(lo, hi)`` that :func:`to_display` maps to black and white, ``lo < hi``.

    The 0.5 and 99.5 percentiles of the finite ``values``; when they coincide (a constant image),
    the scale of ``dtype``: 0..max for integers (255 is white in uint8, 65535 in uint16), 0..1
    for floats and bool (values outside are clipped).

    >>> display_range(np.full((2, 2), 255.0), np.dtype(np.uint8))
    (0.0, 255.0)
    >>> display_range(np.array([0.0, 1.0, 2.0]), np.dtype(np.float32))
    (0.01, 1.99)
    """
    finite = values[np.isfinite(values)]
    if finite.size:
        lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
        if hi > lo:
            return lo, hi
    dtype = np.dtype(dtype)
    return 0.0, float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def label_colours(ids: np.ndarray) -> np.ndarray:
    """(N,) label ids -> (N, 3) uint8 RGB colours; id 0 (background) is black.

    Deterministic: a label's colour depends on its id only (golden-ratio hues), so the
    same object keeps its colour across images, models and runs.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    sector = ((ids * 0.6180339887) % 1.0) * 6.0
    channel = np.stack([np.abs(sector - 3.0) - 1.0, 2.0 - np.abs(sector - 2.0), 2.0 - np.abs(sector - 4.0)], axis=1)
    colours = np.round((0.25 + 0.7 * np.clip(channel, 0.0, 1.0)) * 255).astype(np.uint8)
    colours[ids == 0] = 0
    return colours


def _is_instances(pred: np.ndarray) -> bool:
    return pred.dtype != bool and np.issubdtype(pred.dtype, np.integer) and pred.size > 0 and int(pred.min()) >= 0 and int(pred.max()) > 1


def _edges(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[1:-1, 1:-1]
    neighbours_differ = (padded[:-2, 1:-1] != inner) | (padded[2:, 1:-1] != inner) | (padded[1:-1, :-2] != inner) | (padded[1:-1, 2:] != inner)
    return neighbours_differ & (mask != 0)


def _tint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    rgb[where] = np.round((1 - alpha) * rgb[where] + alpha * np.asarray(colour, dtype=np.float32)).astype(np.uint8)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, *, alpha: float = 0.45) -> np.ndarray:
    """The image with the predicted mask, or with ground truth the error map.

    Parameters
    ----------
    image : (H, W[, C]) array, any dtype
    pred : (H, W) bool or labels
        Prediction; non-zero is foreground. Integer instance labels (more than one id)
        are drawn each in its own deterministic colour (:func:`label_colours`) when no
        truth is given; their boundaries are drawn in every case.
    truth : (H, W) bool or labels, optional
        Ground truth; when given, true positives, false positives and false negatives
        are coloured (see ``PALETTE``) and the predicted contours drawn.
    alpha : float
        Opacity of the colours.

    Returns
    -------
    (H, W, 3) uint8
    """
    rgb = to_display(image)
    labels = np.asarray(pred)
    pred = labels != 0
    if pred.shape != rgb.shape[:2]:
        raise OptionsError(f"pred has shape {pred.shape} but the image is {rgb.shape[:2]}; resize the mask to the image first")
    instances = _is_instances(labels)
    if truth is None and instances:
        ids, inverse = np.unique(labels[pred], return_inverse=True)
        colours = label_colours(ids)[inverse].astype(np.float32)
        rgb[pred] = np.round((1 - alpha) * rgb[pred] + alpha * colours).astype(np.uint8)
    elif truth is None:
        _tint(rgb, pred, PALETTE["prediction"], alpha)
    else:
        truth = np.asarray(truth) != 0
        if truth.shape != pred.shape:
            raise OptionsError(f"truth has shape {truth.shape} but pred has {pred.shape}; they must match")
        _tint(rgb, pred & truth, PALETTE["true_positive"], alpha)
        _tint(rgb, pred & ~truth, PALETTE["false_positive"], alpha)
        _tint(rgb, ~pred & truth, PALETTE["false_negative"], alpha)
    rgb[_edges(labels if instances else pred)] = PALETTE["contour"]
    return rgb
