"""What a completed run gives a caller: the :class:`Segmentation` and the service's response body.

The response builder reproduces the service's ``POST /api/v1/segment`` body, so the CLI, the
reference service and the notebooks emit the same schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlbench.findings import ReportText

if TYPE_CHECKING:
    from mlbench.pipeline.run import Run

__all__ = ["Segmentation", "build_response", "NO_POLYGONS_WARNING"]

NO_POLYGONS_WARNING = ("No polygons detected - image may not contain detectable cells or threshold may need "
                       "adjustment")
"""The service's ``warning`` when a segmentation found no polygon."""


def build_response(run: Run) -> dict[str, Any]:
    """The service's ``POST /api/v1/segment`` body for a completed run.

    Keys, in the service's order: model_used, threshold_used, image_size {width, height},
    polygons, processing_info {device, num_polygons, confidence_scores, batch_size},
    processing_time, inference_time, preprocessing_time (seconds, 3 decimals), device,
    gpu_enabled, batch_size_used, success, and ``warning`` when no polygon was found.
    The first five are what the service's model loader returned (its batch items carry
    only those); ``model_used`` is the model's registry name (the service replaces it
    with its id).
    """
    timings = run.timings
    height, width = run.output("decode").image.shape[:2]
    polygons = run.output("polygons")
    device = str(run.options.device)
    response: dict[str, Any] = {
        "model_used": run.pipeline.model_name,
        "threshold_used": float(run.options.threshold),
        "image_size": {"width": int(width), "height": int(height)},
        "polygons": polygons,
        "processing_info": {"device": device, "num_polygons": len(polygons),
                            "confidence_scores": [p["confidence"] for p in polygons], "batch_size": 1},
        "processing_time": round(sum(timings.values()), 3),
        "inference_time": round(timings.get("forward", 0.0), 3),
        "preprocessing_time": round(timings.get("decode", 0.0) + timings.get("preprocess", 0.0), 3),
        "device": device,
        "gpu_enabled": bool(torch.cuda.is_available()),
        "batch_size_used": 1,
        "success": True,
    }
    if not polygons:
        response["warning"] = NO_POLYGONS_WARNING
    return response


@dataclass(frozen=True, repr=False)
class Segmentation(ReportText):
    """The result of segmenting one image.

    Attributes
    ----------
    mask : (H, W) bool
        Foreground at the original image's size.
    probability : (H, W) float32
        Foreground probability at the original image's size.
    polygons : list of dict
        The service's polygons.
    response : dict
        The service's JSON response body.
    run : Run
        The run, with every stage's output and time.
    """

    mask: np.ndarray
    probability: np.ndarray
    polygons: list
    response: dict
    run: Run

    @classmethod
    def from_run(cls, run: Run) -> "Segmentation":
        post = run.output("postprocess")
        return cls(post.mask, post.probability, run.output("polygons"), build_response(run), run)

    def text(self) -> str:
        height, width = self.mask.shape
        n_ext = sum(p["type"] == "external" for p in self.polygons)
        head = (f"Segmentation({self.response['model_used']}, {width}x{height}, foreground {self.mask.mean():.4f}, "
                f"{len(self.polygons)} polygon(s) ({n_ext} external), "
                f"max probability {float(self.probability.max()):.4f})")
        return "\n".join([head, *(f"  input problem [{p.code}] {p.message}" for p in self.input_problems)])

    @property
    def input_problems(self) -> tuple:
        """What the decode found wrong with the image (a constant image, pixels below zero, pages or an
        alpha channel left out ...): the mask was made anyway, so the result says so."""
        if self.run is None:  # built by hand from a mask, not by a run
            return ()
        decoded = self.run.output("decode")
        return tuple(getattr(getattr(decoded, "report", None), "problems", ()))
