"""Where every plot of the package draws (:func:`panel_axes`), and the drawing of a memory timeline.

The plotting rule, documented in :mod:`mlbench.viz`: a plot takes ``ax`` (one panel) or ``axes``
(one Axes per panel), draws into them or into a new Figure, and returns the Figure. matplotlib is
imported inside the functions (``MemoryTimeline.plot`` imports this module lazily).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbench.errors import OptionsError

__all__ = ["panel_axes", "plot_timeline"]

_MB = 1024**2


def panel_axes(axes: Any, n: int, *, name: str, size: tuple[float, float] = (3.2, 3.2),
               sharey: bool = False) -> tuple[Any, list[Any]]:
    """The Figure and the ``n`` Axes a plot draws its panels into: the caller's, or a new Figure's.

    Parameters
    ----------
    axes : matplotlib Axes, sequence or array of Axes, or None
        The caller's Axes, one per panel (a single Axes for one panel). None makes a new
        :class:`matplotlib.figure.Figure` with ``n`` panels in a row, not through pyplot, so
        nothing accumulates in pyplot's state and Jupyter shows the returned Figure once.
    n : int
        How many panels the plot draws.
    name : str
        The plotting function, named in the error.
    size : (float, float)
        Width and height of one new panel in inches.
    sharey : bool
        New panels share their y axis.

    Returns
    -------
    figure : matplotlib.figure.Figure
        The Figure of the first Axes, or the new one.
    axes : list of n Axes

    Raises
    ------
    OptionsError
        When ``axes`` does not hold exactly ``n`` matplotlib Axes.
    """
    if axes is None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(size[0] * n, size[1]), layout="constrained")
        return figure, list(figure.subplots(1, n, squeeze=False, sharey=sharey)[0])
    from matplotlib.axes import Axes

    given = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(given) != n or not all(isinstance(ax, Axes) for ax in given):
        kinds = sorted({type(ax).__name__ for ax in given})
        raise OptionsError(f"{name} draws {n} panel(s) but was given {len(given)} object(s) of type {kinds}; "
                           f"pass {n} matplotlib Axes (e.g. fig.subplots(1, {n})) or none for a new Figure")
    return given[0].figure, given


def _spans(table: Any) -> list[tuple[str, int, int]]:
    """(stage, first row, last row) for every stage start/end pair in the table."""
    spans, open_rows = [], {}
    for row, (event, module) in enumerate(zip(table["event"], table["module"])):
        if event == "stage start":
            open_rows[module] = row
        elif event == "stage end" and module in open_rows:
            spans.append((module, open_rows.pop(module), row))
    return spans


def plot_timeline(timeline: Any, ax: Any = None) -> Any:
    """Live tensors, RSS growth and CUDA allocated in MiB against the row number (module boundaries
    in order); stages shaded, marks dashed, the peak annotated.

    Parameters
    ----------
    timeline : MemoryTimeline
        A recorded timeline.
    ax : matplotlib Axes, optional
        Draw into it; by default into a new 8 x 3.2 inch Figure.

    Returns
    -------
    matplotlib.figure.Figure
        The Figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    fig, (ax,) = panel_axes(ax, 1, name="plot_timeline", size=(8.0, 3.2))
    table = timeline.table
    rows = range(len(table))
    ax.step(rows, table["live_peak_bytes"] / _MB, where="post", label="live tensors (peak per step)")
    if "rss_bytes" in table:
        growth = table["rss_bytes"] - table["rss_bytes"].iloc[0] + timeline.baseline_bytes
        ax.plot(rows, growth / _MB, alpha=0.6, label="process RSS growth + parameters")
    if "cuda_allocated" in table:
        ax.plot(rows, table["cuda_allocated"] / _MB, label="CUDA allocated")
    for index, (name, first, last) in enumerate(_spans(table)):
        ax.axvspan(first, last, color=["#dbe9f6", "#fde7d3"][index % 2], alpha=0.6, lw=0)
        ax.text((first + last) / 2, 1.01 + 0.07 * (index % 2), name, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    for row in table.index[table["event"] == "mark"]:
        ax.axvline(row, ls="--", color="crimson", lw=0.8)
    peak_row = int(table["live_peak_bytes"].to_numpy().argmax())
    peak = timeline.peak
    ax.annotate(f"peak {peak.bytes / _MB:.0f} MiB\n{peak.module}", (peak_row, peak.bytes / _MB), fontsize=8,
                xytext=(-150, 25), textcoords="offset points", arrowprops={"arrowstyle": "->"})
    ax.set_xlabel("step (module boundaries, stage and retry marks, in order)")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper left", fontsize=8)
    return fig
