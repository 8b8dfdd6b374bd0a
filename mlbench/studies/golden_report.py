"""What moved between a golden file and a new run: the per-image differences behind ``golden check``.

For each image :func:`compare_image` follows the pipeline: did the file change, did decoding
give other pixels, did pre-processing give another model input (sha256 of each), how far did
the logits move (compared in float16, as stored), how much do the masks still overlap (IoU),
and did the polygon count change. :class:`Tolerance` decides what counts as a move; a changed
hash alone is reported but is not a move (a resize that rounds one pixel differently may leave
every output within tolerance). :class:`GoldenReport` is the whole answer, with what changed in
the environment, the model and the options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.metrics import pixel_scores

__all__ = ["Tolerance", "ImageDiff", "GoldenReport", "compare_image", "diff_values", "ATOL", "RTOL", "MIN_IOU",
           "MAX_POLYGON_DELTA"]

ATOL, RTOL = 0.02, 0.01
"""Logits move when ``|new - golden| > ATOL + RTOL * |golden|`` at any pixel, both rounded to float16
(float16 keeps about 3 decimal digits: one step is 0.008 for a logit of 10, so a run on another CPU
that rounds differently stays inside, a changed decoder or weight does not)."""
MIN_IOU = 0.99
"""Masks move when their IoU falls below this (1.0 when both are empty)."""
MAX_POLYGON_DELTA = 0
"""The polygon count moves when it changes by more than this (the symptom the service showed: 303 -> 76)."""

INPUT_STEPS = (("file_sha256", "file changed"), ("decoded_sha256", "decode moved"), ("input_sha256", "preprocess moved"))
"""The hashes compared in pipeline order; the first that differs names where the input moved."""


@dataclass(frozen=True)
class Tolerance:
    """When a difference counts as a move (see :data:`ATOL`, :data:`MIN_IOU`, :data:`MAX_POLYGON_DELTA`).

    Raises
    ------
    OptionsError
        A negative tolerance, or ``min_iou`` outside 0..1.
    """

    atol: float = ATOL
    rtol: float = RTOL
    min_iou: float = MIN_IOU
    max_polygon_delta: int = MAX_POLYGON_DELTA

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v))}
        if bad or self.min_iou > 1:
            raise OptionsError(f"tolerance {bad or {'min_iou': self.min_iou}} is not allowed: atol, rtol and "
                               "max_polygon_delta must be finite numbers >= 0 and min_iou within 0..1; e.g. atol=0.05, "
                               "min_iou=0.98")

    def text(self) -> str:
        return (f"logits |new - golden| <= {self.atol:g} + {self.rtol:g}*|golden| (float16), mask IoU >= "
                f"{self.min_iou:g}, polygon count within +-{self.max_polygon_delta}")


@dataclass(frozen=True)
class ImageDiff:
    """One image: what moved and by how much.

    ``input`` is ``same``, ``file changed``, ``decode moved`` or ``preprocess moved`` (the first
    hash that differs; hashes both runs stopped before count as the same), or ``not compared`` when
    only one run reached a step; ``max_logit_diff`` is
    ``inf`` for logits of another shape; ``reasons`` say why the image counts as moved (empty when
    it did not), ``notes`` what changed within tolerance.
    """

    name: str
    input: str
    max_logit_diff: float | None
    mask_iou: float | None
    polygons: tuple[int | None, int | None]
    status: tuple[str, str]
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def moved(self) -> bool:
        return bool(self.reasons)

    @property
    def verdict(self) -> str:
        """``MOVED``, ``same`` (every hash and output identical) or ``within tolerance``."""
        if self.moved:
            return "MOVED"
        identical = (self.input == "same" and self.max_logit_diff in (0.0, None) and self.mask_iou in (1.0, None)
                     and self.polygons[0] == self.polygons[1] and not self.notes)
        return "same" if identical else "within tolerance"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["polygons"], out["status"] = list(self.polygons), list(self.status)
        out["reasons"], out["notes"] = list(self.reasons), list(self.notes)
        if out["max_logit_diff"] is not None and not math.isfinite(out["max_logit_diff"]):
            out["max_logit_diff"] = str(out["max_logit_diff"])  # JSON has no inf
        return out | {"moved": self.moved, "verdict": self.verdict}


def _state(entry: Mapping[str, Any]) -> str:
    if entry.get("status") == "ok":
        return "ok"
    return f"failed at {entry.get('stage')}: {entry.get('error', '')}"


def _input_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    for key, label in INPUT_STEPS:
        if key not in old and key not in new:  # both runs stopped before this step
            break
        if key not in old or key not in new:
            return "not compared"
        if old[key] != new[key]:
            return label
    return "same"


def _logits(old: np.ndarray, new: np.ndarray, tol: Tolerance, reasons: list[str]) -> float:
    """The largest |difference| of two float16 logit arrays (NaN against NaN counts as equal)."""
    if old.shape != new.shape:
        reasons.append(f"logits shape {tuple(old.shape)} -> {tuple(new.shape)}")
        return math.inf
    a, b = old.astype(np.float32), new.astype(np.float32)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
    over = int(np.count_nonzero(diff > tol.atol + tol.rtol * np.nan_to_num(np.abs(a), nan=0.0)))
    largest = float(diff.max()) if diff.size else 0.0
    if over:
        reasons.append(f"logits moved: max |diff| {largest:.4g}, {over} of {diff.size} value(s) beyond tolerance")
    return largest


def _mask(old: np.ndarray, new: np.ndarray, tol: Tolerance, reasons: list[str]) -> float:
    if old.shape != new.shape:
        reasons.append(f"mask shape {old.shape} -> {new.shape}")
        return 0.0
    iou = pixel_scores(old, new).iou
    if iou < tol.min_iou:
        reasons.append(f"mask IoU {iou:.4f} < {tol.min_iou:g}")
    return iou


def compare_image(name: str, old: Mapping[str, Any], old_arrays: Mapping[str, np.ndarray], new: Mapping[str, Any],
                  new_arrays: Mapping[str, np.ndarray], tolerance: Tolerance) -> ImageDiff:
    """Compare one image's golden record (``old``: hashes, status, polygon count; ``old_arrays``: ``logits``
    float16 and ``mask`` bool) with a new run of it."""
    reasons: list[str] = []
    notes: list[str] = []
    before, after = _state(old), _state(new)
    if before != after:
        same_stage = old.get("status") == new.get("status") == "failed" and old.get("stage") == new.get("stage")
        (notes if same_stage else reasons).append(f"was {before}; now {after}")
    where = _input_change(old, new)
    if where not in ("same", "not compared"):
        notes.append(f"{where} (sha256 differs)")
    largest = _logits(old_arrays["logits"], new_arrays["logits"], tolerance, reasons) \
        if "logits" in old_arrays and "logits" in new_arrays else None
    iou = _mask(old_arrays["mask"], new_arrays["mask"], tolerance, reasons) \
        if "mask" in old_arrays and "mask" in new_arrays else None
    counts = (old.get("n_polygons"), new.get("n_polygons"))
    if None not in counts and abs(counts[1] - counts[0]) > tolerance.max_polygon_delta:
        reasons.append(f"polygon count {counts[0]} -> {counts[1]}")
    return ImageDiff(name, where, largest, iou, counts, (str(old.get("status")), str(new.get("status"))),
                     tuple(reasons), tuple(notes))


def diff_values(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs, nested mappings flattened to ``a.b`` keys: ``{key: (old, new)}``.

    >>> diff_values({"python": "3.11", "packages": {"numpy": "2.3", "torch": "2.13"}},
    ...             {"python": "3.11", "packages": {"numpy": "2.4", "torch": "2.13"}})
    {'packages.numpy': ('2.3', '2.4')}
    """
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.update(diff_values(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True, repr=False)
class GoldenReport(ReportText):
    """What ``golden check`` found: one :class:`ImageDiff` per recorded image, and what changed around them.

    ``ok`` is True when no image moved beyond the tolerance. ``environment_diff``, ``model_diff``
    and ``options_diff`` map each changed key to ``(golden, now)``; ``environment`` is the one
    the check ran in. ``text()`` (also ``str`` and ``repr``) is a table; ``to_dict()`` the JSON.
    """

    golden: str
    model: str
    tolerance: Tolerance
    images: tuple[ImageDiff, ...]
    environment: dict
    environment_diff: dict
    model_diff: dict
    options_diff: dict

    @property
    def ok(self) -> bool:
        return not any(d.moved for d in self.images)

    @property
    def moved(self) -> list[str]:
        """Names of the images that moved beyond the tolerance."""
        return [d.name for d in self.images if d.moved]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "golden": self.golden, "model": self.model, "moved": self.moved,
                "tolerance": asdict(self.tolerance), "images": [d.to_dict() for d in self.images],
                "environment": self.environment, **{name: {k: list(v) for k, v in getattr(self, name).items()}
                                                    for name in ("environment_diff", "model_diff", "options_diff")}}

    def _rows(self) -> list[tuple[str, ...]]:
        return [(d.name, d.input, _number(d.max_logit_diff, ".4g"), _number(d.mask_iou, ".4f"),
                 f"{_number(d.polygons[0], 'd')} -> {_number(d.polygons[1], 'd')}", d.verdict) for d in self.images]

    def _changes(self) -> list[tuple[str, str]]:
        return [(what, f"{key} {_short(a)} -> {_short(b)}") for what, diff in
                (("environment", self.environment_diff), ("model", self.model_diff), ("options", self.options_diff))
                for key, (a, b) in diff.items()]

    def text(self) -> str:
        head = "OK: every image within tolerance" if self.ok else \
            f"MOVED: {len(self.moved)} of {len(self.images)} image(s) beyond tolerance"
        header = ("image", "input", "max|dlogit|", "mask IoU", "polygons", "verdict")
        rows = [header, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"GoldenReport({self.model}, {Path(self.golden).name}): {head}", f"tolerance: {self.tolerance.text()}"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"  {d.name}: " + "; ".join(d.reasons + d.notes) for d in self.images if d.reasons or d.notes]
        changes = self._changes()
        lines += [f"{what}: {change}" for what, change in changes] or ["environment, model and options: unchanged"]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        header = ("image", "input", "max|dlogit|", "mask IoU", "polygons", "verdict")
        why = [(d.name, "; ".join(d.reasons + d.notes)) for d in self.images if d.reasons or d.notes]
        title = f"GoldenReport {self.model}: " + ("OK" if self.ok else f"MOVED ({len(self.moved)} image(s))")
        return self._html(title, (header, self._rows()), (("image", "what moved"), why),
                          (("what", "change"), self._changes()))
