"""The shape metrics of ``POST /api/calculate-metrics``, computed as the service computes them.

The real service measures a polygon with OpenCV on ``float32`` points: area and perimeter
of the closed contour, the minimum-area rectangle for the Feret diameters, a fitted
ellipse for the "diameters through the centroid" (0 under 5 points), the convex hull for
convexity and solidity. Its quirks are kept, because a client compares its numbers:

- ``FeretDiameterMax``/``Min`` are the sides of the minimum-area rectangle, not calipers
  (a 100 x 100 square has a maximum Feret diameter of 100, not 141.4).
- ``FeretDiameterMaxOrthogonalDistance`` is the shortest side of that rectangle after its
  corners were truncated to integers.
- ``Compactness`` equals ``Circularity``; holes change Area, EquivalentDiameter,
  Circularity and Sphericity only (Perimeter and Compactness stay those of the outline).

>>> square = [[0, 0], [100, 0], [100, 100], [0, 100]]
>>> shape_metrics(square)["Circularity"]
0.7853981633974483
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from mlbench.errors import OptionsError

__all__ = ["METRIC_NAMES", "METRICS_INFO", "ContourError", "shape_metrics", "zero_metrics", "as_contour"]

METRIC_NAMES = ("Area", "Perimeter", "EquivalentDiameter", "Circularity", "FeretDiameterMax",
                "FeretDiameterMaxOrthogonalDistance", "FeretDiameterMin", "FeretAspectRatio",
                "LengthMajorDiameterThroughCentroid", "LengthMinorDiameterThroughCentroid", "Compactness",
                "Convexity", "Solidity", "Sphericity")
"""The 14 keys of a metrics answer, in the service's order."""

METRICS_INFO: dict[str, Any] = {
    "metrics": {
        "Area": "Total area of the polygon in pixels\u00b2 (with holes subtracted)",
        "Perimeter": "Total length of the polygon boundary in pixels",
        "EquivalentDiameter": "Diameter of a circle with the same area",
        "Circularity": "Measure of how circular the shape is (0-1, where 1 is a perfect circle)",
        "FeretDiameterMax": "Maximum distance between any two points on the boundary",
        "FeretDiameterMin": "Minimum distance between parallel tangents",
        "FeretAspectRatio": "Ratio of maximum to minimum Feret diameter",
        "Compactness": "Ratio of area to the area of minimum bounding circle",
        "Convexity": "Ratio of convex hull perimeter to actual perimeter",
        "Solidity": "Ratio of area to convex hull area",
        "Sphericity": "Measure of how spherical the shape is",
    },
    "units": "pixels for distances and areas, dimensionless for ratios",
    "version": "1.0.0",
}
"""The body of ``GET /api/metrics-info`` (its descriptions are the service's, quirks and all)."""


class ContourError(OptionsError):
    """Points that are no polygon; ``field`` names the request field ("contour" or "holes")."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def zero_metrics() -> dict[str, float]:
    """Every metric 0.0: the service's answer for a batch item it could not measure."""
    return {name: 0.0 for name in METRIC_NAMES}


def as_contour(points: Sequence[Sequence[float]], what: str = "contour") -> np.ndarray:
    """``[[x, y], ...]`` as an OpenCV contour, (N, 1, 2) float32.

    Raises
    ------
    ContourError
        When the points are not a non-empty list of ``[x, y]`` pairs of finite numbers.
    """
    try:
        array = np.asarray(points, dtype=np.float32)
    except (TypeError, ValueError) as exc:  # ragged lists, text
        raise ContourError(f"{what} must be a list of [x, y] pairs of numbers ({exc}); send e.g. "
                           "[[0, 0], [10, 0], [10, 10]]", what.split("[")[0]) from exc
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise ContourError(f"{what} must be a non-empty list of [x, y] pairs of finite numbers, got an array of "
                           f"shape {tuple(array.shape)}; send e.g. [[0, 0], [10, 0], [10, 10]]", what.split("[")[0])
    return array.reshape(-1, 1, 2)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _feret(contour: np.ndarray) -> tuple[float, float, float, float]:
    """Max and min side of the minimum-area rectangle, their ratio, and the truncated-corner side."""
    import cv2

    if len(contour) < 2:
        return 0.0, 0.0, 0.0, 0.0
    rect = cv2.minAreaRect(contour)
    longest, shortest = float(max(rect[1])), float(min(rect[1]))
    corners = cv2.boxPoints(rect).astype(np.intp)  # truncated toward zero, as the service's np.int0
    sides = [float(np.linalg.norm(corners[i] - corners[(i + 1) % 4])) for i in range(4)]
    return longest, shortest, _ratio(longest, shortest), min(sides)


def _ellipse_axes(contour: np.ndarray) -> tuple[float, float]:
    """The fitted ellipse's full axes (0, 0 under 5 points or when the fit fails)."""
    import cv2

    if len(contour) < 5:
        return 0.0, 0.0
    try:
        axes = cv2.fitEllipse(contour)[1]
    except cv2.error:  # a degenerate contour (all points on a line)
        return 0.0, 0.0
    return float(axes[0]), float(axes[1])


def _area_terms(area: float, perimeter: float) -> dict[str, float]:
    """The metrics that depend on the area: equivalent diameter, circularity, sphericity (0 when area <= 0)."""
    if area <= 0:
        return {"EquivalentDiameter": 0.0, "Circularity": 0.0, "Sphericity": 0.0}
    diameter = math.sqrt(4 * area / math.pi)
    return {"EquivalentDiameter": diameter, "Circularity": _ratio(4 * math.pi * area, perimeter ** 2),
            "Sphericity": _ratio(math.pi * diameter, perimeter)}


def shape_metrics(contour: Sequence[Sequence[float]],
                  holes: Sequence[Sequence[Sequence[float]]] = ()) -> dict[str, float]:
    """The service's 14 shape metrics of one polygon, holes subtracted from its area.

    Parameters
    ----------
    contour : list of [x, y]
        The outline, in pixels (closed implicitly).
    holes : list of list of [x, y]
        Inner contours; their areas are subtracted.

    Returns
    -------
    dict
        :data:`METRIC_NAMES` -> float.

    Raises
    ------
    ContourError
        When the outline or a hole is not a list of ``[x, y]`` pairs.
    """
    import cv2

    outline = as_contour(contour)
    area, perimeter = float(cv2.contourArea(outline)), float(cv2.arcLength(outline, True))
    hull = cv2.convexHull(outline)
    longest, shortest, aspect, orthogonal = _feret(outline)
    major, minor = _ellipse_axes(outline)
    terms = _area_terms(area, perimeter)
    metrics = {"Area": area, "Perimeter": perimeter, **terms, "FeretDiameterMax": longest,
               "FeretDiameterMaxOrthogonalDistance": orthogonal, "FeretDiameterMin": shortest,
               "FeretAspectRatio": aspect, "LengthMajorDiameterThroughCentroid": major,
               "LengthMinorDiameterThroughCentroid": minor, "Compactness": terms["Circularity"],
               "Convexity": _ratio(float(cv2.arcLength(hull, True)), perimeter),
               "Solidity": _ratio(area, float(cv2.contourArea(hull))), "Sphericity": terms["Sphericity"]}
    if len(holes):
        hole_area = sum(float(cv2.contourArea(as_contour(hole, f"holes[{i}]"))) for i, hole in enumerate(holes))
        metrics["Area"] = area - hole_area
        metrics.update(_area_terms(metrics["Area"], perimeter))
    return {name: float(metrics[name]) for name in METRIC_NAMES}
