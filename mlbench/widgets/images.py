"""Small pictures for the stage views, as uint8 RGB arrays and PNG bytes.

Pure numpy/OpenCV drawing so a view renders in a few milliseconds: no figure, no pyplot.
matplotlib is imported lazily and only for its colormap table.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from mlbench.image.display import PALETTE, to_display

__all__ = ["png_bytes", "scale_for", "fit", "display", "histogram_image", "heat_map", "draw_polygons", "DISPLAY_SIDE",
           "DISPLAY_SIDES"]

DISPLAY_SIDE = 384  # longest side of a picture in a view, pixels
DISPLAY_SIDES = (("384 px", 384), ("768 px", 768), ("full size", 0))
"""The Stepper's picture sizes: label -> longest side (0: the image's own size; the functions here take None)."""


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> PNG file bytes (fast compression)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def scale_for(shape: tuple[int, ...], side: int | None = DISPLAY_SIDE) -> float:
    """Factor that brings the longest side of an (H, W[, C]) shape down to ``side`` (1.0 if already
    smaller, or if ``side`` is None)."""
    return 1.0 if side is None else min(1.0, side / max(shape[0], shape[1], 1))


def fit(image: np.ndarray, side: int | None = DISPLAY_SIDE, *, nearest: bool = False) -> np.ndarray:
    """Shrink an (H, W[, C]) image so its longest side is at most ``side`` (None: keep it); any dtype.

    Area interpolation for pictures; ``nearest=True`` for masks and labels (bool stays bool).
    Returns the input itself when it is small enough (callers never modify it).
    """
    import cv2

    array = np.asarray(image)
    scale = scale_for(array.shape, side)
    if scale >= 1.0:
        return array
    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if nearest:
        rows = np.minimum((np.arange(size[1]) / scale).astype(np.intp), height - 1)
        cols = np.minimum((np.arange(size[0]) / scale).astype(np.intp), width - 1)
        return array[rows[:, None], cols[None, :]]
    work = array if array.dtype in (np.uint8, np.uint16, np.float32) else array.astype(np.float32)
    return cv2.resize(work, size, interpolation=cv2.INTER_AREA)


def display(image: np.ndarray, side: int | None = DISPLAY_SIDE) -> np.ndarray:
    """(H, W[, C]) any dtype -> (h, w, 3) uint8 no larger than ``side``, stretched for display
    (a constant image on its dtype's scale: :func:`mlbench.image.display.to_display`)."""
    return to_display(fit(image, side))


def histogram_image(values: np.ndarray, bins: int = 128, height: int = 96) -> np.ndarray:
    """A bar chart of the finite values of ``values`` (any shape, any dtype) -> (height, bins*2, 3) uint8.

    One colour per channel when ``values`` is (H, W, C) with C <= 3; the bars are scaled by
    the square root of the counts so that small modes stay visible.
    """
    array = np.asarray(values)
    channels = [array[..., c] for c in range(array.shape[2])] if array.ndim == 3 and array.shape[2] <= 3 else [array]
    finite = [c[np.isfinite(c)] if c.dtype.kind == "f" else c.ravel() for c in channels]
    lo = min((float(c.min()) for c in finite if c.size), default=0.0)
    hi = max((float(c.max()) for c in finite if c.size), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    canvas = np.full((height, bins * 2, 3), 255, dtype=np.uint8)
    colours = [(80, 80, 80)] if len(finite) == 1 else [(213, 94, 0), (0, 158, 115), (0, 114, 178)]
    rows = np.arange(height)[:, None]
    for values_c, colour in zip(finite, colours):
        counts = np.histogram(values_c, bins=edges)[0].astype(np.float64)
        bars = np.sqrt(counts / counts.max()) * (height - 2) if counts.max() > 0 else counts
        filled = rows >= (height - np.repeat(bars, 2))[None, :]
        canvas[filled] = (0.5 * canvas[filled] + 0.5 * np.asarray(colour)).astype(np.uint8)
    return canvas


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    table = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(table * 255).astype(np.uint8)


def heat_map(probability: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 through a fixed colormap (NaN shows as 0)."""
    clipped = np.clip(np.nan_to_num(np.asarray(probability, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return _lut(cmap)[np.round(clipped * 255).astype(np.uint8)]


def draw_polygons(image: np.ndarray, polygons: list[dict], side: int | None = DISPLAY_SIDE) -> np.ndarray:
    """The image (any dtype, (H, W[, C])) with the service's polygons drawn on it -> (h, w, 3) uint8.

    Drawn at display size (longest side at most ``side``, None: full size); external polygons in the contour
    colour, internal ones (holes) in the false-negative colour.
    """
    import cv2

    scale = scale_for(np.shape(image), side)
    rgb = np.ascontiguousarray(display(image, side))
    for polygon in polygons:
        points = np.array([[p["x"], p["y"]] for p in polygon["points"]], dtype=np.float64) * scale
        colour = PALETTE["contour"] if polygon.get("type") == "external" else PALETTE["false_negative"]
        cv2.polylines(rgb, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], isClosed=True,
                      color=tuple(int(c) for c in colour), thickness=1)
    return rgb
