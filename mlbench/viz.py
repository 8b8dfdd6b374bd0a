"""Figures for people: ``mb.viz``. Every function returns a matplotlib Figure (never shows it).

matplotlib is imported inside the functions, so the core stays importable without it.
Figures are built on :class:`matplotlib.figure.Figure` directly, not through pyplot,
so nothing accumulates in pyplot's global state; Jupyter displays a returned Figure.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .overlay import PALETTE, label_colours, overlay, to_display

__all__ = ["show_segmentation", "show_error_maps", "show_polygons", "plot_threshold_curve", "plot_comparison"]


def _figure(ncols: int, width: float = 3.2, height: float = 3.2, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _legend(ax, names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=np.asarray(PALETTE[n]) / 255, label=n.replace("_", " ")) for n in names]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)


def show_segmentation(image: np.ndarray, probability: np.ndarray | None = None, mask: np.ndarray | None = None,
                      truth: np.ndarray | None = None, *, title: str | None = None):
    """Image | probability heat map | prediction overlay | error map, side by side.

    Parameters
    ----------
    image : (H, W[, C]) any dtype
    probability : (H, W) float in [0, 1], optional
    mask : (H, W) bool or labels, optional
        The prediction; defaults to ``probability > 0.5``.
    truth : (H, W) bool or labels, optional
        With it, a fourth panel shows true positives, false positives and false negatives.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if mask is None and probability is not None:
        mask = np.asarray(probability) > 0.5
    panels = ["image"] + (["probability"] if probability is not None else []) + (["overlay"] if mask is not None else [])
    panels += ["errors"] if truth is not None and mask is not None else []
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes[0], panels):
        if panel == "image":
            ax.imshow(to_display(image))
        elif panel == "probability":
            shown = ax.imshow(np.asarray(probability, dtype=np.float32), cmap="magma", vmin=0.0, vmax=1.0)
            fig.colorbar(shown, ax=ax, shrink=0.8)
        elif panel == "overlay":
            ax.imshow(overlay(image, mask))
        else:
            ax.imshow(overlay(image, mask, truth))
            _legend(ax, ["true_positive", "false_positive", "false_negative"])
        ax.set_title(panel, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def show_error_maps(image: np.ndarray, masks: dict[str, np.ndarray], truth: np.ndarray, *, title: str | None = None):
    """One error map per prediction (e.g. per model), side by side, same colours as :func:`overlay`.

    Parameters
    ----------
    image : (H, W[, C]) any dtype
    masks : {name: (H, W) bool or labels}
    truth : (H, W) bool or labels
    """
    from .metrics import pixel_scores

    fig, axes = _figure(len(masks))
    for ax, (name, mask) in zip(axes[0], masks.items()):
        ax.imshow(overlay(image, mask, truth))
        ax.set_title(f"{name}: IoU {pixel_scores(truth, mask).iou:.3f}", fontsize=9)
        ax.set_axis_off()
    _legend(axes[0, -1], ["true_positive", "false_positive", "false_negative"])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def show_polygons(image: np.ndarray, polygons: Sequence[dict[str, Any]], *, title: str | None = None,
                  label: bool = True):
    """Polygons drawn on the original image: external solid, internal dashed, coloured by id.

    Parameters
    ----------
    image : (H, W[, C]) any dtype, the image the polygons' coordinates refer to
    polygons : list of dict in the service's schema
    """
    from .polycheck import polygon_points

    fig, axes = _figure(1, width=4.5, height=4.5)
    ax = axes[0, 0]
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


def plot_threshold_curve(counts: pd.DataFrame, scores: pd.DataFrame | None = None, *, current: float | None = 0.5):
    """Threshold sensitivity: polygon count (and foreground) per threshold, optional scores.

    Parameters
    ----------
    counts : DataFrame from :func:`mlbench.polycheck.threshold_counts`
        (columns thresh, polygons, foreground).
    scores : DataFrame with a ``thresh`` column and score columns (e.g. ``pixel_iou``, ``f1``), optional
    current : float, optional
        The threshold in use, marked by a vertical line.
    """
    fig, axes = _figure(2 if scores is not None else 1, width=4.0, height=3.0)
    ax = axes[0, 0]
    ax.plot(counts["thresh"], counts["polygons"], marker="o", color=np.asarray(PALETTE["prediction"]) / 255)
    ax.set_xlabel("threshold")
    ax.set_ylabel("polygons")
    twin = ax.twinx()
    twin.plot(counts["thresh"], counts["foreground"], linestyle=":", color="grey")
    twin.set_ylabel("foreground fraction (dotted)", color="grey")
    ax.set_title("polygon count and foreground", fontsize=9)
    if scores is not None:
        for column in [c for c in scores.columns if c != "thresh"]:
            axes[0, 1].plot(scores["thresh"], scores[column], marker=".", label=column)
        axes[0, 1].set_xlabel("threshold")
        axes[0, 1].set_ylim(0, 1.02)
        axes[0, 1].set_title("scores against the truth", fontsize=9)
        axes[0, 1].legend(fontsize=7)
    for a in axes[0]:
        if current is not None:
            a.axvline(current, color="black", linewidth=0.8, linestyle="--")
    return fig


def plot_comparison(table: pd.DataFrame, metrics: Sequence[str] = ("pixel_iou", "f1", "seconds", "peak_mib")):
    """One bar chart per metric, models side by side, one group per image.

    Parameters
    ----------
    table : DataFrame from :func:`mlbench.compare.compare_models` (columns image, model, metrics...)
    """
    present = [m for m in metrics if m in table.columns]
    fig, axes = _figure(len(present), width=3.6, height=3.0)
    models = sorted(table["model"].unique())
    images = list(dict.fromkeys(table["image"]))
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes[0], present):
        for k, model in enumerate(models):
            rows = table[table["model"] == model].set_index("image").reindex(images)
            ax.bar(np.arange(len(images)) + k * width, rows[metric].to_numpy(dtype=float), width, label=model)
        ax.set_xticks(np.arange(len(images)) + 0.4 - width / 2, images, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return fig
