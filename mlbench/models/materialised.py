"""Whether a model has real weights: a model built on the meta device (for memory estimates) has
shapes and no values, and running it fails deep inside torch with "Cannot copy out of meta tensor"."""

from __future__ import annotations

import torch
from torch import nn

from mlbench.errors import ModelError

__all__ = ["check_materialised"]


def check_materialised(model: nn.Module) -> torch.Tensor | None:
    """The model's first floating-point weight (None without one), whose dtype the input follows; raise
    :class:`ModelError` when the weights are on the meta device (shapes, no values)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.is_meta:
        raise ModelError(f"{type(model).__name__}'s weights are on the meta device: shapes without values (built "
                         "with device='meta', for memory estimates); load real weights (mb.load_model(path, "
                         "model=model)) or build the model on the CPU before running it")
    return weight
