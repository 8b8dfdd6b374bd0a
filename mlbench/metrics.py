"""How wrong is a mask: pixel scores and object matching (``mb.match_objects``).

Object matching follows the definitions the cell-segmentation community uses
(StarDist's ``stardist.matching.matching``, criterion IoU), re-implemented on a sparse
overlap so that thousands of objects stay fast:

* labels are made sequential (any ids, background 0 ignored); a bool mask is split into
  8-connected objects first;
* IoU of every overlapping (true, predicted) pair, as float32 ``inter / union``;
* one-to-one matching that maximises the number of pairs with IoU >= ``thresh`` and,
  among those, the sum of the IoUs of all assigned pairs (scores / (2 n) as tie-breaker);
* tp = pairs with IoU >= thresh, fp = n_pred - tp, fn = n_true - tp;
  precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn), accuracy tp/(tp+fp+fn)
  (the Data Science Bowl score), each 0 when tp = 0; mean_matched_score = sum of matched
  IoUs / tp; mean_true_score = that sum / n_true; panoptic_quality = that sum /
  (tp + fp/2 + fn/2).

Merged and split objects do not depend on the threshold: a predicted object *merges*
when it holds at least ``cover`` of the area of two or more true objects; a true object
is *split* when two or more predicted objects lie at least ``cover`` inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from mlbench.errors import OptionsError
from mlbench.findings import ReportText

__all__ = ["PixelScores", "pixel_scores", "Matching", "match_objects", "matching_curve", "to_labels"]


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den else empty


@dataclass(frozen=True, repr=False)
class PixelScores(ReportText):
    """Pixel-level agreement of a binary prediction with the truth.

    IoU and Dice are 1.0 when both masks are empty; precision is NaN when nothing is
    predicted and recall NaN when nothing is true (undefined, not zero).
    """

    iou: float
    dice: float
    precision: float
    recall: float
    tp: int
    fp: int
    fn: int

    def text(self) -> str:
        return (f"PixelScores(iou={self.iou:.4f}, dice={self.dice:.4f}, precision={self.precision:.4f}, "
                f"recall={self.recall:.4f}, tp={self.tp}, fp={self.fp}, fn={self.fn})")

    def to_dict(self) -> dict[str, Any]:
        return {"iou": self.iou, "dice": self.dice, "precision": self.precision, "recall": self.recall,
                "tp": self.tp, "fp": self.fp, "fn": self.fn}


def _check_pair(truth: np.ndarray, pred: np.ndarray) -> None:
    if truth.shape != pred.shape:
        raise OptionsError(f"truth has shape {truth.shape} but the prediction has {pred.shape}; "
                           "resize the prediction to the truth's size first (mb.segment does)")


def pixel_scores(truth: np.ndarray, pred: np.ndarray) -> PixelScores:
    """IoU, Dice, precision and recall of foreground pixels (non-zero is foreground).

    Parameters
    ----------
    truth, pred : (H, W) bool or label arrays of the same shape
    """
    truth, pred = np.asarray(truth) != 0, np.asarray(pred) != 0
    _check_pair(truth, pred)
    tp = int(np.count_nonzero(truth & pred))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(truth & ~pred))
    return PixelScores(iou=_ratio(tp, tp + fp + fn, 1.0), dice=_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
                       precision=_ratio(tp, tp + fp, float("nan")), recall=_ratio(tp, tp + fn, float("nan")),
                       tp=tp, fp=fp, fn=fn)


def to_labels(mask: np.ndarray, name: str = "labels") -> np.ndarray:
    """(H, W) bool -> 8-connected instance labels; integer labels are returned as int64.

    Raises
    ------
    OptionsError
        For float data or negative labels.
    """
    array = np.asarray(mask)
    if array.dtype == bool:
        import cv2

        return cv2.connectedComponents(array.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)[1].astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise OptionsError(f"{name} must be integer instance labels or a bool mask, got dtype {array.dtype}; "
                           "threshold a probability map first (probability > 0.5)")
    if array.size and array.min() < 0:
        raise OptionsError(f"{name} has negative labels (min {array.min()}); labels must be >= 0, 0 = background")
    return array.astype(np.int64, copy=False)


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels -> (sequential labels 0..n, original id of each new id)."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    ids = np.flatnonzero(np.bincount(flat, minlength=1)) if top <= 4 * flat.size else np.unique(flat)
    ids = ids[ids > 0]
    lut_ids = np.concatenate([[0], ids])
    if top <= 4 * flat.size:
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return lut[flat], lut_ids
    return np.searchsorted(lut_ids, flat), lut_ids


@dataclass(frozen=True)
class _Overlap:
    """Sparse overlap of sequential labels: pairs (t, p) >= 1, intersections, areas, IoU float32."""

    t: np.ndarray
    p: np.ndarray
    inter: np.ndarray
    area_t: np.ndarray
    area_p: np.ndarray
    iou: np.ndarray
    true_ids: np.ndarray
    pred_ids: np.ndarray


def _overlap(true_labels: np.ndarray, pred_labels: np.ndarray) -> _Overlap:
    t, true_ids = _sequential(true_labels)
    p, pred_ids = _sequential(pred_labels)
    n_t, n_p = len(true_ids) - 1, len(pred_ids) - 1
    both = (t > 0) & (p > 0)
    keys, inter = np.unique(t[both] * (n_p + 1) + p[both], return_counts=True)
    pt, pp = keys // (n_p + 1), keys % (n_p + 1)
    area_t = np.bincount(t, minlength=n_t + 1)
    area_p = np.bincount(p, minlength=n_p + 1)
    union = area_t[pt] + area_p[pp] - inter
    iou = (inter / union).astype(np.float32)
    return _Overlap(pt, pp, inter, area_t, area_p, iou, true_ids, pred_ids)


def _assign(ov: _Overlap, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the overlap pairs of the optimal one-to-one assignment (sparse, by component)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_t, n_p = len(ov.area_t) - 1, len(ov.area_p) - 1
    n_matched = min(n_t, n_p)
    if len(ov.t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes = n_t + n_p
    graph = coo_matrix((np.ones(len(ov.t)), (ov.t - 1, n_t + ov.p - 1)), shape=(nodes, nodes))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[ov.t - 1]
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    chosen = []
    for group in np.split(order, bounds):
        if len(group) == 1:
            chosen.append(group)
            continue
        rows, r_inv = np.unique(ov.t[group], return_inverse=True)
        cols, c_inv = np.unique(ov.p[group], return_inverse=True)
        scores = np.zeros((len(rows), len(cols)), np.float32)
        scores[r_inv, c_inv] = ov.iou[group]
        lookup = np.full(scores.shape, -1, np.int64)
        lookup[r_inv, c_inv] = group
        cost = -(scores >= thresh).astype(float) - scores / (2 * n_matched)
        ri, ci = linear_sum_assignment(cost)
        picked = lookup[ri, ci]
        chosen.append(picked[picked >= 0])
    idx = np.concatenate(chosen)
    idx = idx[np.argsort(ov.t[idx], kind="stable")]
    return idx, ov.iou[idx]


def _assign_dense(ov: _Overlap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """thresh == 0: every assigned pair counts, even without overlap (StarDist's convention)."""
    from scipy.optimize import linear_sum_assignment

    n_t, n_p = len(ov.area_t) - 1, len(ov.area_p) - 1
    scores = np.zeros((n_t, n_p), np.float32)
    scores[ov.t - 1, ov.p - 1] = ov.iou
    ri, ci = linear_sum_assignment(-scores)
    return ri + 1, ci + 1, scores[ri, ci]


def _matched(ov: _Overlap, thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true index, pred index, IoU) of the matched pairs, sorted by true index."""
    if thresh == 0 and min(len(ov.area_t), len(ov.area_p)) > 1:
        return _assign_dense(ov)
    idx, scores = _assign(ov, thresh)
    ok = scores >= thresh
    return ov.t[idx][ok], ov.p[idx][ok], scores[ok]


def _merges_splits(ov: _Overlap, cover: float) -> tuple[np.ndarray, np.ndarray]:
    """Sequential ids of merging predictions and of split true objects."""
    inside_pred = ov.inter >= cover * ov.area_t[ov.t]   # true object lies inside the prediction
    inside_true = ov.inter >= cover * ov.area_p[ov.p]   # prediction lies inside the true object
    merged = np.flatnonzero(np.bincount(ov.p[inside_pred], minlength=len(ov.area_p)) >= 2)
    split = np.flatnonzero(np.bincount(ov.t[inside_true], minlength=len(ov.area_t)) >= 2)
    return merged, split


def _best_partner(n: int, own: np.ndarray, other: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each object 1..n, the partner with the highest IoU (0 when none) and that IoU."""
    best_iou = np.zeros(n + 1, np.float32)
    best = np.zeros(n + 1, np.int64)
    order = np.lexsort((-iou, own))
    first = order[np.r_[True, own[order][1:] != own[order][:-1]]] if len(order) else order
    best[own[first]], best_iou[own[first]] = other[first], iou[first]
    return best, best_iou


def _object_table(ov: _Overlap, mt: np.ndarray, mp: np.ndarray, ms: np.ndarray,
                  merged: np.ndarray, split: np.ndarray) -> pd.DataFrame:
    n_t, n_p = len(ov.area_t) - 1, len(ov.area_p) - 1
    partner_t = np.zeros(n_t + 1, np.int64)
    partner_t[mt] = mp
    matched_p = np.zeros(n_p + 1, bool)
    matched_p[mp] = True
    best_p, best_iou_t = _best_partner(n_t, ov.t, ov.p, ov.iou)
    best_t, best_iou_p = _best_partner(n_p, ov.p, ov.t, ov.iou)
    score_t = np.zeros(n_t + 1, np.float32)
    score_t[mt] = ms
    merged_into = np.zeros(n_p + 1, bool)
    merged_into[merged] = True
    t = np.arange(1, n_t + 1)
    p_idx = np.where(partner_t[t] > 0, partner_t[t], best_p[t])
    true_rows = pd.DataFrame({
        "true_id": ov.true_ids[t], "pred_id": ov.pred_ids[p_idx],
        "status": np.where(partner_t[t] > 0, "matched", "missed"),
        "iou": np.where(partner_t[t] > 0, score_t[t], best_iou_t[t]).round(4),
        "true_area": ov.area_t[t], "pred_area": np.where(p_idx > 0, ov.area_p[p_idx], 0),
        "merged": merged_into[p_idx] & (p_idx > 0), "split": np.isin(t, split),
    })
    p = np.flatnonzero(~matched_p[1:]) + 1
    pred_rows = pd.DataFrame({
        "true_id": ov.true_ids[best_t[p]], "pred_id": ov.pred_ids[p], "status": "false_positive",
        "iou": best_iou_p[p].round(4), "true_area": np.where(best_t[p] > 0, ov.area_t[best_t[p]], 0),
        "pred_area": ov.area_p[p], "merged": merged_into[p], "split": False,
    })
    table = pd.concat([true_rows, pred_rows], ignore_index=True) if len(pred_rows) else true_rows
    return table.astype({"true_area": "int64", "pred_area": "int64", "merged": bool, "split": bool})


@dataclass(frozen=True, eq=False, repr=False)
class Matching(ReportText):
    """Object-level agreement at one IoU threshold (StarDist's ``matching`` definitions).

    Attributes
    ----------
    thresh, tp, fp, fn, n_true, n_pred, precision, recall, f1, accuracy,
    mean_true_score, mean_matched_score, panoptic_quality
        As defined in the module docstring; ``accuracy`` is tp / (tp + fp + fn).
    pairs : tuple of (true_id, pred_id, iou)
        The matched pairs in the caller's ids, sorted by true id.
    merged : tuple of int
        Predicted ids that each cover two or more true objects.
    split : tuple of int
        True ids covered by two or more predicted objects.
    objects : pandas.DataFrame
        One row per true object (its match, or its best-overlapping prediction when
        ``status == "missed"``) and one per unmatched prediction (``"false_positive"``):
        true_id, pred_id (0 = none), status, iou, true_area, pred_area, merged, split.
    """

    thresh: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    mean_true_score: float
    mean_matched_score: float
    panoptic_quality: float
    pairs: tuple = ()
    merged: tuple = ()
    split: tuple = ()
    objects: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    criterion: str = "iou"

    _SCALARS = ("thresh", "tp", "fp", "fn", "n_true", "n_pred", "precision", "recall", "f1", "accuracy",
                "mean_true_score", "mean_matched_score", "panoptic_quality")

    def text(self) -> str:
        return (f"Matching(thresh={self.thresh:g}: tp={self.tp}, fp={self.fp}, fn={self.fn}, "
                f"precision={self.precision:.4f}, recall={self.recall:.4f}, f1={self.f1:.4f}, "
                f"accuracy={self.accuracy:.4f}, mean_matched_iou={self.mean_matched_score:.4f}, "
                f"panoptic_quality={self.panoptic_quality:.4f}, merged={len(self.merged)}, split={len(self.split)})")

    def to_dict(self) -> dict[str, Any]:
        """Scalars plus pairs, merged and split (JSON-ready; the table is left out)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self._SCALARS}
        out.update(criterion=self.criterion, pairs=[list(p) for p in self.pairs],
                   merged=list(self.merged), split=list(self.split))
        return out


def _stats(ov: _Overlap, thresh: float, merged: np.ndarray, split: np.ndarray, table: bool) -> Matching:
    n_t, n_p = len(ov.area_t) - 1, len(ov.area_p) - 1
    mt, mp, ms = _matched(ov, thresh)
    tp = int(len(mt))
    fp, fn = n_p - tp, n_t - tp
    total = np.sum(ms) if tp else np.float32(0)  # float32; StarDist divides it by n_true in float32
    return Matching(
        thresh=float(thresh), tp=tp, fp=fp, fn=fn, n_true=n_t, n_pred=n_p,
        precision=tp / (tp + fp) if tp else 0.0, recall=tp / (tp + fn) if tp else 0.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp else 0.0, accuracy=tp / (tp + fp + fn) if tp else 0.0,
        mean_true_score=float(total / n_t) if n_t else 0.0,
        mean_matched_score=float(total) / tp if tp else 0.0,
        panoptic_quality=float(total) / (tp + fp / 2 + fn / 2) if tp else 0.0,
        pairs=tuple((int(ov.true_ids[a]), int(ov.pred_ids[b]), round(float(s), 4)) for a, b, s in zip(mt, mp, ms)),
        merged=tuple(int(i) for i in ov.pred_ids[merged]), split=tuple(int(i) for i in ov.true_ids[split]),
        objects=_object_table(ov, mt, mp, ms, merged, split) if table else pd.DataFrame(),
    )


def match_objects(true_labels: np.ndarray, pred_labels: np.ndarray, thresh: float | Sequence[float] = 0.5,
                  *, cover: float = 0.5, table: bool = True) -> Matching | tuple[Matching, ...]:
    """Match predicted objects to true objects one-to-one by IoU.

    Parameters
    ----------
    true_labels, pred_labels : (H, W) integer instance labels (0 = background, any ids)
        or bool masks (split into 8-connected objects).
    thresh : float in [0, 1] or sequence of floats
        IoU a matched pair must reach (>=). A sequence gives one Matching per threshold,
        computed from one overlap.
    cover : float
        Fraction of an object's area that decides merged / split objects.
    table : bool
        Build the per-object table (``Matching.objects``).

    Returns
    -------
    Matching, or a tuple of Matching when ``thresh`` is a sequence.

    Raises
    ------
    OptionsError
        For different shapes, float or negative labels, or a threshold outside [0, 1].

    Examples
    --------
    One object found (shifted by a row), one missed:

    >>> truth = np.zeros((64, 64), int); truth[5:20, 5:20] = 1; truth[30:50, 30:50] = 2
    >>> pred = np.zeros((64, 64), int); pred[6:21, 5:20] = 1
    >>> m = match_objects(truth, pred)
    >>> m.tp, m.fp, m.fn, m.precision, m.recall
    (1, 0, 1, 1.0, 0.5)
    """
    many = not np.isscalar(thresh)
    thresholds = [float(t) for t in (thresh if many else [thresh])]
    bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
    if bad:
        raise OptionsError(f"thresh must lie in [0, 1], got {bad}; IoU thresholds such as 0.5 are usual")
    truth, pred = to_labels(true_labels, "true_labels"), to_labels(pred_labels, "pred_labels")
    _check_pair(truth, pred)
    ov = _overlap(truth, pred)
    merged, split = _merges_splits(ov, cover)
    results = tuple(_stats(ov, t, merged, split, table) for t in thresholds)
    return results if many else results[0]


def matching_curve(true_labels: np.ndarray, pred_labels: np.ndarray,
                   thresholds: Sequence[float] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)) -> pd.DataFrame:
    """One row per IoU threshold: tp, fp, fn, precision, recall, f1, accuracy, mean IoU, PQ."""
    results = match_objects(true_labels, pred_labels, tuple(thresholds), table=False)
    return pd.DataFrame([{k: getattr(m, k) for k in Matching._SCALARS} for m in results]).round(4)
