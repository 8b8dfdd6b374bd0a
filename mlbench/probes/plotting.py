"""Matplotlib drawing of a memory timeline (imported lazily by ``MemoryTimeline.plot``)."""

from __future__ import annotations

from typing import Any

_MB = 1024**2


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
    """Live tensors, RSS growth and CUDA allocated in MiB against the row number (module
    boundaries in order); stages shaded, marks dashed, the peak annotated. Returns the Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 3.2))
    else:
        fig = ax.figure
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
    fig.tight_layout()
    return fig
