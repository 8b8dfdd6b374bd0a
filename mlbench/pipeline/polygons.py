"""From a mask to the service's polygons.

The service ran ``cv2.findContours`` (RETR_TREE when holes are wanted, else RETR_EXTERNAL;
CHAIN_APPROX_SIMPLE), skipped contours under 50 px of area and those with fewer than 3 points,
and numbered the rest ``polygon_1``, ``polygon_2``, ... with float ``x``/``y`` points. Every
contour with a parent became ``internal``, whatever its depth, so an island inside a hole is typed
as a hole; its ``parent_id`` is the emitted polygon whose contour index is the hierarchy's parent,
and is left out when that parent was not emitted. ``hierarchy="as_served"`` reproduces that
exactly (``tests/test_golden.py`` pins it against the service's own ``predict()``); ``"tree"``
(the ``fixed`` preset) types each contour by its nesting depth (odd depths are holes, even depths
outer contours, islands included) and links every hole to its outer contour, in the same fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbench.errors import OptionsError

__all__ = ["mask_to_polygons", "find_contours"]


def find_contours(mask: np.ndarray, detect_holes: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Contours of a (H, W) mask and their hierarchy rows ``[next, prev, child, parent]``."""
    import cv2

    if mask.ndim != 2:
        raise OptionsError(f"mask must be 2-D (H, W), got shape {mask.shape}; squeeze the batch and channel axes")
    mode = cv2.RETR_TREE if detect_holes else cv2.RETR_EXTERNAL
    contours, hierarchy = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), mode, cv2.CHAIN_APPROX_SIMPLE)
    rows = hierarchy[0] if hierarchy is not None else np.zeros((0, 4), dtype=np.int32)
    return list(contours), rows


def _depths(rows: np.ndarray) -> list[int]:
    depths = []
    for i in range(len(rows)):
        depth, parent = 0, rows[i][3]
        while parent != -1:
            depth, parent = depth + 1, rows[parent][3]
        depths.append(depth)
    return depths


def polygon_id(number: int) -> str:
    """The service's polygon id: ``polygon_<number>``, numbered from 1 over emitted polygons."""
    return f"polygon_{number}"


def _polygon(number: int, points: np.ndarray, kind: str, confidence: float, parent: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": polygon_id(number),
        "points": [{"x": float(x), "y": float(y)} for x, y in points],
        "type": kind,
        "class": "spheroid",
        "confidence": float(confidence),
        "vertices_count": int(len(points)),
    }
    if parent is not None:
        out["parent_id"] = parent
    return out


def mask_to_polygons(
    mask: np.ndarray,
    *,
    confidence: float = 1.0,
    detect_holes: bool = True,
    min_area: float = 50.0,
    hierarchy: str = "tree",
) -> list[dict[str, Any]]:
    """Polygons of a mask in the service's schema, coordinates in the mask's pixel space.

    Parameters
    ----------
    mask : (H, W) bool or integer array
        Foreground where non-zero.
    confidence : float
        Written into every polygon (the service wrote ``sigmoid(raw output).max()``, the same for
        every polygon of an image).
    detect_holes : bool
        Also emit inner contours (holes) as ``internal`` polygons.
    min_area : float
        Contours with ``cv2.contourArea`` below this are dropped.
    hierarchy : "tree" or "as_served"
        How types and parent ids are assigned (see the module docstring).

    Returns
    -------
    list of dict
        ``{id, points [{x, y}], type, class, confidence, vertices_count, parent_id?}``; ids are
        ``"polygon_1"``, ``"polygon_2"``, ...; points are floats in the mask's pixel space.
    """
    import cv2

    if hierarchy not in ("tree", "as_served"):
        raise OptionsError(f"hierarchy={hierarchy!r} is unknown; expected 'tree' or 'as_served'")
    contours, rows = find_contours(np.asarray(mask) != 0, detect_holes)
    kept = [i for i, c in enumerate(contours) if cv2.contourArea(c) >= min_area and len(c) >= 3]
    number = {i: n for n, i in enumerate(kept, start=1)}  # contour index -> polygon number
    depths = _depths(rows)
    polygons = []
    for n, i in enumerate(kept, start=1):
        parent_index = int(rows[i][3])
        if hierarchy == "as_served":  # any parent makes a hole; parent looked up among those emitted
            internal = parent_index != -1
            emitted = number.get(parent_index, n) < n
        else:
            internal = depths[i] % 2 == 1
            emitted = internal and parent_index in number
        parent = polygon_id(number[parent_index]) if emitted else None
        kind = "internal" if internal else "external"
        polygons.append(_polygon(n, contours[i].reshape(-1, 2), kind, confidence, parent))
    return polygons
