"""Figures for people: ``mb.viz``.

One plotting rule for the whole package (these functions, :func:`mlbench.probes.plotting.plot_timeline`
and every result's ``.plot()``, e.g. ``NormReport.plot``, ``MemoryTimeline.plot``):

- a plot with one panel takes ``ax=``, a plot with several panels takes ``axes=`` (a sequence or
  array of Axes, one per panel, in the order the docstring names them);
- given Axes, it draws into them and touches nothing else of their figure (only ``title`` becomes
  the figure's ``suptitle``); without them, it makes a new :class:`matplotlib.figure.Figure`;
- it always returns the Figure it drew on (``ax.figure`` for given Axes), never shows it;
- every heat map (a continuous value per pixel: probability, difference) has a colour bar; the
  categorical error maps (true positive, false positive, false negative) have a legend instead.

New figures are built on :class:`~matplotlib.figure.Figure` directly, not through pyplot, so nothing
accumulates in pyplot's global state and Jupyter shows a returned Figure exactly once: end a cell with
the call (``viz.show_polygons(image, polygons)``) or ``display()`` the Figure it returns. matplotlib
is imported inside the functions, so the core stays importable without it.

>>> from matplotlib.figure import Figure
>>> fig = Figure()
>>> ax = fig.subplots()
>>> show_polygons(np.zeros((8, 8)), [], ax=ax) is fig
True
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from mlbench.image.display import PALETTE, label_colours, overlay, to_display
from mlbench.probes.plotting import panel_axes

__all__ = ["show_segmentation", "show_error_maps", "show_polygons", "plot_threshold_curve", "plot_comparison"]

_ERROR_NAMES = ["true_positive", "false_positive", "false_negative"]


def _legend(ax, names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=np.asarray(PALETTE[n]) / 255, label=n.replace("_", " ")) for n in names]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)


def _titled(fig, title: str | None):
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _heat_map(fig, ax, values: np.ndarray, cmap: str = "magma", vmin: float = 0.0, vmax: float = 1.0) -> None:
    """A continuous map with its colour bar (the package's rule: no heat map without one)."""
    shown = ax.imshow(np.asarray(values, dtype=np.float32), cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(shown, ax=ax, shrink=0.8)


def show_segmentation(image: np.ndarray, probability: np.ndarray | None = None, mask: np.ndarray | None = None,
                      truth: np.ndarray | None = None, *, title: str | None = None, axes: Any = None):
    """Image | probability heat map (with colour bar) | prediction overlay | error map, side by side.

    Parameters
    ----------
    image : (H, W[, C]) any dtype
    probability : (H, W) float in [0, 1], optional
    mask : (H, W) bool or labels, optional
        The prediction; defaults to ``probability > 0.5``.
    truth : (H, W) bool or labels, optional
        With it, a fourth panel shows true positives, false positives and false negatives.
    title : str, optional
        The figure's title.
    axes : sequence of matplotlib Axes, optional
        One per panel drawn (image, then probability, overlay, errors as given); default a new Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if mask is None and probability is not None:
        mask = np.asarray(probability) > 0.5
    panels = ["image"] + (["probability"] if probability is not None else []) + (["overlay"] if mask is not None else [])
    panels += ["errors"] if truth is not None and mask is not None else []
    fig, axes = panel_axes(axes, len(panels), name="show_segmentation")
    for ax, panel in zip(axes, panels):
        if panel == "image":
            ax.imshow(to_display(image))
        elif panel == "probability":
            _heat_map(fig, ax, probability)
        elif panel == "overlay":
            ax.imshow(overlay(image, mask))
        else:
            ax.imshow(overlay(image, mask, truth))
            _legend(ax, _ERROR_NAMES)
        ax.set_title(panel, fontsize=9)
        ax.set_axis_off()
    return _titled(fig, title)


def show_error_maps(image: np.ndarray, masks: dict[str, np.ndarray], truth: np.ndarray, *, title: str | None = None,
                    axes: Any = None):
    """One error map per prediction (e.g. per model), side by side, same colours as :func:`overlay`.

    Parameters
    ----------
    image : (H, W[, C]) any dtype
    masks : {name: (H, W) bool or labels}
    truth : (H, W) bool or labels
    title : str, optional
        The figure's title.
    axes : sequence of matplotlib Axes, optional
        One per mask, in the order of ``masks``; default a new Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from mlbench.metrics import pixel_scores

    fig, axes = panel_axes(axes, len(masks), name="show_error_maps")
    for ax, (name, mask) in zip(axes, masks.items()):
        ax.imshow(overlay(image, mask, truth))
        ax.set_title(f"{name}: IoU {pixel_scores(truth, mask).iou:.3f}", fontsize=9)
        ax.set_axis_off()
    _legend(axes[-1], _ERROR_NAMES)
    return _titled(fig, title)


def show_polygons(image: np.ndarray, polygons: Sequence[dict[str, Any]], *, title: str | None = None,
                  label: bool = True, ax: Any = None):
    """Polygons drawn on the original image: external solid, internal dashed, coloured by id.

    Parameters
    ----------
    image : (H, W[, C]) any dtype, the image the polygons' coordinates refer to
    polygons : list of dict in the service's schema
    title : str, optional
        The panel's title (default: the polygon count and the line styles).
    label : bool
        Write each polygon's id at its centre.
    ax : matplotlib Axes, optional
        Draw into it; default a new 4.5 x 4.5 inch Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from mlbench.checks.polygons import polygon_points

    fig, (ax,) = panel_axes(ax, 1, name="show_polygons", size=(4.5, 4.5))
    ax.imshow(to_display(image))
    colours = label_colours(np.arange(1, len(polygons) + 1)) / 255.0  # by position: ids are "polygon_<n>" strings
    for poly, colour in zip(polygons, colours):
        pts = polygon_points(poly)
        if len(pts) == 0:
            continue
        closed = np.vstack([pts, pts[:1]])
        internal = poly.get("type") == "internal"
        ax.plot(closed[:, 0], closed[:, 1], linestyle="--" if internal else "-", color=colour, linewidth=1.2)
        if label:
            ax.annotate(str(poly.get("id")), (pts[:, 0].mean(), pts[:, 1].mean()), color="black", fontsize=7,
                        ha="center", va="center", bbox={"boxstyle": "round,pad=0.15", "fc": colour, "alpha": 0.8, "lw": 0})
    height, width = np.shape(image)[:2]
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(title or f"{len(polygons)} polygon(s): solid external, dashed internal", fontsize=9)
    ax.set_axis_off()
    return fig


def plot_threshold_curve(counts: pd.DataFrame, scores: pd.DataFrame | None = None, *, current: float | None = 0.5,
                         axes: Any = None):
    """Threshold sensitivity: polygon count (and foreground) per threshold, optional scores.

    Parameters
    ----------
    counts : DataFrame from :func:`mlbench.checks.polygons.threshold_counts`
        (columns thresh, polygons, foreground).
    scores : DataFrame with a ``thresh`` column and score columns (e.g. ``pixel_iou``, ``f1``), optional
    current : float, optional
        The threshold in use, marked by a vertical line.
    axes : sequence of matplotlib Axes, optional
        One for the counts, and one for the scores when ``scores`` is given; default a new Figure.
        The foreground fraction goes on a twin of the first.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = panel_axes(axes, 2 if scores is not None else 1, name="plot_threshold_curve", size=(4.0, 3.0))
    ax = axes[0]
    ax.plot(counts["thresh"], counts["polygons"], marker="o", color=np.asarray(PALETTE["prediction"]) / 255)
    ax.set_xlabel("threshold")
    ax.set_ylabel("polygons")
    twin = ax.twinx()
    twin.plot(counts["thresh"], counts["foreground"], linestyle=":", color="grey")
    twin.set_ylabel("foreground fraction (dotted)", color="grey")
    ax.set_title("polygon count and foreground", fontsize=9)
    if scores is not None:
        for column in [c for c in scores.columns if c != "thresh"]:
            axes[1].plot(scores["thresh"], scores[column], marker=".", label=column)
        axes[1].set_xlabel("threshold")
        axes[1].set_ylim(0, 1.02)
        axes[1].set_title("scores against the truth", fontsize=9)
        axes[1].legend(fontsize=7)
    for a in axes:
        if current is not None:
            a.axvline(current, color="black", linewidth=0.8, linestyle="--")
    return fig


def plot_comparison(table: pd.DataFrame, metrics: Sequence[str] = ("pixel_iou", "f1", "seconds", "peak_mib"), *,
                    axes: Any = None):
    """One bar chart per metric, models side by side, one group per image.

    Parameters
    ----------
    table : DataFrame from :func:`mlbench.studies.compare.compare_models` (columns image, model, metrics...)
    metrics : sequence of str
        The columns to chart; those missing from ``table`` are left out.
    axes : sequence of matplotlib Axes, optional
        One per metric present in ``table``; default a new Figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    present = [m for m in metrics if m in table.columns]
    fig, axes = panel_axes(axes, len(present), name="plot_comparison", size=(3.6, 3.0))
    models = sorted(table["model"].unique())
    images = list(dict.fromkeys(table["image"]))
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes, present):
        for k, model in enumerate(models):
            rows = table[table["model"] == model].set_index("image").reindex(images)
            ax.bar(np.arange(len(images)) + k * width, rows[metric].to_numpy(dtype=float), width, label=model)
        ax.set_xticks(np.arange(len(images)) + 0.4 - width / 2, images, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    axes[0].legend(fontsize=7)
    return fig
