"""mlbench: a workbench for debugging image-segmentation inference.

One pipeline (decode -> preprocess -> forward -> postprocess -> polygons) is the spine;
the inspectors look inside it, the widgets show it, the service serves it. The package's
folders are its layers, each importing only from the layers below it:

- L0 ``errors``, ``paths``, ``findings``, ``budgets``, ``isolation``: exceptions, data paths and hashing, findings
  and reports, the limits on what a file may cost to read, native decoders in a child process
- L1 ``metrics``, ``models``, ``image``, ``samples``, ``failures``
- L2 ``pipeline``, ``probes`` (neither imports the other)
- L3 ``checks``
- L4 ``cases``, ``studies``
- L5 ``service``, ``client``, ``widgets``, ``viz``, ``cli`` (and ``cli_models``), ``train``, ``ipython_ext``,
  ``notebook`` (the faces)

Every public name is re-exported here:

>>> import mlbench as mb
>>> seg = mb.segment(mb.load_sample("spheroids_8bit").path, "cbam_resunet")
>>> seg.mask.shape, len(seg.polygons) > 0
((512, 512), True)
"""

from __future__ import annotations

from mlbench import viz, widgets
from mlbench.budgets import Budgets
from mlbench.cases import Case, CaseError, Casebook, Report, load_case, report, save_case
from mlbench.checks import (
    DomainReport,
    EnvReport,
    NormReport,
    PolygonReport,
    WeightsReport,
    check_domain,
    check_image,
    check_normalization,
    check_polygons,
    check_weights,
    doctor,
    read_checkpoint,
    threshold_counts,
)
from mlbench.client import BatchResult, SegmentResult, ServiceClient, ServiceError
from mlbench.errors import DataError, ImageError, MlbenchError, ModelError, OptionsError, StageError, WeightsError
from mlbench.failures import Diagnosis, triage
from mlbench.image import ImageReport, overlay, read_image
from mlbench.ipython_ext import load_ipython_extension, unload_ipython_extension
from mlbench.metrics import Matching, PixelScores, match_objects, matching_curve, pixel_scores, to_labels
from mlbench.models import ModelCard, attach_card, build_model, card, list_models, load_model, register_model, resolve_name
from mlbench.notebook import setup_notebook
from mlbench.pipeline import (
    PRESETS,
    Pipeline,
    PipelineOptions,
    Run,
    Segmentation,
    build_response,
    mask_to_polygons,
    segment,
)
from mlbench.probes import estimate_memory, explain_error, max_input_size, record_memory, trace_shapes
from mlbench.probes.tiling import pad_to_multiple, predict_tiled, run_tiled
from mlbench.samples import Sample, list_samples, load_sample, make_spheroids
from mlbench.studies import TileFidelity, compare_models, summarize_comparison, sweep, sweep_executor, tile_fidelity
from mlbench.studies import ParityReport, RunDiff, diff_runs, parity
from mlbench.studies.golden import Golden, golden_check, golden_record
from mlbench.studies.golden_report import GoldenReport

__version__ = "0.1.0"

__all__ = [
    # errors and budgets
    "Budgets", "DataError", "ImageError", "MlbenchError", "ModelError", "OptionsError", "StageError", "WeightsError",
    # models and data
    "build_model", "list_models", "load_model", "resolve_name", "ModelCard", "card", "attach_card", "register_model", "Sample", "list_samples", "load_sample",
    "make_spheroids", "ImageReport", "read_image",
    # the pipeline
    "PRESETS", "Pipeline", "PipelineOptions", "Run", "Segmentation", "build_response", "mask_to_polygons", "segment",
    # looking inside
    "estimate_memory", "explain_error", "max_input_size", "record_memory", "trace_shapes", "pad_to_multiple",
    "predict_tiled", "run_tiled",
    # checks and metrics
    "DomainReport", "EnvReport", "NormReport", "PolygonReport", "WeightsReport", "check_domain", "check_image",
    "check_normalization",
    "check_polygons", "check_weights", "doctor", "read_checkpoint", "threshold_counts", "Matching", "PixelScores",
    "match_objects", "matching_curve", "pixel_scores", "to_labels", "Diagnosis", "triage",
    # cases and studies
    "Case", "CaseError", "Casebook", "Report", "load_case", "report", "save_case", "TileFidelity", "compare_models",
    "summarize_comparison", "sweep", "sweep_executor", "tile_fidelity", "Golden", "GoldenReport", "golden_check",
    "golden_record",
    "ParityReport", "RunDiff", "diff_runs", "parity",
    # faces
    "BatchResult", "SegmentResult", "ServiceClient", "ServiceError", "overlay", "viz", "widgets",
    "load_ipython_extension", "unload_ipython_extension", "setup_notebook",
]
