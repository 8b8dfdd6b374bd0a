"""Stage outputs as arrays, paired for a difference, and the figure of :meth:`mlbench.studies.run_diff.RunDiff.plot`.

Each map is the stage's output reduced to one (H, W) plane: the decoded image as an image, the
model input and raw output at item 0 and the channel where the runs differ most, the probability,
the polygons drawn as a client draws them; or the outputs of the first module that departs.
Every heat map has its colour bar (the package's plotting rule, :mod:`mlbench.viz`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlbench.checks.polygons import rasterize_polygons
from mlbench.errors import OptionsError
from mlbench.pipeline.stages import STAGE_NAMES

if TYPE_CHECKING:
    from mlbench.studies.run_diff import RunDiff

__all__ = ["plot_run_diff", "stage_array", "pair_for_diff"]


def stage_array(value: Any) -> np.ndarray:
    """A stage output as the array compared: a tensor's values, a decoded image's pixels."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(getattr(value, "image", value))


def pair_for_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``a`` and ``b`` at one shape for a difference: equal shapes, or a grey image beside a colour one."""
    if a.shape == b.shape:
        return a, b
    if a.ndim == 2 and b.ndim == 3 and a.shape == b.shape[:2]:
        return np.broadcast_to(a[..., None], b.shape), b
    if b.ndim == 2 and a.ndim == 3 and b.shape == a.shape[:2]:
        return a, np.broadcast_to(b[..., None], a.shape)
    return None


def plot_run_diff(diff: "RunDiff", stage: str, axes: Any = None) -> Any:
    """Draw ``stage`` ("module" for the first module that departs) of ``diff`` into three ``axes`` or a new
    Figure (a, b, |a - b|) and return the Figure."""
    return _plot_pair(*_maps(diff, stage), f"{stage}: a = {diff.a}, b = {diff.b}", axes)


def _plane(value: Any, channel: int | None = None) -> np.ndarray:
    """A 2-D map of a stage or module output: item 0 and the given channel of (N, C, H, W)."""
    array = stage_array(value).astype(np.float32, copy=False)
    if array.ndim == 4:
        array = array[0]
    if array.ndim == 3:
        array = array[channel or 0]
    if array.ndim != 2:
        raise OptionsError(f"an output of shape {array.shape} has no (H, W) map to draw; plot another stage")
    return array


def _worst_channel(a: np.ndarray, b: np.ndarray) -> int:
    """The channel of (N, C, H, W) outputs where they differ most (item 0; 0 when they do not pair)."""
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        return 0
    return int(np.abs(a[0].astype(np.float64) - b[0]).reshape(a.shape[1], -1).max(axis=1).argmax())


def _maps(diff: RunDiff, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(map of a, map of b, |a - b| or None when the shapes do not pair, kind: "image", "heat" or "mask")."""
    if stage == "module":
        if diff.modules is None or diff.modules.captured is None:
            raise OptionsError("no module departs: there are no module outputs to draw; pass a stage name")
        _, value, reference = diff.modules.captured
        a, b = stage_array(reference), stage_array(value)
        channel = _worst_channel(a, b[: a.shape[0]] if b.ndim == a.ndim else b)
        left, right = _plane(a, channel), _plane(b, channel)
        return left, right, (np.abs(left - right) if left.shape == right.shape else None), "heat"
    if stage not in STAGE_NAMES:
        raise OptionsError(f"stage must be one of {STAGE_NAMES} or 'module', got {stage!r}")
    a, b = (run.output(stage) for run in diff.runs)
    if stage == "decode":
        left, right = stage_array(a), stage_array(b)
        paired = pair_for_diff(left, right)
        delta = None if paired is None else np.abs(paired[0].astype(np.float64) - paired[1])
        return left, right, (delta.max(axis=2) if delta is not None and delta.ndim == 3 else delta), "image"
    if stage == "polygons":
        shape = diff.runs[0].output("decode").image.shape[:2]
        left, right = rasterize_polygons(a, shape), rasterize_polygons(b, shape)
        return left, right, (left != right).astype(np.float32), "mask"
    if stage == "postprocess":
        left, right = a.probability, b.probability
    else:
        channel = _worst_channel(stage_array(a), stage_array(b))
        left, right = _plane(a, channel), _plane(b, channel)
    return left, right, (np.abs(left - right) if left.shape == right.shape else None), "heat"


def _plot_pair(left: np.ndarray, right: np.ndarray, delta: np.ndarray | None, kind: str, title: str, axes: Any) -> Any:
    from mlbench.image.display import to_display
    from mlbench.probes.plotting import panel_axes

    figure, (ax_a, ax_b, ax_d) = panel_axes(axes, 3, name="RunDiff.plot")
    finite = [m[np.isfinite(m)] for m in (left, right) if kind == "heat"]
    low = min((float(m.min()) for m in finite if m.size), default=0.0)
    high = max((float(m.max()) for m in finite if m.size), default=1.0)
    for ax, values, name in ((ax_a, left, "a"), (ax_b, right, "b")):
        if kind == "image":
            ax.imshow(to_display(values))
        else:
            shown = ax.imshow(values, cmap="gray" if kind == "mask" else "viridis",
                              vmin=low if kind == "heat" else 0, vmax=high if kind == "heat" else 1)
            if kind == "heat":
                figure.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(name, fontsize=9)
    if delta is None:
        ax_d.text(0.5, 0.5, "shapes differ:\nno pixel-wise difference", ha="center", va="center", fontsize=9)
    else:
        shown = ax_d.imshow(delta, cmap="magma", vmin=0, vmax=max(float(np.nanmax(delta)), 1e-12))
        figure.colorbar(shown, ax=ax_d, shrink=0.8)
    ax_d.set_title("|a - b|", fontsize=9)
    for ax in (ax_a, ax_b, ax_d):
        ax.set_xticks([]), ax.set_yticks([])
    figure.suptitle(title, fontsize=10)
    return figure
