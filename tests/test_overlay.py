"""Overlays: error-map colours, deterministic instance colours, any bit depth, inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest

import mlbench as mb
from mlbench.image.display import PALETTE, label_colours, overlay


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

    code = "import sys, mlbench.viz, mlbench.metrics, mlbench.checks.polygons, mlbench.studies.compare; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_viz_figures_have_the_expected_panels():
    from matplotlib.figure import Figure

    from mlbench import viz
    from mlbench.checks.polygons import threshold_counts
    from mlbench.pipeline.polygons import mask_to_polygons

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
    fig = viz.show_error_maps(image, {"a": labels > 0, "b": np.roll(labels > 0, 3, axis=1)}, labels)
    assert isinstance(fig, Figure) and [a.get_title()[:2] for a in fig.axes] == ["a:", "b:"]


def test_heat_maps_have_a_colour_bar():
    from mlbench import viz

    image, labels = mb.make_spheroids((32, 32), 1, np.random.default_rng(0))
    fig = viz.show_segmentation(image, (labels > 0).astype(np.float32))
    probability, bar = fig.axes[1], fig.axes[-1]
    assert probability.images[0].colorbar is not None and bar.get_label() == "<colorbar>"


def _plot_inputs():
    import pandas as pd

    from mlbench.checks.polygons import threshold_counts
    from mlbench.pipeline.polygons import mask_to_polygons

    image, labels = mb.make_spheroids((48, 48), 2, np.random.default_rng(1))
    prob = (labels > 0).astype(np.float32) * 0.8
    counts = threshold_counts(prob, (0.3, 0.9))
    table = pd.DataFrame({"image": ["a", "a"], "model": ["m1", "m2"], "pixel_iou": [0.5, 0.7], "seconds": [1.0, 2.0]})
    return image, labels, prob, mask_to_polygons(labels > 0, min_area=5), counts, table


def test_every_plot_draws_into_the_given_axes_and_returns_their_figure():
    from matplotlib.figure import Figure

    from mlbench import viz

    image, labels, prob, polys, counts, table = _plot_inputs()
    fig = Figure()
    axes = fig.subplots(2, 2)  # any array of Axes, one per panel
    assert viz.show_segmentation(image, prob, truth=labels, axes=axes) is fig
    assert all(ax.images for ax in axes.ravel()) and len(fig.axes) == 5  # and the probability's colour bar
    fig = Figure()
    ax = fig.subplots()
    assert viz.show_polygons(image, polys, ax=ax) is fig and len(ax.lines) == len(polys)
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert viz.show_error_maps(image, {"a": labels > 0, "b": labels > 0}, labels, axes=axes, title="t") is fig
    assert all(ax.images for ax in axes) and fig.get_suptitle() == "t"
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert viz.plot_threshold_curve(counts, counts[["thresh", "foreground"]], axes=axes) is fig
    assert axes[0].lines and axes[1].lines and len(fig.axes) == 3  # and the twin of the first
    fig = Figure()
    axes = list(fig.subplots(1, 2))
    assert viz.plot_comparison(table, axes=axes) is fig and [a.get_title() for a in axes] == ["pixel_iou", "seconds"]


def test_plots_refuse_axes_that_do_not_fit():
    from matplotlib.figure import Figure

    from mlbench import viz

    image, labels, prob, polys, counts, table = _plot_inputs()
    ax = Figure().subplots()
    with pytest.raises(mb.OptionsError, match=r"show_segmentation draws 3 panel\(s\) but was given 1 object\(s\) "
                                              r"of type \['Axes'\]; pass 3 matplotlib Axes"):
        viz.show_segmentation(image, prob, axes=[ax])
    with pytest.raises(mb.OptionsError, match=r"show_polygons draws 1 panel\(s\) but was given 1 object\(s\) of type \['str'\]"):
        viz.show_polygons(image, polys, ax="left")
