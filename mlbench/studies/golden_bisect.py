"""``golden bisect``: which version of one package first moved the outputs a golden file recorded?

Each version is tested in a throw-away environment that differs from this one in that package
only (:class:`~mlbench.studies.golden_envs.ThrowawayEnv`), where ``python -m mlbench golden check
GOLDEN --json`` runs as a subprocess. A binary search over the versions between the bounds (both
bounds tested first) names the first version whose outputs move beyond the tolerance. A version
that cannot be installed or checked is skipped, as ``git bisect skip`` does, and named. Each
environment is deleted as soon as its check is done.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.studies.golden import load_golden
from mlbench.studies.golden_envs import EnvFailure, ThrowawayEnv, list_versions
from mlbench.studies.golden_report import ATOL, MAX_POLYGON_DELTA, MIN_IOU, RTOL, Tolerance

__all__ = ["golden_bisect", "BisectReport", "VersionResult"]


@dataclass(frozen=True)
class VersionResult:
    """One tested version: ``verdict`` is ``same`` (within tolerance), ``moved`` or ``error`` (not testable)."""

    version: str
    verdict: str
    summary: str
    seconds: float
    report: dict | None = None


def _summary(report: dict[str, Any]) -> str:
    images = report["images"]
    moved = [i for i in images if i["moved"]]
    diffs = [float(i["max_logit_diff"]) for i in images if i["max_logit_diff"] is not None]
    ious = [i["mask_iou"] for i in images if i["mask_iou"] is not None]
    counts = [f"{a} -> {b}" for a, b in (i["polygons"] for i in moved) if a != b]
    parts = [f"{len(moved)}/{len(images)} image(s) moved"]
    parts += [f"max |dlogit| {max(diffs):.4g}"] if diffs else []
    parts += [f"min IoU {min(ious):.4f}"] if ious else []
    parts += [f"polygons {', '.join(counts[:3])}"] if counts else []
    return ", ".join(parts)


@dataclass(frozen=True, repr=False)
class BisectReport(ReportText):
    """What :func:`golden_bisect` found. ``first_moved`` is the first version whose outputs move (None when
    none could be named); ``found`` is True when it is certain (no untested version just before it)."""

    golden: str
    package: str
    versions: tuple[str, ...]
    results: tuple[VersionResult, ...]
    first_moved: str | None
    last_same: str | None
    untested: tuple[str, ...]
    conclusion: str

    @property
    def found(self) -> bool:
        return self.first_moved is not None and not self.untested

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "found": self.found}

    def text(self) -> str:
        lines = [f"BisectReport({self.package}, {Path(self.golden).name}): {self.conclusion}",
                 f"  {len(self.results)} of {len(self.versions)} version(s) tested "
                 f"({self.versions[0]} .. {self.versions[-1]})"]
        order = {v: i for i, v in enumerate(self.versions)}
        for r in sorted(self.results, key=lambda r: order[r.version]):
            lines.append(f"  {r.version:<14} {r.verdict.upper() if r.verdict == 'moved' else r.verdict:<6} "
                         f"{r.seconds:6.1f} s  {r.summary}")
        return "\n".join(lines)


def _most_steps(n: int) -> int:
    return n if n <= 2 else 2 + math.ceil(math.log2(n - 1))


def golden_bisect(golden: str | os.PathLike, package: str, lower: str | None = None, upper: str | None = None, *,
                  versions: Sequence[str] | None = None, find_links: str | os.PathLike | None = None,
                  installer: str = "auto", atol: float = ATOL, rtol: float = RTOL, min_iou: float = MIN_IOU,
                  max_polygon_delta: int = MAX_POLYGON_DELTA, progress: bool = True, timeout: float = 1800) -> BisectReport:
    """Find the first version of ``package`` between ``lower`` and ``upper`` whose outputs move from ``golden``.

    Parameters
    ----------
    golden : a golden file (:func:`mlbench.golden_record`), recorded where the outputs were right.
    package : the distribution to vary (``opencv-python-headless``, ``pillow``, ``torch``, ...).
    lower, upper : the bounds, both included; ``lower`` is expected to keep the outputs, ``upper`` to move them.
    versions : the versions to consider (default: what the package index offers between the bounds).
    find_links : a folder of wheels to install from instead of any index (also lists its versions).
    installer : ``auto`` (uv when on the PATH, else pip), ``pip`` or ``uv``.
    atol, rtol, min_iou, max_polygon_delta : the tolerance of each check (:class:`Tolerance`).
    progress : a ``tqdm.auto`` bar and one line per tested version on stderr.
    timeout : seconds for each install and each check.

    Raises
    ------
    OptionsError
        Fewer than two versions to search, bad versions, no version list from the index, or a golden
        file recorded from a model object (which no other process can build).
    DataError
        ``golden`` is not a readable golden file.
    """
    gold = load_golden(golden)
    if gold.spec is None:
        raise OptionsError(f"{gold.path} was recorded from a model object; bisect rebuilds the model in each "
                           "environment, so record it from a name, a checkpoint (--weights) or a factory "
                           "'module:callable' instead")
    tolerance = Tolerance(atol, rtol, min_iou, max_polygon_delta)
    arguments = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(tolerance).items()]
    candidates = list_versions(package, lower, upper, versions=versions, find_links=find_links, timeout=timeout)
    if len(candidates) < 2:
        raise OptionsError(f"bisect needs at least two versions of {package!r} from {lower or 'the first'} to "
                           f"{upper or 'the last'}; found {candidates}: widen --from/--to or give --versions a,b,c")
    ThrowawayEnv(package, candidates[0], installer=installer)  # a bad installer fails before any work
    results: dict[int, VersionResult] = {}
    bar = tqdm(total=_most_steps(len(candidates)), desc=f"bisect {package}", unit="env", disable=not progress)

    def test(index: int) -> str:
        version = candidates[index]
        bar.set_postfix_str(f"testing {version}")
        started = time.perf_counter()
        try:
            with ThrowawayEnv(package, version, find_links=find_links, installer=installer, timeout=timeout) as env:
                report = env.check(gold.path, arguments)
            result = VersionResult(version, "same" if report["ok"] else "moved", _summary(report),
                                   time.perf_counter() - started, report)
        except EnvFailure as exc:
            result = VersionResult(version, "error", str(exc), time.perf_counter() - started)
        results[index] = result
        bar.update(1)
        if progress:
            tqdm.write(f"{package} {version}: {result.verdict} ({result.summary})", file=sys.stderr)
        return result.verdict

    try:
        found = _search(candidates, test)
    finally:
        bar.close()
    return BisectReport(str(gold.path), package, tuple(candidates), tuple(results.values()), *found)


def _search(candidates: list[str], test) -> tuple[str | None, str | None, tuple[str, ...], str]:
    """Binary search with both bounds tested first; (first moved, last same, untested between, conclusion)."""
    lo, hi = 0, len(candidates) - 1
    first, last = candidates[lo], candidates[hi]
    verdict = test(lo)
    if verdict != "same":
        why = "could not be tested" if verdict == "error" else "already moves the outputs"
        return None, None, (), (f"the lower bound {first} {why}: nothing to bisect. Record the golden file in an "
                                f"environment with {first}, or choose another --from (see each version's line)")
    verdict = test(hi)
    if verdict != "moved":
        why = "could not be tested" if verdict == "error" else "keeps the outputs within tolerance"
        return None, first, (), f"the upper bound {last} {why}: no version up to it can be named"
    skipped: set[int] = set()
    while inner := [i for i in range(lo + 1, hi) if i not in skipped]:
        mid = inner[len(inner) // 2]
        verdict = test(mid)
        if verdict == "same":
            lo = mid
        elif verdict == "moved":
            hi = mid
        else:
            skipped.add(mid)
    untested = tuple(candidates[i] for i in sorted(skipped) if lo < i < hi)
    if untested:
        return candidates[hi], candidates[lo], untested, (
            f"the outputs move between {candidates[lo]} (same) and {candidates[hi]} (moved); {list(untested)} in "
            "between could not be tested, so the first moving version is one of those or " + candidates[hi])
    return candidates[hi], candidates[lo], (), (f"first version that moves the outputs: {candidates[hi]} "
                                                f"(the last that keeps them: {candidates[lo]})")
