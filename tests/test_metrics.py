"""Pixel scores and object matching: known answers, edge cases, speed, and agreement with StarDist."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mlbench as mb
from mlbench.metrics import match_objects, matching_curve, pixel_scores, to_labels

SCALARS = ("tp", "fp", "fn", "n_true", "n_pred", "precision", "recall", "f1", "accuracy",
           "mean_true_score", "mean_matched_score", "panoptic_quality")


def square(shape=(40, 40), top=10, left=10, size=10, label=1, out=None):
    labels = np.zeros(shape, np.int32) if out is None else out
    labels[top:top + size, left:left + size] = label
    return labels


def strip(*spans):
    """(1, 30) labels: spans of (start, stop, label) along one row."""
    labels = np.zeros((1, 30), np.int32)
    for start, stop, label in spans:
        labels[0, start:stop] = label
    return labels


def test_shifted_square_is_missed_like_stardists_docstring():
    truth = square(shape=(100, 100))
    m = match_objects(truth, np.roll(truth, 5, axis=0))
    assert (m.tp, m.fp, m.fn) == (0, 1, 1)
    assert m.precision == m.recall == m.f1 == m.accuracy == m.panoptic_quality == 0.0


def test_known_iou_two_thirds_at_two_thresholds():
    truth = square()
    pred = np.roll(truth, 2, axis=0)  # inter 80, union 120
    low, high = match_objects(truth, pred, thresh=(0.5, 0.7))
    assert (low.tp, low.fp, low.fn) == (1, 0, 0) and low.accuracy == 1.0
    assert low.mean_matched_score == pytest.approx(2 / 3, abs=1e-6)
    assert low.panoptic_quality == pytest.approx(2 / 3, abs=1e-6)
    assert (high.tp, high.fp, high.fn) == (0, 1, 1)
    assert low.pairs == ((1, 1, 0.6667),)


def test_non_consecutive_ids_are_reported_as_given():
    truth = square(label=3)
    square(top=25, left=25, label=40, out=truth)
    pred = square(label=1000)
    square(top=25, left=26, label=7, out=pred)
    m = match_objects(truth, pred)
    assert m.pairs == ((3, 1000, 1.0), (40, 7, 0.8182))
    assert list(m.objects["true_id"]) == [3, 40]


def test_optimal_not_greedy_assignment_at_low_threshold():
    truth = strip((0, 10, 1), (10, 20, 2))
    pred = strip((4, 14, 1), (0, 4, 2))  # A-P1 0.4286, A-P2 0.4, B-P1 0.25
    m = match_objects(truth, pred, thresh=0.2)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)  # greedy by best IoU would find only 1
    assert m.mean_matched_score == pytest.approx((0.4 + 0.25) / 2, abs=1e-6)
    assert m.pairs == ((1, 2, 0.4), (2, 1, 0.25))


def test_merge_and_split_are_found():
    truth = strip((0, 10, 1), (10, 20, 2))
    merged = match_objects(truth, strip((0, 20, 5)))
    assert merged.merged == (5,) and merged.split == ()
    assert (merged.tp, merged.fn) == (1, 1)  # IoU exactly 0.5 with each: one of them matches
    split = match_objects(strip((0, 20, 1)), strip((0, 10, 1), (10, 20, 2)))
    assert split.split == (1,) and split.merged == ()
    assert bool(split.objects["split"].iloc[0])


def test_empty_images_and_background_only():
    empty = np.zeros((16, 16), np.uint16)
    both = match_objects(empty, empty)
    assert (both.tp, both.fp, both.fn, both.n_true, both.n_pred) == (0, 0, 0, 0, 0) and both.f1 == 0.0
    missed = match_objects(square(shape=(16, 16), top=2, left=2, size=5), empty)
    assert (missed.fn, missed.fp) == (1, 0) and list(missed.objects["status"]) == ["missed"]
    extra = match_objects(empty, square(shape=(16, 16), top=2, left=2, size=5))
    assert (extra.fn, extra.fp) == (0, 1) and list(extra.objects["status"]) == ["false_positive"]


def test_bool_masks_are_split_into_connected_objects():
    truth = square(label=1)
    square(top=25, left=25, label=2, out=truth)
    m = match_objects(truth, truth > 0)
    assert (m.tp, m.n_pred) == (2, 2)
    assert to_labels(np.array([[True, False, True]])).max() == 2


def test_inputs_are_not_modified_and_repr_is_stable():
    truth = square(label=9)
    pred = np.roll(truth, 1, axis=1)
    before = (truth.copy(), pred.copy())
    m = match_objects(truth, pred)
    assert np.array_equal(truth, before[0]) and np.array_equal(pred, before[1])
    assert repr(m) == ("Matching(thresh=0.5: tp=1, fp=0, fn=0, precision=1.0000, recall=1.0000, f1=1.0000, "
                       "accuracy=1.0000, mean_matched_iou=0.8182, panoptic_quality=0.8182, merged=0, split=0)")
    assert m.to_dict()["pairs"] == [[9, 9, 0.8182]]


def test_missed_object_names_its_best_partner():
    truth = square()
    m = match_objects(truth, np.roll(truth, 5, axis=0).astype(np.int32) * 4)
    row = m.objects.iloc[0]
    assert (row["status"], row["pred_id"], row["iou"]) == ("missed", 4, pytest.approx(1 / 3, abs=1e-4))


def test_matching_curve_has_one_row_per_threshold():
    truth = square()
    curve = matching_curve(truth, np.roll(truth, 2, axis=0), thresholds=(0.5, 0.6, 0.7))
    assert list(curve["thresh"]) == [0.5, 0.6, 0.7] and list(curve["tp"]) == [1, 1, 0]


def test_bad_arguments_raise():
    with pytest.raises(mb.OptionsError, match=r"truth has shape \(4, 4\) but the prediction has \(4, 5\)"):
        match_objects(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(mb.OptionsError, match="pred_labels must be integer instance labels or a bool mask, got dtype float32"):
        match_objects(np.zeros((4, 4), int), np.zeros((4, 4), np.float32))
    with pytest.raises(mb.OptionsError, match=r"true_labels has negative labels \(min -1\)"):
        match_objects(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(mb.OptionsError, match=r"thresh must lie in \[0, 1\], got \[1.5\]"):
        match_objects(np.zeros((4, 4), int), np.zeros((4, 4), int), thresh=(0.5, 1.5))
    with pytest.raises(mb.OptionsError, match="truth has shape"):
        pixel_scores(np.zeros((4, 4)), np.zeros((5, 4)))


def test_pixel_scores_known_answer_and_empty_conventions():
    truth = square()  # 100 px
    scores = pixel_scores(truth, np.roll(truth, 2, axis=0))  # 80 shared
    assert (scores.tp, scores.fp, scores.fn) == (80, 20, 20)
    assert scores.iou == pytest.approx(80 / 120) and scores.dice == pytest.approx(0.8)
    assert scores.precision == scores.recall == pytest.approx(0.8)
    empty = pixel_scores(np.zeros((3, 3)), np.zeros((3, 3)))
    assert empty.iou == empty.dice == 1.0 and math.isnan(empty.precision) and math.isnan(empty.recall)


def test_thousand_objects_are_fast():
    truth = np.zeros((1024, 1024), np.int32)
    for k in range(1000):
        r, c = divmod(k, 32)
        truth[r * 32 + 2:r * 32 + 28, c * 32 + 2:c * 32 + 28] = k + 1
    pred = np.roll(truth, 3, axis=1)
    started = time.perf_counter()
    m = match_objects(truth, pred, thresh=(0.5, 0.9))
    assert time.perf_counter() - started < 10.0
    assert (m[0].tp, m[1].tp) == (1000, 0)


# --- agreement with stardist.matching.matching, imported straight from the wheel -------------------------

def _stardist_wheel() -> Path | None:
    given = os.environ.get("MLBENCH_STARDIST_WHEEL")
    if given:
        return Path(given)
    cache = Path.home() / ".cache" / "mlbench" / "wheels"
    found = sorted(cache.glob("stardist-0.9.2-*.whl"))
    if found:
        return found[0]
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "stardist==0.9.2", "-d", str(cache)],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError):
        return None
    found = sorted(cache.glob("stardist-0.9.2-*.whl"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def stardist_matching():
    """stardist/matching.py executed from the wheel, with its hard imports (numba, tqdm, csbdeep) stubbed.

    The stubs only replace a JIT decorator, a progress bar and a raise helper; the
    definitions under test (overlap, IoU, assignment, statistics) run as published.
    """
    pytest.importorskip("scipy")
    wheel = _stardist_wheel()
    if wheel is None or not wheel.exists():
        pytest.skip("stardist 0.9.2 wheel unavailable (set MLBENCH_STARDIST_WHEEL or allow pip download)")
    numba = types.ModuleType("numba")
    numba.jit = lambda *args, **kwargs: (lambda fn: fn)
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = lambda iterable=None, **kwargs: iterable
    csbdeep, utils = types.ModuleType("csbdeep"), types.ModuleType("csbdeep.utils")

    def _raise(error):
        raise error

    utils._raise, csbdeep.utils = _raise, utils
    module = types.ModuleType("stardist_matching_from_wheel")
    with pytest.MonkeyPatch.context() as mp:
        for name, stub in {"numba": numba, "tqdm": tqdm, "csbdeep": csbdeep, "csbdeep.utils": utils}.items():
            mp.setitem(sys.modules, name, stub)
        source = zipfile.ZipFile(wheel).read("stardist/matching.py").decode()
        exec(compile(source, "stardist/matching.py", "exec"), module.__dict__)
    return module


def _predictions(truth: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    ids = np.unique(truth)[1:]
    shifted = np.roll(truth, (2, -3), axis=(0, 1))
    dropped = np.where(np.isin(shifted, rng.choice(ids, 8, replace=False)), 0, shifted)
    lut = np.zeros(truth.max() + 1, np.int64)
    lut[ids] = rng.permutation(len(ids)) * 3 + 5
    merged = np.where(dropped > 0, lut[dropped] // 7 + 1, 0)
    return [shifted, lut[dropped], merged, np.zeros_like(truth)]


def test_agrees_exactly_with_stardist(stardist_matching):
    truth = mb.load_sample("nuclei_stardist").mask[:192, :192]
    thresholds = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    cases = [(truth, p) for p in _predictions(truth, np.random.default_rng(0))]
    cases.append((np.zeros_like(truth), truth))
    for y_true, y_pred in cases:
        theirs = stardist_matching.matching(y_true, y_pred, thresh=thresholds)
        ours = match_objects(y_true, y_pred, thresh=thresholds, table=False)
        for a, b in zip(theirs, ours):
            for name in SCALARS:
                assert float(getattr(a, name)) == float(getattr(b, name)), (name, a.thresh)


def test_huge_label_ids_take_the_sparse_path():
    truth = square(label=2_000_000_000).astype(np.int64)
    pred = square(label=7).astype(np.uint32)
    m = match_objects(truth, pred)
    assert m.pairs == ((2_000_000_000, 7, 1.0),) and m.objects["true_id"].tolist() == [2_000_000_000]
