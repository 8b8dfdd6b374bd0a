"""Which architecture a state dict fits, at which widths, and how its keys differ from a model's.

Widths are read from the tensors (as the service's own loader reads them); each registered
architecture is built at those widths on the meta device (nothing allocated) and compared key by
key and shape by shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from mlbench.findings import ReportText
from mlbench.models.registry import build_model, config_from_state_dict, list_models, model_config, resolve_name

__all__ = ["Fit", "rank_architectures", "expected_shapes", "diff_keys", "known_keys"]


@dataclass(frozen=True, repr=False)
class Fit(ReportText):
    """How well a checkpoint fits one registered architecture at the widths read from it."""

    model: str
    widths: str
    score: float
    matched: int
    expected: int

    def text(self) -> str:
        return f"{self.model} ({self.widths}): {self.matched}/{self.expected} keys fit, score {self.score:.2f}"


def known_keys(model: Any) -> set[str]:
    """Key names of every registered architecture (small widths), and of ``model`` when it is a module."""
    keys = set().union(*(_shapes(name, model_config(name, "small")) for name in list_models()))
    return keys | set(model.state_dict()) if isinstance(model, torch.nn.Module) else keys


@lru_cache(maxsize=32)
def _shapes(name: str, config: Any) -> dict[str, torch.Tensor]:
    """Key -> meta tensor (shape and dtype only) of model ``name`` at ``config``; cached."""
    return dict(build_model(name, widths=config, device="meta").state_dict())


def rank_architectures(state_dict: Mapping[str, torch.Tensor]) -> tuple[Fit, ...]:
    """Every registered architecture at the widths detected from the tensors, best fit first."""
    fits = []
    for name in list_models():
        try:
            config = config_from_state_dict(name, state_dict)
        except Exception:  # keys the detection needs are absent: compare with the small preset
            config = model_config(name, "small")
        label = next((s for s in ("small", "full") if model_config(name, s) == config), f"widths {config}")
        expected = _shapes(name, config)
        matched = sum(1 for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) == tuple(v.shape))
        score = matched / max(len(expected), len(state_dict))
        fits.append(Fit(name, label, round(score, 4), matched, len(expected)))
    return tuple(sorted(fits, key=lambda f: (-f.score, f.model)))


def expected_shapes(model: str | torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    name = resolve_name(model)
    try:
        config = config_from_state_dict(name, state_dict)
    except Exception:
        config = model_config(name, "small")
    return _shapes(name, config)


def _widens(saved: torch.dtype, wanted: torch.dtype) -> bool:
    """Whether loading ``saved`` into ``wanted`` is exact: the same dtype, or a floating type into a
    wider one (float16 or float8 into float32); not an integer into a float."""
    if saved == wanted:
        return True
    if not (saved.is_floating_point and wanted.is_floating_point):
        return False
    try:
        return torch.promote_types(saved, wanted) == wanted
    except RuntimeError:  # "Promotion for Float8 Types is not supported": every float8 value fits 16 bits and more
        return torch.finfo(saved).bits < torch.finfo(wanted).bits


def diff_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Missing, unexpected, shape- and dtype-mismatched keys of ``state_dict`` against ``expected``; a
    dtype mismatch is one that loses precision or range on loading (float32 into float16), not a
    widening (float16 weights into a float32 model: exact)."""
    common = [k for k in expected if k in state_dict]
    return {
        "missing": [k for k in expected if k not in state_dict],
        "unexpected": [k for k in state_dict if k not in expected],
        "shape": [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in common
                  if tuple(state_dict[k].shape) != tuple(expected[k].shape)],
        "dtype": [f"{k}: {state_dict[k].dtype} vs {expected[k].dtype}" for k in common
                  if not _widens(state_dict[k].dtype, expected[k].dtype)],
    }
