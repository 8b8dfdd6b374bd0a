"""Do the polygons describe the mask? ``mb.check_polygons``.

The polygons are drawn back the way a client draws them (largest first; ``external``
fills, ``internal`` erases its inside and keeps its boundary pixels, which belong to
the object) and compared with the mask. The report lists what went wrong: objects that
do not round-trip, holes lost or typed wrong, parent ids missing, contours dropped by
the area filter (with their areas), self-intersections, degenerate polygons,
coordinates outside the image, swapped (x/y) or scaled to another size, and with a
probability map how the polygon count changes with the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.pipeline.polygons import _depths as _tree_depths, find_contours, mask_to_polygons

__all__ = ["PolygonReport", "check_polygons", "rasterize_polygons", "polygon_points", "threshold_counts"]


def polygon_points(polygon: dict[str, Any]) -> np.ndarray:
    """(N, 2) int32 (x, y) vertices of one polygon in the service's schema."""
    try:
        return np.array([[p["x"], p["y"]] for p in polygon["points"]], dtype=np.float64).round().astype(np.int32)
    except (KeyError, TypeError) as exc:
        raise OptionsError(f"polygon {str(polygon)[:80]} is not in the service's schema "
                           "{id, points: [{x, y}], type}; pass Segmentation.polygons or response['polygons']") from exc


def _parent_depths(polygons: Sequence[dict[str, Any]]) -> list[int] | None:
    """Each polygon's number of ancestors along ``parent_id``; None when the chain cannot be
    followed: an ``internal`` polygon without a parent in the list, ids not unique, a loop."""
    index: dict[Any, int] = {}
    for i, poly in enumerate(polygons):
        if poly.get("id") is None or poly["id"] in index:
            return None
        index[poly["id"]] = i
    depths = []
    for poly in polygons:
        if poly.get("type") == "internal" and poly.get("parent_id") not in index:
            return None
        depth, node, seen = 0, poly, set()
        while node.get("parent_id") is not None:
            parent = index.get(node["parent_id"])
            if parent is None or parent in seen:
                return None
            depth, node = depth + 1, polygons[parent]
            seen.add(parent)
        depths.append(depth)
    return depths


def rasterize_polygons(polygons: Sequence[dict[str, Any]], shape: tuple[int, int],
                       transform: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: polygons drawn as a client draws them, islands inside holes kept.

    Largest first, a polygon at even nesting depth fills and one at odd depth cuts a hole
    (keeping its boundary pixels, which belong to the object). The depth is the number of
    ancestors along ``parent_id`` when every ``internal`` polygon names a parent in the
    list: the service types every contour with a parent ``internal``, an island inside a
    hole too, so the type alone loses islands. Without usable parent ids the depth is the
    geometric nesting (even-odd rule).

    Parameters
    ----------
    polygons : list of dict
        ``{id, points [{x, y}], type, parent_id?}``; ids may be ints or ``"polygon_<n>"``.
    shape : (H, W)
    transform : (2, 2) array, optional
        Applied to the (x, y) points first.
    """
    import cv2

    canvas = np.zeros(shape, np.uint8)
    pts = [polygon_points(p) for p in polygons]
    if transform is not None:
        pts = [np.round(p @ np.asarray(transform).T).astype(np.int32) for p in pts]
    depths = _parent_depths(polygons)
    depths = depths if depths is not None else _depths(pts)
    order = sorted(range(len(pts)), key=lambda i: -abs(cv2.contourArea(pts[i])) if len(pts[i]) else 0)
    for i in order:
        if len(pts[i]) == 0:
            continue
        if depths[i] % 2 == 1:
            cv2.fillPoly(canvas, [pts[i]], 0)
            cv2.polylines(canvas, [pts[i]], True, 1)
        else:
            cv2.fillPoly(canvas, [pts[i]], 1)
    return canvas.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 1.0


def _crossings(pts: np.ndarray) -> int:
    """Number of proper crossings between non-adjacent edges of a closed polygon (O(N^2), capped)."""
    n = len(pts)
    if n < 4 or n > 3000:
        return 0
    a, b = pts.astype(np.int64), np.roll(pts, -1, axis=0).astype(np.int64)

    def orient(p, q, r):
        return np.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))

    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))
    i, j = i[keep], j[keep]
    d1, d2 = orient(a[j], b[j], a[i]), orient(a[j], b[j], b[i])
    d3, d4 = orient(a[i], b[i], a[j]), orient(a[i], b[i], b[j])
    return int(np.count_nonzero((d1 * d2 < 0) & (d3 * d4 < 0)))


def _depths(pts: list[np.ndarray]) -> list[int]:
    """How many other polygons contain each polygon's first vertex (geometric nesting depth)."""
    import cv2

    areas = [abs(cv2.contourArea(p)) if len(p) >= 3 else 0.0 for p in pts]
    depths = []
    for i, p in enumerate(pts):
        inside = 0
        for j, q in enumerate(pts):
            if i != j and len(p) and len(q) >= 3 and areas[j] > areas[i]:
                inside += cv2.pointPolygonTest(q.reshape(-1, 1, 2), (float(p[0, 0]), float(p[0, 1])), False) >= 0
        depths.append(inside)
    return depths


def _object_rows(polygons, pts, depths, drawn, mask) -> pd.DataFrame:
    import cv2

    labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[1]
    ids = {p.get("id") for p in polygons}
    rows = []
    for poly, p, depth in zip(polygons, pts, depths):
        kind = poly.get("type", "external")
        row = {"id": poly.get("id"), "type": kind, "depth": depth, "vertices": len(p),
               "area": round(abs(float(cv2.contourArea(p))), 1) if len(p) >= 3 else 0.0,
               "parent_id": poly.get("parent_id"), "crossings": _crossings(p), "round_trip_iou": np.nan}
        row["type_ok"] = (kind == "internal") == (depth % 2 == 1)
        row["parent_ok"] = kind != "internal" or row["parent_id"] in ids
        if kind != "internal" and len(p) >= 3:
            region = np.zeros(mask.shape, np.uint8)
            cv2.fillPoly(region, [p], 1)
            region = region.astype(bool)
            touched = np.unique(labels[region & mask])
            obj = np.isin(labels, touched[touched > 0])  # the mask objects this outline reaches, islands included
            row["round_trip_iou"] = round(_iou(drawn & region, obj), 4) if region.any() else 0.0
        rows.append(row)
    columns = ["id", "type", "depth", "vertices", "area", "parent_id", "crossings", "round_trip_iou", "type_ok", "parent_ok"]
    return pd.DataFrame(rows, columns=columns).astype({"parent_id": object, "type_ok": bool, "parent_ok": bool})


def _dropped(mask: np.ndarray, min_area: float) -> tuple[pd.DataFrame, int]:
    """Contours of the mask below ``min_area`` (what the area filter removes) and the number of holes kept."""
    import cv2

    contours, rows = find_contours(mask, detect_holes=True)
    depths = _tree_depths(rows)
    out, holes = [], 0
    for contour, depth in zip(contours, depths):
        area = float(cv2.contourArea(contour))
        if area >= min_area:
            holes += depth % 2
            continue
        x, y, w, h = cv2.boundingRect(contour)
        out.append({"kind": "hole" if depth % 2 else "object", "area": round(area, 1),
                    "x": x, "y": y, "width": w, "height": h})
    return pd.DataFrame(out, columns=["kind", "area", "x", "y", "width", "height"]), holes


def threshold_counts(probability: np.ndarray, thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                     *, min_area: float = 50.0, detect_holes: bool = True) -> pd.DataFrame:
    """Polygon counts of ``probability > t`` for each threshold: thresh, polygons, external, internal, foreground.

    Parameters
    ----------
    probability : (H, W) float array in [0, 1]
    """
    prob = np.asarray(probability, dtype=np.float32)
    if prob.ndim != 2:
        raise OptionsError(f"probability must be 2-D (H, W), got shape {prob.shape}")
    rows = []
    for t in thresholds:
        polys = mask_to_polygons(prob > t, detect_holes=detect_holes, min_area=min_area)
        n_int = sum(p["type"] == "internal" for p in polys)
        rows.append({"thresh": round(float(t), 3), "polygons": len(polys), "external": len(polys) - n_int,
                     "internal": n_int, "foreground": round(float((prob > t).mean()), 4)})
    return pd.DataFrame(rows)


def _candidates(polygons, mask: np.ndarray, min_area: float, model_size: int | None) -> dict[str, np.ndarray]:
    """Coordinate transforms worth trying: swapped x/y, the model-input scale, and the scale that maps
    the polygons' extent onto the extent of the mask's objects above ``min_area``."""
    import cv2

    height, width = mask.shape
    found = {"swapped x/y": np.array([[0.0, 1.0], [1.0, 0.0]])}
    if model_size:
        found[f"in the {model_size}x{model_size} model input space (scale x {width / model_size:.3g}, "
              f"y {height / model_size:.3g})"] = np.diag([width / model_size, height / model_size])
    pts = np.concatenate([polygon_points(p) for p in polygons])
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    big = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= min_area]
    if len(pts) and len(big):
        sx = float((big[:, 0] + big[:, 2]).max()) / max(float(pts[:, 0].max()) + 1, 1.0)
        sy = float((big[:, 1] + big[:, 3]).max()) / max(float(pts[:, 1].max()) + 1, 1.0)
        if abs(sx - 1) > 0.05 or abs(sy - 1) > 0.05:
            found[f"scaled by x {sx:.3g}, y {sy:.3g}"] = np.diag([sx, sy])
    return found


@dataclass(frozen=True, eq=False, repr=False)
class PolygonReport(ReportText):
    """What ``check_polygons`` found. The text repr is the report.

    Attributes
    ----------
    ok : bool
        No problem found.
    problems : tuple of str
        One sentence per problem, each with its fix.
    round_trip_iou : float
        IoU of the redrawn polygons with the mask (1.0 = exact).
    objects : DataFrame
        One row per polygon: id, type, depth (geometric nesting), vertices, area,
        parent_id, crossings (self-intersections), round_trip_iou (external only),
        type_ok, parent_ok.
    dropped : DataFrame
        Contours below ``min_area``: kind (object / hole), area, bounding box.
    holes_expected, holes_found : int
        Holes of the mask above ``min_area``, and polygons at odd nesting depth.
    points_outside : int
        Vertices outside the image.
    transform_hint : str or None
        A coordinate transform that redraws the mask much better (swapped, scaled).
    thresholds : DataFrame or None
        Polygon counts across thresholds (see :func:`threshold_counts`).
    """

    ok: bool
    problems: tuple
    round_trip_iou: float
    n_polygons: int
    holes_expected: int
    holes_found: int
    points_outside: int
    transform_hint: str | None
    objects: pd.DataFrame = field(repr=False)
    dropped: pd.DataFrame = field(repr=False)
    thresholds: pd.DataFrame | None = field(default=None, repr=False)

    def text(self) -> str:
        """The report: a summary line, then one line per problem."""
        lines = [f"PolygonReport: {self.n_polygons} polygon(s), round-trip IoU {self.round_trip_iou:.4f}, "
                 f"holes {self.holes_found}/{self.holes_expected}, {len(self.dropped)} contour(s) below min_area, "
                 + ("ok" if self.ok else f"{len(self.problems)} problem(s)")]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        facts = [("polygons", self.n_polygons), ("round-trip IoU", f"{self.round_trip_iou:.4f}"),
                 ("holes found / expected", f"{self.holes_found}/{self.holes_expected}"),
                 ("contours below min_area", len(self.dropped)), ("vertices outside the image", self.points_outside),
                 ("transform hint", self.transform_hint or "-")]
        return self._html("PolygonReport: " + ("ok" if self.ok else f"{len(self.problems)} problem(s)"),
                          (("fact", "value"), facts), (("problem",), [(p,) for p in self.problems]))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "round_trip_iou": self.round_trip_iou,
                "n_polygons": self.n_polygons, "holes_expected": self.holes_expected, "holes_found": self.holes_found,
                "points_outside": self.points_outside, "transform_hint": self.transform_hint,
                "objects": self.objects.to_dict("records"), "dropped": self.dropped.to_dict("records"),
                "thresholds": None if self.thresholds is None else self.thresholds.to_dict("records")}


def _geometry_problems(objects: pd.DataFrame, outside: int, shape: tuple[int, int]) -> list[str]:
    found = []
    crossing = objects.loc[objects["crossings"] > 0, "id"].tolist()
    if crossing:
        found.append(f"{len(crossing)} polygon(s) self-intersect (ids {crossing[:10]}); "
                     "simplify or rebuild them from the mask (mb.mask_to_polygons)")
    degenerate = objects.loc[objects["vertices"] < 3, "id"].tolist()
    if degenerate:
        found.append(f"{len(degenerate)} polygon(s) have fewer than 3 vertices (ids {degenerate[:10]}); they enclose nothing")
    if outside:
        found.append(f"{outside} vertex/vertices lie outside the {shape[1]}x{shape[0]} image (x in 0..{shape[1] - 1}, "
                     f"y in 0..{shape[0] - 1}); map coordinates back to the original image size")
    return found


def _structure_problems(objects: pd.DataFrame, dropped: pd.DataFrame, holes: tuple[int, int], min_area: float) -> list[str]:
    found = []
    wrong = objects.loc[~objects["type_ok"], "id"].tolist()
    if wrong:
        found.append(f"{len(wrong)} polygon(s) typed wrong for their nesting (ids {wrong[:10]}): an island inside "
                     "a hole typed 'internal' is the as_served hierarchy bug; fix: hierarchy='tree'")
    orphans = objects.loc[~objects["parent_ok"], "id"].tolist()
    if orphans:
        found.append(f"{len(orphans)} internal polygon(s) without a valid parent_id (ids {orphans[:10]}); "
                     "fix: hierarchy='tree' links every hole to its outer contour")
    if holes[1] < holes[0]:
        found.append(f"{holes[0] - holes[1]} hole(s) of the mask have no polygon ({holes[1]} of {holes[0]}); "
                     "fix: detect_holes=True")
    small = dropped.loc[dropped["kind"] == "object", "area"].tolist()
    if small:
        found.append(f"{len(small)} object(s) smaller than min_area={min_area:g} px were dropped (areas {small[:10]}); "
                     "lower min_area if they are real")
    return found


def check_polygons(mask: np.ndarray, polygons: Sequence[dict[str, Any]], *, min_area: float = 50.0,
                   probability: np.ndarray | None = None, thresholds: Sequence[float] | None = None,
                   min_iou: float = 0.95, model_size: int | None = None) -> PolygonReport:
    """Check that polygons describe a mask: round trip, holes, parents, area filter, geometry, coordinates.

    Parameters
    ----------
    mask : (H, W) bool or labels
        The mask the polygons were made from (non-zero is foreground), at the image's size.
    polygons : list of dict
        The service's polygons ``{id, points [{x, y}], type, parent_id?}``.
    min_area : float
        The area filter used to make them; contours below it are listed as dropped.
    probability : (H, W) float, optional
        With it, the polygon count across ``thresholds`` (0.1..0.9 by default).
    min_iou : float
        Round-trip IoU below which an object is reported.
    model_size : int, optional
        The model's square input side; coordinates left in that space are recognised.

    Raises
    ------
    OptionsError
        For a mask that is not 2-D or polygons not in the service's schema.
    """
    mask = np.asarray(mask) != 0
    if mask.ndim != 2:
        raise OptionsError(f"mask must be 2-D (H, W), got shape {mask.shape}; squeeze the batch and channel axes")
    polygons = list(polygons)
    pts = [polygon_points(p) for p in polygons]
    drawn = rasterize_polygons(polygons, mask.shape)
    objects = _object_rows(polygons, pts, _depths(pts), drawn, mask)
    dropped, holes_expected = _dropped(mask, min_area)
    holes_found = int((objects["depth"] % 2 == 1).sum())
    allpts = np.concatenate(pts) if pts else np.zeros((0, 2), np.int32)
    outside = int(np.count_nonzero((allpts[:, 0] < 0) | (allpts[:, 1] < 0) | (allpts[:, 0] >= mask.shape[1])
                                   | (allpts[:, 1] >= mask.shape[0])))
    iou = round(_iou(drawn, mask), 4)
    problems = _structure_problems(objects, dropped, (holes_expected, holes_found), min_area)
    problems += _geometry_problems(objects, outside, mask.shape)
    poor = objects.loc[objects["round_trip_iou"] < min_iou, "id"].tolist()
    if poor or iou < min_iou:
        problems.append(f"polygons redraw the mask with IoU {iou:.4f}; {len(poor)} object(s) below {min_iou} "
                        f"(ids {poor[:10]})")
    hint = _best_transform(polygons, mask, iou, min_area, model_size)
    if hint:
        problems.append(f"coordinates look {hint}; transformed they redraw the mask much better")
    curve = None
    if probability is not None:
        curve = threshold_counts(probability, thresholds or (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), min_area=min_area)
    return PolygonReport(ok=not problems, problems=tuple(problems), round_trip_iou=iou, n_polygons=len(polygons),
                         holes_expected=holes_expected, holes_found=holes_found, points_outside=outside,
                         transform_hint=hint, objects=objects, dropped=dropped, thresholds=curve)


def _best_transform(polygons, mask: np.ndarray, iou: float, min_area: float, model_size: int | None) -> str | None:
    if iou >= 0.9 or not polygons:
        return None
    candidates = _candidates(polygons, mask, min_area, model_size)
    scored = {name: _iou(rasterize_polygons(polygons, mask.shape, m), mask) for name, m in candidates.items()}
    name = max(scored, key=scored.get)
    return f"{name} (IoU {scored[name]:.4f} instead of {iou:.4f})" if scored[name] > iou + 0.2 else None
