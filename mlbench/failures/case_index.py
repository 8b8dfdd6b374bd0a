"""The read-only index of past cases that triage searches (the casebook's entries and search).

Each case file saved under a casebook folder is an entry: its failure class, the evidence line, the
fix that was applied and a note. :func:`mlbench.triage` asks the index for the most similar past
cases (same class, closest evidence by word overlap). The default folders are ``data/cases`` plus
the folders listed in ``$MLBENCH_CASEBOOK`` (separated by ``os.pathsep``). Adding cases is
:class:`mlbench.Casebook`'s job, a layer up, where case files are written.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlbench.budgets import budgets
from mlbench.findings import ReportText
from mlbench.paths import data_dir

__all__ = ["CaseIndex", "CaseEntry", "similar_cases", "default_casebook_folders"]

_CACHE: dict[tuple[str, float], list["CaseEntry"]] = {}


@dataclass(frozen=True, repr=False)
class CaseEntry(ReportText):
    """One past case as the casebook lists it; the repr names the case, not the folder it is in."""

    name: str
    path: str
    failure_class: str
    evidence: str
    fix: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return f"CaseEntry {self.name} ({self.failure_class}): {self.evidence[:70]}\n  fix: {self.fix}"


def default_casebook_folders() -> list[Path]:
    """``data/cases`` and every folder in ``$MLBENCH_CASEBOOK``."""
    extra = [Path(p) for p in os.environ.get("MLBENCH_CASEBOOK", "").split(os.pathsep) if p]
    return [data_dir() / "cases", *extra]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z_][a-z0-9_.]{2,}", text.lower())}


def _case_json(path: Path) -> dict[str, Any] | None:
    """A case's manifest, or None when it is not a readable case (the casebook skips it and
    ``load_case`` would say why). Cases are untrusted: the manifest is read only from a regular
    file or zip member no larger than ``Budgets.max_case_manifest_bytes``, and any failure to parse
    it (deep nesting included) skips the case rather than failing the triage that searches it."""
    limit = budgets().max_case_manifest_bytes
    try:
        if path.is_dir() and not path.is_symlink():
            manifest = path / "case.json"
            if manifest.is_symlink() or not manifest.is_file() or manifest.stat().st_size > limit:
                return None
            text = manifest.read_bytes()
        elif path.suffix == ".zip" and path.is_file() and not path.is_symlink() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if archive.getinfo("case.json").file_size > limit:
                    return None
                with archive.open("case.json") as member:
                    text = member.read(limit + 1)
            if len(text) > limit:
                return None
        else:
            return None
        meta = json.loads(text)
    except (OSError, KeyError, ValueError, RecursionError, zipfile.BadZipFile, RuntimeError, NotImplementedError):
        return None
    return meta if isinstance(meta, dict) else None


def _entries(folder: Path) -> list[CaseEntry]:
    if not folder.is_dir():
        return []
    key = (str(folder), folder.stat().st_mtime)
    if key not in _CACHE:
        found = []
        for path in sorted(folder.iterdir()):
            meta = _case_json(path)
            if meta is None:
                continue
            diagnosis = meta.get("diagnosis") if isinstance(meta.get("diagnosis"), dict) else {}
            text = lambda value, default="": value if isinstance(value, str) else default  # noqa: E731 - untrusted JSON
            found.append(CaseEntry(text(meta.get("name"), path.stem), str(path), text(meta.get("failure_class"), "unknown"),
                                   text(diagnosis.get("evidence")), text(meta.get("fix")) or text(diagnosis.get("fix")),
                                   text(meta.get("note"))))
        _CACHE[key] = found
    return _CACHE[key]


class CaseIndex(ReportText):
    """The cases saved under one or more folders, read-only.

    Parameters
    ----------
    *folders : str or Path
        Folders holding case folders or case zips; none given means the default casebook.
    """

    def __init__(self, *folders: str | os.PathLike) -> None:
        self.folders = [Path(f) for f in folders] if folders else default_casebook_folders()

    @property
    def entries(self) -> list[CaseEntry]:
        return [entry for folder in self.folders for entry in _entries(folder)]

    def search(self, query: Any, k: int = 3, failure_class: str | None = None) -> list[dict[str, Any]]:
        """Past cases most similar to ``query`` (text or a Diagnosis), best first, with a score 0..2.

        The score is 1 for the same failure class plus the word overlap (Jaccard) between the
        query's evidence and explanation and the case's evidence and note.
        """
        if hasattr(query, "failure_class"):
            failure_class = failure_class or query.failure_class
            query = f"{query.evidence} {query.explanation}"
        words = _words(str(query))
        scored = []
        for entry in self.entries:
            other = _words(f"{entry.evidence} {entry.note}")
            overlap = len(words & other) / len(words | other) if words | other else 0.0
            score = (1.0 if entry.failure_class == failure_class else 0.0) + overlap
            scored.append(entry.to_dict() | {"score": round(score, 3)})
        scored.sort(key=lambda e: (-e["score"], e["name"]))
        return scored[:k]

    def text(self) -> str:
        lines = [f"{type(self).__name__}: {len(self.entries)} case(s) in {len(self.folders)} folder(s)"]
        lines += [f"  {e.name:<28} {e.failure_class:<18} {e.evidence[:70]}" for e in self.entries]
        return "\n".join(lines)


SIMILAR_OVERLAP = 0.15
"""Least word overlap (Jaccard) of a past case with a diagnosis for :func:`similar_cases` to name it:
a class in common is not enough (a channel-count error is no precedent for a skip connection off
by a pixel: 0.12 against 0.18 to 0.35 for the skip-connection texts)."""


def similar_cases(diagnosis: Any, casebook: Any = None, k: int = 3) -> list[dict[str, Any]]:
    """Past cases of the same failure class as ``diagnosis`` whose evidence shares at least
    :data:`SIMILAR_OVERLAP` of its words, closest first."""
    book = casebook if isinstance(casebook, CaseIndex) else CaseIndex(*([casebook] if casebook else []))
    return [c for c in book.search(diagnosis, k=max(k, 1) * 3)
            if c["failure_class"] == diagnosis.failure_class and c["score"] - 1 >= SIMILAR_OVERLAP][:k]
