"""Failure classes and triage: which kind of failure an exception, log or HTTP body shows.

``rules``, ``library_rules``, ``patterns``, ``log_formats``, ``numbers``, ``causes`` (the fix for a named cause), ``blocks``, ``matching``
(linear-time rule matching) and ``stream`` (capped reading) are the parts of :func:`triage`;
``case_index`` is the read-only index of past cases it searches. ``forward_errors`` explains an
exception a forward pass raised, with the model and the input at hand (:func:`explain_error`, exported
by :mod:`mlbench.probes`), for the probes, tiling and the pipeline's stage errors alike.
"""

from __future__ import annotations

from mlbench.failures._triage import FAILURE_CLASSES, Diagnosis, triage, triage_text, triage_text_all
from mlbench.failures.case_index import CaseEntry, CaseIndex, similar_cases

__all__ = ["CaseEntry", "CaseIndex", "Diagnosis", "FAILURE_CLASSES", "similar_cases", "triage", "triage_text", "triage_text_all"]
