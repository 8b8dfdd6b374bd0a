"""The casebook: case files under one folder, searchable, so debugging knowledge accumulates.

Every case saved with :meth:`Casebook.add` (or :func:`mlbench.save_case` into the folder) becomes
an entry of the index that triage searches (:class:`mlbench.failures.case_index.CaseIndex`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlbench.cases.casefile import save_case
from mlbench.errors import OptionsError
from mlbench.failures.case_index import CaseIndex

__all__ = ["Casebook"]


class Casebook(CaseIndex):
    """The cases saved under one or more folders; :meth:`add` saves a new one in the first.

    Parameters
    ----------
    *folders : str or Path
        Folders holding case folders or case zips; none given means the default casebook.
    """

    def add(self, run: Any, name: str, *, note: str = "", failure_class: str | None = None, fix: str = "") -> Path:
        """Save ``run`` as a new case in the first folder; ``fix`` records what solved it."""
        if not re.fullmatch(r"[\w.-]+", name):
            raise OptionsError(f"case name {name!r} must be letters, digits, '_', '-' or '.' (it becomes a folder name)")
        self.folders[0].mkdir(parents=True, exist_ok=True)
        return save_case(run, self.folders[0] / name, name=name, note=note, failure_class=failure_class, fix=fix)
