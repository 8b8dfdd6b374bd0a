"""``mb.segment``: one call from an image to a mask, polygons and the service's JSON."""

from __future__ import annotations

from typing import Any

import torch

from mlbench.pipeline.result import Segmentation
from mlbench.pipeline.run import Pipeline

__all__ = ["segment"]

def segment(image: Any, model: torch.nn.Module | str = "hrnet", preset: str = "fixed", **options: Any) -> Segmentation:
    """Segment one image with one model.

    Parameters
    ----------
    image : path, bytes, open binary file, PIL image, tensor or (H, W[, C]) array
    model : nn.Module or str
        A model or a name / service id (the bundled small weights are loaded).
    preset : "fixed" or "as_served"
    **options
        Pipeline options overriding the preset (threshold, detect_holes, input_size, ...).

    Raises
    ------
    StageError
        When a stage fails; ``.stage`` names it and ``__cause__`` is the original error.

    Examples
    --------
    >>> import mlbench as mb
    >>> seg = segment(mb.load_sample("spheroids_8bit").path, "cbam_resunet")
    >>> seg.mask.shape, len(seg.polygons), seg.polygons[0]["id"]
    ((512, 512), 10, 'polygon_1')
    >>> seg.response["model_used"], seg.response["success"]
    ('cbam_resunet', True)
    """
    return Pipeline(model, preset=preset, **options).start(image).result()
