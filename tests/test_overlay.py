"""Overlays: error-map colours, deterministic instance colours, any bit depth, inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest

import mlbench as mb
from mlbench.overlay import PALETTE, label_colours, overlay


def _blend(grey: int, colour, alpha=0.45):
    return tuple(int(v) for v in np.round((1 - alpha) * grey + alpha * np.asarray(colour, np.float32)).astype(np.uint8))


def test_error_map_colours_tp_fp_fn():
    image = np.zeros((20, 20), np.uint16)
    image[:, 10:] = 4095  # 12-bit data: rescaled for display only
    truth = np.zeros((20, 20), bool)
    truth[2:8, 2:8] = True
    pred = np.roll(truth, 3, axis=1)
    before = image.copy()
    rgb = overlay(image, pred, truth)
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 20, 3)
    assert np.array_equal(image, before)
    assert tuple(rgb[4, 6]) == _blend(0, PALETTE["true_positive"])
    assert tuple(rgb[4, 3]) == _blend(0, PALETTE["false_negative"])
    assert tuple(rgb[4, 9]) == _blend(0, PALETTE["false_positive"])
    assert tuple(rgb[2, 6]) == PALETTE["contour"]  # top row of the prediction
    assert tuple(rgb[15, 15]) == (255, 255, 255)  # untouched background, stretched to white


def test_instance_labels_get_deterministic_distinct_colours():
    image = np.full((12, 24), 0.0, np.float32)
    labels = np.zeros((12, 24), np.int32)
    labels[2:10, 2:10] = 3
    labels[2:10, 12:20] = 17
    a = overlay(image, labels)
    b = overlay(image, labels * 1)
    assert np.array_equal(a, b)
    c3, c17 = label_colours([3, 17])
    assert tuple(a[5, 5]) == _blend(0, c3) and tuple(a[5, 15]) == _blend(0, c17)
    assert tuple(c3) != tuple(c17)
    assert tuple(label_colours([0])[0]) == (0, 0, 0)
    # a bool mask keeps the single prediction colour
    assert tuple(overlay(image, labels > 0)[5, 5]) == _blend(0, PALETTE["prediction"])


def test_touching_instances_show_their_boundary():
    labels = np.zeros((10, 10), np.int32)
    labels[2:8, 2:5] = 1
    labels[2:8, 5:8] = 2
    rgb = overlay(np.zeros((10, 10), np.uint8), labels)
    assert tuple(rgb[4, 4]) == PALETTE["contour"] and tuple(rgb[4, 5]) == PALETTE["contour"]


def test_shape_mismatches_raise():
    with pytest.raises(mb.OptionsError, match=r"pred has shape \(4, 4\) but the image is \(5, 5\)"):
        overlay(np.zeros((5, 5)), np.zeros((4, 4), bool))
    with pytest.raises(mb.OptionsError, match=r"truth has shape \(5, 4\) but pred has \(5, 5\)"):
        overlay(np.zeros((5, 5)), np.zeros((5, 5), bool), np.zeros((5, 4), bool))
    with pytest.raises(mb.OptionsError, match=r"image must be \(H, W\), .* got shape \(5, 5, 2\)"):
        overlay(np.zeros((5, 5, 2)), np.zeros((5, 5), bool))


# --- figures (mb.viz) -----------------------------------------------------------------------------------

def test_viz_does_not_import_matplotlib_at_import_time():
    import subprocess
    import sys

    code = "import sys, mlbench.viz, mlbench.metrics, mlbench.polycheck, mlbench.compare; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_viz_figures_have_the_expected_panels():
    from matplotlib.figure import Figure

    from mlbench import viz
    from mlbench.polycheck import threshold_counts
    from mlbench.polygons import mask_to_polygons

    image, labels = mb.make_spheroids((64, 64), 2, np.random.default_rng(0))
    prob = (labels > 0).astype(np.float32) * 0.8
    before = prob.copy()
    fig = viz.show_segmentation(image, prob, truth=labels, title="t")
    assert isinstance(fig, Figure) and [a.get_title() for a in fig.axes[:4]] == ["image", "probability", "overlay", "errors"]
    assert np.array_equal(prob, before)
    assert len(viz.show_segmentation(image).axes) == 1
    polys = mask_to_polygons(labels > 0, min_area=5)
    fig = viz.show_polygons(image, polys)
    assert len(fig.axes[0].lines) == len(polys)
    counts = threshold_counts(prob, (0.3, 0.9))
    fig = viz.plot_threshold_curve(counts, counts[["thresh", "foreground"]])
    assert len(fig.axes) == 3  # counts, its twin, scores
    import pandas as pd

    table = pd.DataFrame({"image": ["a", "a"], "model": ["m1", "m2"], "pixel_iou": [0.5, 0.7], "seconds": [1.0, 2.0]})
    assert [a.get_title() for a in viz.plot_comparison(table).axes] == ["pixel_iou", "seconds"]
