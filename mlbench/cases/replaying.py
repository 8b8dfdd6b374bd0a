"""Replaying a case within the budgets, and comparing the new outcome with the recorded one.

A case's image and options choose how much work its replay does: an image of 64 megapixels with
``resize="none"``, or an ``input_size`` edited to 8192, would make the forward pass allocate tens
of gigabytes. Before the forward runs, :func:`run_within_budgets` checks the image header against
the image budgets, decodes, works out the model input the options ask for (the pipeline's own
geometry), refuses one larger than ``max_decoded_bytes`` and predicts the forward's peak memory on
the ``meta`` device (:func:`mlbench.estimate_memory`, nothing allocated), refused above
``max_replay_bytes``. A forward that fails for that shape (the case's error, often) is predicted
at the next shape the model accepts, which needs at least as much; a model that cannot be run on
``meta`` at all is bounded by its input size only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlbench.budgets import Budgets, budget_error
from mlbench.cases.bundle import CaseError
from mlbench.errors import ImageError, ModelError
from mlbench.findings import ReportText, format_bytes
from mlbench.pipeline.run import Run

__all__ = ["Replay", "run_within_budgets", "differences"]

_PEAKS: dict[tuple, int | None] = {}
"""Predicted peaks by (architecture: class and tensor shapes, input shape); the values do not matter."""
_CACHED = 256


@dataclass(frozen=True, repr=False)
class Replay(ReportText):
    """A case replayed: the new run and how its outcome compares with the recorded one."""

    run: Run
    recorded: dict
    observed: dict
    differences: tuple = ()

    @property
    def same(self) -> bool:
        return not self.differences

    def text(self) -> str:
        head = "replay: SAME outcome as recorded" if self.same else "replay: DIFFERENT outcome"
        status = f"({self.observed['status']}" + (f" at {self.observed['failed_stage']}" if self.observed.get("failed_stage") else "") + ")"
        return "\n".join([f"{head} {status}"] + [f"  differs: {d}" for d in self.differences])


def run_within_budgets(run: Run, image: bytes | None, where: str, limits: Budgets) -> Run:
    """Run ``run`` to its end once its image, model input and predicted forward memory are within ``limits``.

    Parameters
    ----------
    run : Run
        A fresh run of the case (nothing executed).
    image : bytes or None
        The image file's bytes (None for an array source, checked when it was read).
    where : str
        The case, for messages.

    Raises
    ------
    CaseError
        Naming the budget (``max_pixels``, ``max_decoded_bytes``, ``max_replay_bytes``) and how to raise it.
    """
    if image is not None:
        _check_header(image, where, limits)
    run.run_until("decode")
    if run.records["decode"].status == "done":
        _check_forward(run, where, limits)
    return run.run()


def _check_header(data: bytes, where: str, limits: Budgets) -> None:
    from mlbench.image.formats import check_header, read_header, sniff_format

    header = read_header(data, sniff_format(data[:16]) or "")
    if header is not None:
        try:
            check_header(f"case {where}: the image", header, limits)
        except ImageError as exc:
            raise CaseError(f"{exc}; not replayed (load_case(path, replay=False) reads the case without running it)") from None


def _input_shape(run: Run) -> tuple[int, int, int]:
    """(C, H, W) of the model input the run's preprocess will make."""
    from mlbench.pipeline.preprocess import input_geometry

    image, options, card = run.output("decode").image, run.options, run.pipeline.card
    if options.decoder == "pil":  # the service's path: a Lanczos stretch, or the image as it is
        side = options.input_size
        height, width = (side, side) if options.resize == "stretch" else image.shape[:2]
        return (1 if image.ndim == 2 else image.shape[2], height, width)
    return (card.channels, *input_geometry(image.shape[:2], options, card).input_hw)


def _check_forward(run: Run, where: str, limits: Budgets) -> None:
    shape = _input_shape(run)
    nbytes = int(np.prod(shape, dtype=np.int64)) * 4
    again = "; not replayed (load_case(path, replay=False) reads the case without running it)"
    if nbytes > limits.max_decoded_bytes:
        raise budget_error(CaseError, "max_decoded_bytes", limits.max_decoded_bytes,
                           f"case {where}: the model input its options ask for ({shape[1]}x{shape[2]} x {shape[0]} "
                           f"channel(s) x 4 bytes){again}", nbytes, " bytes")
    peak = predicted_peak(run.pipeline.model, shape, run.pipeline.card)
    if peak is not None and peak > limits.max_replay_bytes:
        raise budget_error(CaseError, "max_replay_bytes", limits.max_replay_bytes,
                           f"case {where}: the forward pass of {run.pipeline.model_name} on {shape[1]}x{shape[2]} "
                           f"would need about {format_bytes(peak)} (predicted on the meta device){again}", peak, " bytes")


def predicted_peak(model: torch.nn.Module, shape: tuple[int, int, int], card: Any) -> int | None:
    """The forward's predicted peak bytes for a (C, H, W) input, cached per architecture; when the
    forward fails for that shape, the peak at the next shape the model accepts; None when neither
    runs on ``meta``."""
    from mlbench.probes.estimate import estimate_memory

    key = (type(model).__qualname__, shape,
           tuple((k, tuple(t.shape), t.dtype) for k, t in model.state_dict().items()))
    if key not in _PEAKS:
        multiple, least = max(1, card.input_multiple), max(1, card.min_input_size)
        rounded = (shape[0], *(max(least, -(-side // multiple) * multiple) for side in shape[1:]))
        peak = None
        for candidate in dict.fromkeys([shape, rounded]):
            try:
                peak = estimate_memory(model, candidate, device="cpu").peak_bytes
                break
            except ModelError:
                continue
        if len(_PEAKS) >= _CACHED:
            _PEAKS.pop(next(iter(_PEAKS)))
        _PEAKS[key] = peak
    return _PEAKS[key]


def differences(recorded: dict, observed: dict, run: Run, recorded_mask: np.ndarray | None) -> list[str]:
    """What differs between the recorded and the replayed outcome (status, stage, error, polygons, mask)."""
    out = [f"{key}: recorded {recorded.get(key)!r}, now {observed.get(key)!r}"
           for key in ("status", "failed_stage", "error_type", "polygons") if recorded.get(key) != observed.get(key)]
    if recorded.get("error_message") != observed.get("error_message") and not out:
        out.append(f"error message: recorded {recorded.get('error_message')!r}, now {observed.get('error_message')!r}")
    if recorded_mask is not None and run.done:
        mask = np.asarray(run.output("postprocess").mask, dtype=bool)
        if mask.shape != recorded_mask.shape:
            out.append(f"mask shape: recorded {recorded_mask.shape}, now {mask.shape}")
        elif (changed := int((mask != recorded_mask).sum())) > 0:
            out.append(f"mask: {changed} pixel(s) differ ({changed / mask.size:.2%})")
    return out
