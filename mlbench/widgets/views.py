"""What each pipeline stage looks like: pure functions from a stage's output to a :class:`StageView`.

A view is text lines (the report, rounded so it is stable), pictures as PNG bytes and an
optional long text (polygon JSON, traceback). Nothing here imports ipywidgets; the
Stepper only lays views out.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlbench.metrics import pixel_scores
from mlbench.image.display import overlay
from mlbench.pipeline.postprocess import Postprocessed, to_probability
from mlbench.pipeline.stages import Decoded
from mlbench.widgets.images import DISPLAY_SIDE, display, draw_polygons, fit, heat_map, histogram_image, png_bytes

__all__ = ["StageView", "ViewImage", "decoded_view", "preprocessed_view", "forward_view",
           "mask_view", "polygons_view", "failure_view", "pending_view", "stage_view"]

MAX_JSON_CHARS = 20_000


@dataclass(frozen=True)
class ViewImage:
    """One picture of a view: a stable ``key`` (e.g. "overlay"), a caption and PNG bytes."""

    key: str
    caption: str
    png: bytes

    def __repr__(self) -> str:
        return f"ViewImage({self.key}: {self.caption})"


@dataclass(frozen=True)
class StageView:
    """The view of one stage: ``status`` "pending", "done" or "failed"; ``lines`` is the text report."""

    stage: str
    status: str
    lines: tuple[str, ...]
    images: tuple[ViewImage, ...] = ()
    details: str = ""

    @property
    def text(self) -> str:
        """The report: a title line, then the lines indented."""
        return "\n".join([f"{self.stage} ({self.status})"] + [f"  {line}" for line in self.lines])

    def image(self, key: str) -> ViewImage | None:
        """The picture with ``key``, or None."""
        return next((image for image in self.images if image.key == key), None)

    def __repr__(self) -> str:
        return self.text


def _range(values: np.ndarray, digits: int = 4) -> str:
    """``min..max`` of the finite values with ``digits`` significant digits (model outputs use 3: stable)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if not finite.size:
        return "no finite values"
    return f"{float(finite.min()):.{digits}g}..{float(finite.max()):.{digits}g}"


def decoded_view(decoded: Decoded, side: int | None = DISPLAY_SIDE) -> StageView:
    """Decoded image: dtype, effective bit depth, value range, problems, the image (longest side at most
    ``side``, None: full size) and its histogram."""
    image, report = decoded.image, decoded.report
    lines = [f"{Path(report.name).name}: format {report.format}, shape {tuple(image.shape)}, dtype {image.dtype}",
             f"{report.bit_depth}-bit effective, {report.channels} channel(s), values {_range(image)}"]
    if report.pages > 1:
        lines.append(f"page {report.page_used + 1} of {report.pages} used")
    lines += [f"as_served: {note}" for note in report.served]
    lines += [f"problem [{p.code}] {p.message}" for p in report.problems]
    images = (ViewImage("image", "decoded image (display-stretched)", png_bytes(display(image, side))),
              ViewImage("histogram", f"histogram {_range(image)}", png_bytes(histogram_image(image))))
    return StageView("decode", "done", tuple(lines), images)


def preprocessed_view(tensor: torch.Tensor, side: int | None = DISPLAY_SIDE) -> StageView:
    """Model input (1, C, H, W): shape, dtype, per-channel mean/std and each channel as a picture
    (longest side at most half of ``side``; None: full size)."""
    array = tensor.detach().float().cpu().numpy()
    lines = [f"tensor {tuple(tensor.shape)} {tensor.dtype}, values {_range(array)}"]
    images = []
    for c in range(array.shape[1]):
        channel = array[0, c]
        lines.append(f"channel {c}: mean {float(channel.mean()):.3f}, std {float(channel.std()):.3f}")
        images.append(ViewImage(f"channel{c}", f"channel {c} (own stretch)", png_bytes(display(channel, None if side is None else side // 2))))
    if array.size and 0.0 <= array.min() and array.max() <= 1.0:
        lines.append("all values in [0, 1]: not mean/std normalised (the weights expect ImageNet statistics)")
    return StageView("preprocess", "done", tuple(lines), tuple(images))


def forward_view(output: torch.Tensor, sigmoid: str = "always", side: int | None = DISPLAY_SIDE) -> StageView:
    """Raw model output (1, 1, H, W): logit range, NaNs, and the probability heat map (model resolution)."""
    logits = output.detach().float().cpu().numpy()
    probability, applied = to_probability(output, sigmoid)
    lines = [f"output {tuple(output.shape)} {output.dtype}, logits {_range(logits, 3)}",
             f"sigmoid {'applied' if applied else 'NOT applied'} (rule {sigmoid!r}); probability {_range(probability, 3)}"]
    nans = int(np.count_nonzero(~np.isfinite(logits)))
    if nans:
        lines.append(f"{nans} non-finite value(s) in the output")
    image = ViewImage("heat_map", "probability (magma: dark 0, bright 1)", png_bytes(heat_map(fit(probability, side))))
    return StageView("forward", "done", tuple(lines), (image,))


def mask_view(post: Postprocessed, image: np.ndarray, truth: np.ndarray | None = None,
              side: int | None = DISPLAY_SIDE) -> StageView:
    """Mask over the image; with ground truth (H, W) the TP/FP/FN colours and the pixel IoU."""
    mask = post.mask
    lines = [f"mask {mask.shape}, threshold {post.threshold:.2f} (strict >), foreground {float(mask.mean()):.4f}",
             f"probability max {float(post.probability.max()):.3f}, sigmoid applied {post.sigmoid_applied}"]
    if truth is not None and np.shape(truth) != mask.shape:
        lines.append(f"ground truth {np.shape(truth)} does not match the mask {mask.shape}: not compared")
        truth = None
    if truth is not None:
        scores = pixel_scores(truth, mask)
        lines.append(f"pixel IoU {scores.iou:.3f} (TP {scores.tp}, FP {scores.fp}, FN {scores.fn} pixels)")
        lines.append("colours: green true positive, vermillion false positive, sky blue false negative")
    caption = "mask vs ground truth" if truth is not None else "predicted mask (orange)"
    small_truth = None if truth is None else fit(truth, side, nearest=True)
    picture = ViewImage("overlay", caption, png_bytes(overlay(fit(image, side), fit(mask, side, nearest=True), small_truth)))
    return StageView("postprocess", "done", tuple(lines), (picture,))


def polygons_view(polygons: list[dict[str, Any]], image: np.ndarray, side: int | None = DISPLAY_SIDE) -> StageView:
    """The service's polygons drawn on the image, their count and their JSON."""
    external = sum(p.get("type") == "external" for p in polygons)
    vertices = sum(int(p.get("vertices_count", len(p["points"]))) for p in polygons)
    lines = [f"{len(polygons)} polygon(s): {external} external, {len(polygons) - external} internal, {vertices} vertices"]
    if not polygons:
        lines.append("no polygons: the service answers with a warning; try a lower threshold or check the image")
    text = json.dumps(polygons, indent=1)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters)"
    picture = ViewImage("polygons", "polygons (yellow external, blue internal)", png_bytes(draw_polygons(image, polygons, side)))
    return StageView("polygons", "done", tuple(lines), (picture,), text)


def failure_view(stage: str, error: BaseException, input_summary: str | None) -> StageView:
    """A failed stage: the exception, the stage and a summary of the input that caused it."""
    lines = (f"{type(error).__name__}: {error}", f"input: {input_summary}")
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return StageView(stage, "failed", lines, (), details)


def pending_view(stage: str) -> StageView:
    """A stage that has not run yet."""
    return StageView(stage, "pending", ("not run yet: press Next or Run all",))


def stage_view(run: Any, stage: str, image: np.ndarray | None = None, truth: np.ndarray | None = None,
               side: int | None = DISPLAY_SIDE) -> StageView:
    """The view of stage ``stage`` of a :class:`~mlbench.Run`.

    ``image`` is the picture masks and polygons are drawn on (default: the decoded image);
    ``truth`` (H, W) the ground-truth labels, if known; ``side`` the longest side of the
    pictures in pixels (None: the image's own size).
    """
    record = run.records[stage]
    if record.status == "failed":
        return failure_view(stage, record.error, record.input_summary)
    if record.status != "done":
        return pending_view(stage)
    decoded = run.output("decode").image
    background = image if image is not None and np.shape(image)[:2] == decoded.shape[:2] else decoded
    if stage == "decode":
        return decoded_view(record.output, side)
    if stage == "preprocess":
        return preprocessed_view(record.output, side)
    if stage == "forward":
        return forward_view(record.output, run.options.sigmoid, side)
    if stage == "postprocess":
        return mask_view(record.output, background, truth, side)
    return polygons_view(record.output, background, side)
