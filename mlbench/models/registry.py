"""Model names, sizes and construction: ``build_model``, ``list_models``, ``resolve_name``.

The service's ids are aliases: ``resunet_small`` is ``cbam_resunet`` and ``resunet_advanced`` is
``ma_resunet``. Weights are initialised from ``seed`` without touching the global RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from mlbench.errors import ModelError
from mlbench.models import cbam_resunet, hrnet, ma_resunet
from mlbench.models.blocks import SegmentationNet

ALIASES: dict[str, str] = {"resunet_small": "cbam_resunet", "resunet_advanced": "ma_resunet"}
REGISTERED: dict[str, tuple[Callable[[], torch.nn.Module], Any]] = {}
"""Users' architectures, name -> (factory, card or None): :func:`mlbench.models.loading.register_model` fills it."""
"""Service model ids and the canonical names they stand for."""
SIZES = ("small", "full")


@dataclass(frozen=True)
class _Spec:
    model: Callable[[Any], SegmentationNet]
    module: ModuleType

    @property
    def config_type(self) -> type:
        return type(self.module.FULL)


_SPECS: dict[str, _Spec] = {
    "cbam_resunet": _Spec(cbam_resunet.CbamResUNet, cbam_resunet),
    "hrnet": _Spec(hrnet.HRNet, hrnet),
    "ma_resunet": _Spec(ma_resunet.MaResUNet, ma_resunet),
}


def list_models() -> list[str]:
    """Return the canonical model names, sorted: ``['cbam_resunet', 'hrnet', 'ma_resunet']``."""
    return sorted(_SPECS)


def resolve_name(name: str) -> str:
    """Return the canonical name for ``name`` or a service alias (case-insensitive, stripped).

    Raises
    ------
    ModelError
        If ``name`` is neither a model nor an alias; the message lists both.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    key = ALIASES.get(key, key)
    if key not in _SPECS:
        if name in REGISTERED:
            raise ModelError(f"{name!r} is an architecture you registered (mb.register_model), which has no weights "
                             f"of its own: load them with model = mb.load_model(path, model={name!r}) and pass the "
                             "model instead of its name")
        aliases = ", ".join(f"{alias!r} -> {target!r}" for alias, target in ALIASES.items())
        raise ModelError(
            f"unknown model {name!r}; expected one of {list_models()} "
            f"or a service alias ({aliases})."
        )
    return key


def model_config(name: str, size: str = "small") -> Any:
    """Return the preset width config of model ``name`` at ``size`` ("small" or "full")."""
    module = _SPECS[resolve_name(name)].module
    if size not in SIZES:
        raise ModelError(
            f"size must be one of {list(SIZES)}, got {size!r}; "
            f"for other widths pass widths=<config> to build_model."
        )
    return module.FULL if size == "full" else module.SMALL


def _as_config(name: str, widths: Any) -> Any:
    """Accept a config of the model's type or a sequence of ints (``Config.from_widths``)."""
    config_type = _SPECS[name].config_type
    if isinstance(widths, config_type):
        return widths
    if isinstance(widths, Sequence) and not isinstance(widths, str):
        return config_type.from_widths(widths)
    raise ModelError(
        f"widths for {name!r} must be a {config_type.__name__} or a sequence of ints, "
        f"got {type(widths).__name__}; e.g. widths={_SPECS[name].module.SMALL!r}."
    )


def build_model(
    name: str,
    size: str = "small",
    *,
    widths: Any = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> SegmentationNet:
    """Build an untrained model with deterministic weights.

    Parameters
    ----------
    name : str
        A name from :func:`list_models` or a service alias.
    size : {"small", "full"}
        Width preset; ignored when ``widths`` is given.
    widths : config or sequence of int, optional
        A config of the model's type (``CbamConfig``, ``HrnetConfig``, ``MaConfig``), or the
        encoder/branch widths from which the other widths are derived.
    seed : int
        Seed of the weight initialisation; the global RNG state is left as it was.
    device : str or torch.device
        ``"meta"`` builds the shapes without allocating memory (for full-size checks); other
        devices get the CPU-initialised weights moved there.

    Returns
    -------
    SegmentationNet
        In train mode; maps (N, 3, H, W) to (N, 1, H', W') raw logits. Carries
        ``mlbench_name``, ``mlbench_size``, ``config``, ``input_multiple`` and ``min_input_size``.
    """
    canonical = resolve_name(name)
    config = model_config(canonical, size) if widths is None else _as_config(canonical, widths)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "meta":
            with torch.device("meta"):
                return _SPECS[canonical].model(config)
        model = _SPECS[canonical].model(config)
    return model.to(device)


def config_from_state_dict(name: str, state_dict: Mapping[str, Any]) -> Any:
    """Detect the width config of model ``name`` from the tensor shapes of ``state_dict``.

    Like the service, widths are read from ``downs.{i}.conv1.weight`` (cbam_resunet) and
    ``encoder{i}.0.conv1.weight`` (ma_resunet); HRNet's from its stem, stage 1 and stage 4.

    Raises
    ------
    WeightsError
        If a key needed for the detection is missing (e.g. a ``module.`` prefix).
    """
    return _SPECS[resolve_name(name)].module.detect_config(state_dict)
