"""check_polygons: each problem it reports, on drawn masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

import mlbench as mb
from mlbench.checks.polygons import check_polygons, rasterize_polygons, threshold_counts
from mlbench.pipeline.polygons import mask_to_polygons


def ring_scene():
    """A square ring with an island in its hole, a second object, and a 3x3 speck below (area 4)."""
    mask = np.zeros((80, 100), bool)
    mask[5:55, 5:55] = True
    mask[15:45, 15:45] = False
    mask[25:35, 25:35] = True
    mask[10:50, 65:95] = True
    mask[70:73, 70:73] = True
    return mask


def test_tree_polygons_round_trip_and_report_the_dropped_speck():
    mask = ring_scene()
    report = check_polygons(mask, mask_to_polygons(mask))
    assert report.holes_expected == report.holes_found == 1
    assert report.objects["round_trip_iou"].dropna().tolist() == [1.0, 1.0, 1.0]
    assert report.round_trip_iou == pytest.approx(1 - 9 / mask.sum(), abs=1e-4)
    assert report.dropped.to_dict("records") == [{"kind": "object", "area": 4.0, "x": 70, "y": 70, "width": 3, "height": 3}]
    assert report.problems == ("1 object(s) smaller than min_area=50 px were dropped (areas [4.0]); "
                               "lower min_area if they are real",)
    assert check_polygons(mask, mask_to_polygons(mask, min_area=1), min_area=1).ok


def test_as_served_types_the_island_as_a_hole_whose_parent_is_the_hole():
    mask = ring_scene()
    served = mask_to_polygons(mask, hierarchy="as_served")
    by_id = {p["id"]: p for p in served}
    internal = [p for p in served if p["type"] == "internal"]
    assert len(internal) == 2  # the hole and the island inside it, both typed internal
    (hole,) = [p for p in internal if by_id[p["parent_id"]]["type"] == "external"]
    (island,) = [p for p in internal if p is not hole]
    assert island["parent_id"] == hole["id"]
    assert all(isinstance(p["id"], str) and p["id"].startswith("polygon_") for p in served)
    assert all(isinstance(q["x"], float) for p in served for q in p["points"])
    report = check_polygons(mask, served)
    assert report.objects["type_ok"].tolist().count(False) == 1
    assert report.objects["parent_ok"].all()
    assert "typed wrong for their nesting" in repr(report)
    # the parent chain keeps the island when drawn; only the speck is lost
    assert report.round_trip_iou == pytest.approx(1 - 9 / mask.sum(), abs=1e-4)


def test_lost_holes_are_reported():
    mask = ring_scene()
    report = check_polygons(mask, mask_to_polygons(mask, detect_holes=False))
    assert report.holes_found == 0 and any("fix: detect_holes=True" in p for p in report.problems)


def test_swapped_and_scaled_coordinates_are_recognised():
    mask = ring_scene()
    polygons = mask_to_polygons(mask)
    swapped = [{**p, "points": [{"x": q["y"], "y": q["x"]} for q in p["points"]]} for p in polygons]
    assert check_polygons(mask, swapped).transform_hint.startswith("swapped x/y")
    in_model = [{**p, "points": [{"x": q["x"] * 256 / 100, "y": q["y"] * 256 / 80} for q in p["points"]]}
                for p in polygons]
    report = check_polygons(mask, in_model, model_size=256)
    assert report.transform_hint.startswith("in the 256x256 model input space") and report.points_outside > 0
    doubled = [{**p, "points": [{"x": q["x"] * 2, "y": q["y"] * 2} for q in p["points"]]} for p in polygons]
    assert check_polygons(mask, doubled).transform_hint.startswith("scaled by x 0.503, y 0.505")


def test_self_intersection_and_degenerate_polygons():
    mask = np.zeros((40, 40), bool)
    bowtie = {"id": 1, "type": "external", "points": [{"x": 5, "y": 5}, {"x": 30, "y": 30}, {"x": 30, "y": 5}, {"x": 5, "y": 30}]}
    line = {"id": 2, "type": "external", "points": [{"x": 1, "y": 1}, {"x": 3, "y": 1}]}
    report = check_polygons(mask, [bowtie, line])
    assert report.objects["crossings"].tolist() == [1, 0]
    assert any("self-intersect (ids [1])" in p for p in report.problems)
    assert any("fewer than 3 vertices (ids [2])" in p for p in report.problems)


def test_threshold_counts_follow_the_probability():
    rows, cols = np.mgrid[:64, :64]
    prob = np.clip(1 - np.hypot(rows - 32, cols - 32) / 40, 0, 1).astype(np.float32)
    prob[0:10, 0:10] = 0.35  # a faint blob, present only at low thresholds
    curve = threshold_counts(prob, (0.3, 0.5, 0.9))
    assert curve["polygons"].tolist() == [2, 1, 0]
    report = check_polygons(prob > 0.5, mask_to_polygons(prob > 0.5), probability=prob, thresholds=(0.3, 0.5))
    assert report.thresholds["polygons"].tolist() == [2, 1]


def test_inputs_untouched_and_bad_arguments_raise():
    mask = ring_scene()
    polygons = mask_to_polygons(mask)
    before = [dict(p) for p in polygons]
    rasterize_polygons(polygons, mask.shape)
    check_polygons(mask, polygons)
    assert polygons == before
    with pytest.raises(mb.OptionsError, match=r"mask must be 2-D \(H, W\), got shape \(1, 80, 100\)"):
        check_polygons(mask[None], polygons)
    with pytest.raises(mb.OptionsError, match="is not in the service's schema"):
        check_polygons(mask, [{"id": 1, "pts": []}])
    with pytest.raises(mb.OptionsError, match=r"probability must be 2-D \(H, W\)"):
        threshold_counts(np.zeros((2, 3, 3)))
