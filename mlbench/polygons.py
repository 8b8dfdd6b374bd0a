"""From a mask to the service's polygons.

The service ran ``cv2.findContours`` (RETR_TREE when holes are wanted, else
RETR_EXTERNAL; CHAIN_APPROX_SIMPLE), dropped contours under 50 px of area, typed any
contour with a parent as ``internal`` and looked the parent's contour index up as a
position among the polygons it had already emitted, so once a small contour had been
dropped parent ids went missing (or named the wrong polygon), and islands inside holes
were typed as holes. ``hierarchy="as_served"`` keeps that behaviour; ``"tree"`` types each contour by
its nesting depth and links every hole to its kept outer contour.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import OptionsError

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


def _polygon(poly_id: int, contour: np.ndarray, kind: str, confidence: float, parent: int | None) -> dict[str, Any]:
    points = contour.reshape(-1, 2)
    out: dict[str, Any] = {
        "id": poly_id,
        "points": [{"x": int(x), "y": int(y)} for x, y in points],
        "type": kind,
        "class": "spheroid",
        "confidence": round(float(confidence), 4),
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
        Written into every polygon (the service used the global maximum probability).
    detect_holes : bool
        Also emit inner contours (holes) as ``internal`` polygons.
    min_area : float
        Contours with ``cv2.contourArea`` below this are dropped.
    hierarchy : "tree" or "as_served"
        How types and parent ids are assigned (see the module docstring).

    Returns
    -------
    list of dict
        ``{id, points [{x, y}], type, class, confidence, vertices_count, parent_id?}``, ids from 1.
    """
    import cv2

    if hierarchy not in ("tree", "as_served"):
        raise OptionsError(f"hierarchy={hierarchy!r} is unknown; expected 'tree' or 'as_served'")
    contours, rows = find_contours(np.asarray(mask) != 0, detect_holes)
    kept = [i for i, c in enumerate(contours) if cv2.contourArea(c) >= min_area]
    if hierarchy == "as_served":
        return _as_served(contours, rows, kept, confidence)
    depths = _depths(rows)
    ids = {i: n for n, i in enumerate(kept, start=1)}
    polygons = []
    for i in kept:
        internal = depths[i] % 2 == 1
        parent = ids.get(int(rows[i][3])) if internal else None
        polygons.append(_polygon(ids[i], contours[i], "internal" if internal else "external", confidence, parent))
    return polygons


def _as_served(contours, rows, kept, confidence) -> list[dict[str, Any]]:
    """The service's loop, bug for bug: the parent's contour index is looked up as a position
    in the list of polygons already emitted. Once the area filter has dropped an earlier
    contour the positions shift, so the parent id goes missing (index past the end) or
    names the wrong polygon; every contour with a parent is typed internal."""
    polygons: list[dict[str, Any]] = []
    for i in kept:
        parent_idx = int(rows[i][3])
        internal = parent_idx != -1
        parent = polygons[parent_idx]["id"] if internal and parent_idx < len(polygons) else None
        polygons.append(_polygon(len(polygons) + 1, contours[i], "internal" if internal else "external", confidence, parent))
    return polygons
