"""The casebook: case files under one folder, searchable, so debugging knowledge accumulates.

Every case saved with :meth:`Casebook.add` (or :func:`mlbench.save_case` into the folder)
becomes an entry: its failure class, the evidence line, the fix that was applied and a
note. :func:`mlbench.triage` asks the casebook for the most similar past cases (same class,
closest evidence by word overlap). The default casebook is ``data/cases`` plus the folders
listed in ``$MLBENCH_CASEBOOK`` (separated by ``os.pathsep``).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import OptionsError
from .paths import data_dir

__all__ = ["Casebook", "CaseEntry", "similar_cases", "default_casebook_folders"]

_CACHE: dict[tuple[str, float], list["CaseEntry"]] = {}


@dataclass(frozen=True)
class CaseEntry:
    """One past case as the casebook lists it."""

    name: str
    path: str
    failure_class: str
    evidence: str
    fix: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_casebook_folders() -> list[Path]:
    """``data/cases`` and every folder in ``$MLBENCH_CASEBOOK``."""
    extra = [Path(p) for p in os.environ.get("MLBENCH_CASEBOOK", "").split(os.pathsep) if p]
    return [data_dir() / "cases", *extra]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z_][a-z0-9_.]{2,}", text.lower())}


def _case_json(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_dir() and (path / "case.json").exists():
            return json.loads((path / "case.json").read_text())
        if path.suffix == ".zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("case.json"))
    except (OSError, KeyError, ValueError):
        return None  # not a readable case: the casebook skips it, load_case would say why
    return None


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
            diagnosis = meta.get("diagnosis", {})
            found.append(CaseEntry(meta.get("name", path.stem), str(path), meta.get("failure_class", "unknown"),
                                   diagnosis.get("evidence", ""), meta.get("fix") or diagnosis.get("fix", ""), meta.get("note", "")))
        _CACHE[key] = found
    return _CACHE[key]


class Casebook:
    """The cases saved under one or more folders.

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

    def add(self, run: Any, name: str, *, note: str = "", failure_class: str | None = None, fix: str = "") -> Path:
        """Save ``run`` as a new case in the first folder; ``fix`` records what solved it."""
        from .casefile import save_case

        if not re.fullmatch(r"[\w.-]+", name):
            raise OptionsError(f"case name {name!r} must be letters, digits, '_', '-' or '.' (it becomes a folder name)")
        self.folders[0].mkdir(parents=True, exist_ok=True)
        path = save_case(run, self.folders[0] / name, name=name, note=note, failure_class=failure_class)
        if fix:
            _record_fix(path, fix)
        return path

    def __repr__(self) -> str:
        lines = [f"Casebook: {len(self.entries)} case(s) in {len(self.folders)} folder(s)"]
        lines += [f"  {e.name:<28} {e.failure_class:<18} {e.evidence[:70]}" for e in self.entries]
        return "\n".join(lines)


def _record_fix(path: Path, fix: str) -> None:
    """Add the fix to case.json (case.json is not in its own checksum list, the data files are)."""
    meta = json.loads((path / "case.json").read_text())
    meta["fix"] = fix
    (path / "case.json").write_text(json.dumps(meta, indent=1))


def similar_cases(diagnosis: Any, casebook: Any = None, k: int = 3) -> list[dict[str, Any]]:
    """Past cases of the same failure class as ``diagnosis``, closest evidence first."""
    book = casebook if isinstance(casebook, Casebook) else Casebook(*([casebook] if casebook else []))
    return [c for c in book.search(diagnosis, k=max(k, 1) * 3) if c["failure_class"] == diagnosis.failure_class][:k]
