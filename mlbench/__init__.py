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

__version__ = "0.1.0"

__all__ = [
    "DataError", "ImageError", "MlbenchError", "ModelError", "OptionsError", "StageError", "WeightsError",
    "ImageReport", "read_image", "build_model", "list_models", "resolve_name", "PRESETS", "PipelineOptions",
    "Pipeline", "Run", "mask_to_polygons", "Sample", "list_samples", "load_sample", "Segmentation",
    "build_response", "segment", "make_spheroids", "load_model",
]
