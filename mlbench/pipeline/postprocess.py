"""From the model's raw output to a probability map and a mask at the image's size.

The output is read as the model card's head says (:func:`mlbench.pipeline.recipe.read_head`). A
one-channel sigmoid head: the service applied the sigmoid only when the output left [0, 1] (so
logits that happen to lie inside [0, 1] were read as probabilities), resized the probability map
back to the original size (bilinear) and thresholded with a strict ``>``. Both the careful rule and
the served heuristic are here, chosen by options. An ``argmax`` head takes the top class per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlbench.findings import ReportText
from mlbench.models.cards import ModelCard
from mlbench.pipeline.options import PipelineOptions
from mlbench.pipeline.preprocess import input_geometry
from mlbench.pipeline.recipe import read_head, undo_geometry

__all__ = ["Postprocessed", "to_probability", "postprocess_output"]


@dataclass(frozen=True, repr=False)
class Postprocessed(ReportText):
    """Probability (H, W) float32 and mask (H, W) bool at the original image size."""

    probability: np.ndarray
    mask: np.ndarray
    sigmoid_applied: bool
    threshold: float

    def text(self) -> str:
        return (f"Postprocessed(shape={self.mask.shape}, foreground={self.mask.mean():.4f}, "
                f"max_probability={float(self.probability.max()):.4f}, sigmoid_applied={self.sigmoid_applied}, "
                f"threshold={self.threshold})")


def to_probability(output: torch.Tensor, rule: str, card: ModelCard | None = None) -> tuple[np.ndarray, bool]:
    """(1, C, H, W) raw output -> (H, W) float32 foreground probability and whether a sigmoid was applied.

    For a one-channel head ``rule="always"`` applies the sigmoid; ``"if_outside_unit"`` only when
    min < 0 or max > 1. Other heads follow the card (:func:`mlbench.pipeline.recipe.read_head`).
    """
    head = read_head(output, card or ModelCard(), rule)
    return head.probability.astype(np.float32, copy=False), head.sigmoid_applied


def postprocess_output(output: torch.Tensor, original_hw: tuple[int, int], options: PipelineOptions,
                       card: ModelCard | None = None) -> Postprocessed:
    """The card's head (sigmoid per ``options.sigmoid``), the geometry undone to ``original_hw`` (bilinear),
    then a strict threshold, or the top class for an ``argmax`` head."""
    card = card or ModelCard()
    options = options.resolved(card)
    head = read_head(output, card, options.sigmoid)
    geometry = input_geometry(tuple(original_hw), options, card)
    prob = undo_geometry(head.probability, geometry)
    if head.classes is None:
        mask = prob > options.threshold
    else:
        mask = np.isin(undo_geometry(head.classes, geometry).argmax(axis=2), card.foreground)
    return Postprocessed(probability=prob, mask=mask, sigmoid_applied=head.sigmoid_applied,
                         threshold=float(options.threshold))
