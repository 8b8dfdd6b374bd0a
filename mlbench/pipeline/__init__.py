"""The spine: decode -> preprocess -> forward -> postprocess -> polygons.

``options`` (presets and every knob), ``stages`` (one pure function per stage, with
``preprocess``, ``postprocess`` and ``polygons`` holding their logic), ``run`` (:class:`Pipeline`
and the step-by-step :class:`Run`), ``result`` (:class:`Segmentation` and the service's response
body) and :func:`segment`, one call from an image to the result.
"""

from __future__ import annotations

from mlbench.pipeline._segment import segment
from mlbench.pipeline.options import PRESETS, PipelineOptions, make_options
from mlbench.pipeline.polygons import mask_to_polygons
from mlbench.pipeline.result import Segmentation, build_response
from mlbench.pipeline.run import Pipeline, Run
from mlbench.pipeline.stages import STAGE_NAMES

__all__ = ["PRESETS", "Pipeline", "PipelineOptions", "Run", "STAGE_NAMES", "Segmentation", "build_response", "make_options", "mask_to_polygons", "segment"]
