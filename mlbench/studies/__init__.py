"""Runs over many images or settings: sweeps (local or on Dask), model comparison, tile fidelity, parity of
the ways one model runs, and where two runs part."""

from __future__ import annotations

from mlbench.studies._parity import ParityReport, parity
from mlbench.studies._sweep import sweep, sweep_run
from mlbench.studies._tile_fidelity import TileFidelity, tile_fidelity
from mlbench.studies.compare import compare_models, summarize_comparison
from mlbench.studies.executors import sweep_executor
from mlbench.studies.run_diff import RunDiff, diff_runs

__all__ = ["TileFidelity", "compare_models", "summarize_comparison", "sweep", "sweep_executor", "sweep_run", "tile_fidelity",
           "ParityReport", "parity", "RunDiff", "diff_runs"]
