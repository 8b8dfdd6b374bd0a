"""From the model's raw output to a probability map and a mask at the image's size.

The models emit logits. The service applied the sigmoid only when the output left
[0, 1] (so logits that happen to lie inside [0, 1] were read as probabilities), resized
the probability map back to the original size (bilinear) and thresholded with a strict
``>``. Both the careful rule and the served heuristic are here, chosen by options.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .options import PipelineOptions

__all__ = ["Postprocessed", "to_probability", "postprocess_output"]


@dataclass(frozen=True)
class Postprocessed:
    """Probability (H, W) float32 and mask (H, W) bool at the original image size."""

    probability: np.ndarray
    mask: np.ndarray
    sigmoid_applied: bool
    threshold: float

    def __repr__(self) -> str:
        return (f"Postprocessed(shape={self.mask.shape}, foreground={self.mask.mean():.4f}, "
                f"max_probability={float(self.probability.max()):.4f}, sigmoid_applied={self.sigmoid_applied}, "
                f"threshold={self.threshold})")


def to_probability(output: torch.Tensor, rule: str) -> tuple[np.ndarray, bool]:
    """(1, 1, H, W) raw output -> (H, W) float32 probability and whether a sigmoid was applied.

    ``rule="always"`` applies the sigmoid; ``"if_outside_unit"`` only when min < 0 or max > 1.
    """
    values = output.detach().float().cpu()[0, 0]
    outside = bool(values.min() < 0 or values.max() > 1)
    apply = rule == "always" or outside
    prob = torch.sigmoid(values) if apply else values
    return prob.numpy().astype(np.float32, copy=True), apply


def postprocess_output(output: torch.Tensor, original_hw: tuple[int, int], options: PipelineOptions) -> Postprocessed:
    """Sigmoid (per ``options.sigmoid``), bilinear resize to ``original_hw``, strict threshold."""
    import cv2

    prob, applied = to_probability(output, options.sigmoid)
    height, width = original_hw
    if prob.shape != (height, width):
        prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    return Postprocessed(probability=prob, mask=prob > options.threshold, sigmoid_applied=applied,
                         threshold=float(options.threshold))
