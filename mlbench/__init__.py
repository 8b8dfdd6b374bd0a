"""mlbench: a workbench for debugging image-segmentation inference.

One pipeline (decode -> preprocess -> forward -> postprocess -> polygons) is the spine;
the inspectors look inside it, the widgets show it, the service serves it.

>>> import mlbench as mb
>>> seg = mb.segment(mb.load_sample("spheroids_8bit").path, "cbam_resunet")
"""

from __future__ import annotations

from .errors import DataError, ImageError, MlbenchError, ModelError, OptionsError, StageError, WeightsError
from .io import ImageReport, read_image
from .models import build_model, list_models, resolve_name
from .options import PRESETS, PipelineOptions
from .pipeline import Pipeline, Run
from .polygons import mask_to_polygons
from .samples import Sample, list_samples, load_sample
from .segment import Segmentation, build_response, segment
from .synthetic import make_spheroids
from .zoo import load_model
from . import viz, widgets
from .casebook import Casebook
from .casefile import Case, CaseError, load_case, save_case
from .client import BatchResult, SegmentResult, ServiceClient, ServiceError
from .compare import compare_models, summarize_comparison
from .doctor import EnvReport, doctor
from .imagecheck import check_image
from .ipython_ext import load_ipython_extension, unload_ipython_extension
from .metrics import Matching, PixelScores, match_objects, matching_curve, pixel_scores, to_labels
from .normcheck import NormReport, check_normalization
from .overlay import overlay
from .polycheck import PolygonReport, check_polygons, threshold_counts
from .probes import estimate_memory, explain_error, max_input_size, record_memory, trace_shapes
from .report import Report, report
from .sweep import sweep
from .sweep_exec import sweep_executor
from .tiling import pad_to_multiple, predict_tiled, run_tiled
from .tile_fidelity import TileFidelity, tile_fidelity
from .triage import Diagnosis, triage
from .weights import WeightsReport, check_weights, read_checkpoint

__version__ = "0.1.0"

__all__ = [
    "DataError", "ImageError", "MlbenchError", "ModelError", "OptionsError", "StageError", "WeightsError",
    "ImageReport", "read_image", "build_model", "list_models", "resolve_name", "PRESETS", "PipelineOptions",
    "Pipeline", "Run", "mask_to_polygons", "Sample", "list_samples", "load_sample", "Segmentation",
    "build_response", "segment", "make_spheroids", "load_model", "viz", "widgets", "load_case", "save_case",
    "BatchResult", "SegmentResult", "ServiceClient", "ServiceError", "compare_models", "doctor", "check_image",
    "load_ipython_extension", "unload_ipython_extension", "match_objects", "pixel_scores", "check_normalization",
    "overlay", "check_polygons", "estimate_memory", "max_input_size", "record_memory", "trace_shapes", "report",
    "sweep", "sweep_executor", "predict_tiled", "run_tiled", "tile_fidelity", "TileFidelity", "pad_to_multiple",
    "explain_error",
    "Casebook", "Case", "CaseError", "summarize_comparison", "EnvReport", "Matching", "PixelScores", "matching_curve",
    "to_labels", "NormReport", "PolygonReport", "threshold_counts", "Report", "Diagnosis", "WeightsReport", "read_checkpoint", "triage", "check_weights",
]
