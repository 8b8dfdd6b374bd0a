"""Postmortems: case files of a run (save, load, replay), the casebook, and the report."""

from __future__ import annotations

from mlbench.cases._report import Report, report
from mlbench.cases.casebook import Casebook
from mlbench.cases.casefile import Case, CaseError, load_case, save_case

__all__ = ["Case", "CaseError", "Casebook", "Report", "load_case", "report", "save_case"]
