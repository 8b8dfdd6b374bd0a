"""The model zoo: the service's three segmentation networks at full and small widths.

>>> from mlbench.models import build_model, list_models
>>> list_models()
['cbam_resunet', 'hrnet', 'ma_resunet']
"""

from mlbench.models.blocks import SegmentationNet
from mlbench.models.cbam_resunet import CbamConfig, CbamResUNet
from mlbench.models.hrnet import HRNet, HrnetConfig
from mlbench.models.ma_resunet import MaConfig, MaResUNet
from mlbench.models.registry import (
    ALIASES,
    SIZES,
    build_model,
    config_from_state_dict,
    list_models,
    model_config,
    resolve_name,
)
from mlbench.models.cards import ModelCard, attach_card, card
from mlbench.models.loading import load_checkpoint, load_model, register_model

__all__ = [
    "ALIASES",
    "SIZES",
    "CbamConfig",
    "CbamResUNet",
    "HRNet",
    "HrnetConfig",
    "MaConfig",
    "MaResUNet",
    "SegmentationNet",
    "build_model",
    "config_from_state_dict",
    "list_models",
    "ModelCard",
    "attach_card",
    "card",
    "load_checkpoint",
    "load_model",
    "register_model",
    "model_config",
    "resolve_name",
]
