"""Building blocks shared by the three segmentation networks.

Every norm is ``nn.InstanceNorm2d(affine=True)``, as in the service. Attribute names follow the
service's checkpoints (``conv1``/``norm1``, ``W_g``/``W_x``/``psi``, ...), so the state dicts of
the full-size models match ``reference/*.full.state_dict.tsv`` key for key.

Dropout sits where the service's blocks have it, with its probabilities (it acts in train mode
only, but a model left in train mode is a failure mlbench must reproduce).

Note that ``InstanceNorm2d`` without running statistics raises ``ValueError: Expected more than 1
spatial element when training`` on a 1x1 map in eval mode too; this sets each model's
``min_input_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.errors import ModelError, WeightsError

ConvSpec = tuple[int, int, int]
"""``(in_channels, out_channels, kernel_size)`` of one convolution in a residual body."""


def norm2d(channels: int) -> nn.InstanceNorm2d:
    """Return the norm used everywhere: ``nn.InstanceNorm2d(channels, affine=True)``.

    The stock module, as in the service: a faster formulation (``F.group_norm`` with one group
    per channel) gives the same values only to float rounding, and with the service's own
    summation order the three models reproduce its forward bit for bit.
    """
    return nn.InstanceNorm2d(channels, affine=True)


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    stride: int = 1,
    relu: bool = False,
) -> nn.Sequential:
    """Return ``Sequential(conv (no bias), norm[, ReLU])`` with "same" padding.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    kernel_size : int
        Square kernel side; padding is ``kernel_size // 2``.
    stride : int
        Convolution stride.
    relu : bool
        Append a ReLU at index 2.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        norm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def resize_to(x: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinearly resize ``x`` of shape (N, C, H, W) to spatial ``size``.

    ``align_corners`` is the service's choice per model: False in CBAM-ResUNet's guards, True in
    every HRNet upsampling (the two differ by up to a pixel's worth of shift at 1/32 scale).
    """
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def channel_pool(x: torch.Tensor) -> torch.Tensor:
    """Pool (N, C, H, W) over channels into (N, 2, H, W): channel mean, then channel max."""
    return torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``x * sigmoid(conv7x7(channel_pool(x)))``, (N, C, H, W) kept."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(channel_pool(x)))


class ResidualBlock(nn.Module):
    """A residual block: ``conv_i`` + norm per entry of ``convs``, ReLU (and dropout) between.

    ``forward(x) = refine_output(relu(refine_body(body(x)) + shortcut(x)))``. Subclasses name
    their norms (``norm_prefix``), their shortcut projection (``shortcut_name``, ``None`` when the
    widths agree) and the two refine hooks (attention modules).

    Parameters
    ----------
    convs : sequence of (in_channels, out_channels, kernel_size)
        One convolution (no bias) per entry, registered as ``conv1``, ``conv2``, ...
    dropout : float
        ``Dropout2d`` probability after the first ReLU of the body; 0 for none.
    dropout_out : float
        ``Dropout2d`` probability after the body's last norm, before the residual sum; 0 for none.
    """

    norm_prefix: ClassVar[str] = "norm"
    shortcut_name: ClassVar[str] = "skip"

    def __init__(self, convs: Sequence[ConvSpec], *, dropout: float = 0.0, dropout_out: float = 0.0) -> None:
        super().__init__()
        for index, (in_ch, out_ch, kernel) in enumerate(convs, start=1):
            conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
            self.add_module(f"conv{index}", conv)
            self.add_module(f"{self.norm_prefix}{index}", norm2d(out_ch))
        self.depth = len(convs)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.dropout_out = nn.Dropout2d(dropout_out) if dropout_out > 0 else nn.Identity()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Run the convolutions, (N, C_in, H, W) -> (N, C_out, H, W), no final ReLU."""
        for index in range(1, self.depth + 1):
            if index > 1:
                x = self.relu(x)
                x = self.dropout(x) if index == 2 else x
            x = self._modules[f"conv{index}"](x)
            x = self._modules[f"{self.norm_prefix}{index}"](x)
        return self.dropout_out(x)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The identity, or the projection named ``shortcut_name`` when widths differ."""
        projection = getattr(self, self.shortcut_name, None)
        return x if projection is None else projection(x)

    def refine_body(self, y: torch.Tensor) -> torch.Tensor:
        """Hook applied to the body's output before the residual sum (identity here)."""
        return y

    def refine_output(self, y: torch.Tensor) -> torch.Tensor:
        """Hook applied after the final ReLU (identity here)."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.refine_body(self.body(x))
        return self.refine_output(self.relu(y + self.shortcut(x)))


class AttentionGate(nn.Module):
    """Attention U-Net gate on a skip map.

    ``psi = sigmoid(norm(conv(relu(W_g(g) + W_x(x)))))`` and the output is
    ``post_gate(x * psi)``. There is no resize: ``g`` and ``x`` must have the same H and W, else
    PyTorch's broadcasting error is raised (the MA-ResUNet quirk).

    Parameters
    ----------
    gate_channels, skip_channels, inter_channels : int
        Channels of ``g`` (the up-sampled decoder map), of ``x`` (the skip) and inside the gate.
    psi_bias : bool
        Whether the psi convolution carries a bias.
    """

    def __init__(
        self, gate_channels: int, skip_channels: int, inter_channels: int, *, psi_bias: bool = False
    ) -> None:
        super().__init__()
        self.W_g = conv_norm(gate_channels, inter_channels)
        self.W_x = conv_norm(skip_channels, inter_channels)
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, 1, bias=psi_bias), norm2d(1), nn.Sigmoid()
        )
        self.relu = nn.ReLU()

    def post_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Hook applied to the gated skip map (identity here)."""
        return x

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gate ``x`` (N, C_x, H, W) by ``g`` (N, C_g, H, W); returns (N, C_x, H, W)."""
        psi = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
        return self.post_gate(x * psi)


class SegmentationNet(nn.Module):
    """Base of the three networks: (N, 3, H, W) images to (N, 1, H', W') raw logits.

    Attributes
    ----------
    config : dataclass
        The frozen width configuration the network was built from.
    mlbench_name : str
        Canonical model id.
    mlbench_size : str
        ``"full"``, ``"small"`` or ``"custom"``, from ``config``.
    input_multiple : int
        H and W should be multiples of this (see each model's docstring).
    min_input_size : int
        Smallest square side that runs in eval mode.
    """

    mlbench_name: ClassVar[str] = ""
    input_multiple: ClassVar[int] = 1
    min_input_size: ClassVar[int] = 1
    sizes: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def mlbench_size(self) -> str:
        """``"full"`` or ``"small"`` when ``config`` equals that preset, else ``"custom"``."""
        return next((label for label, cfg in self.sizes.items() if cfg == self.config), "custom")


def check_widths(model: str, field: str, values: Sequence[int], length: int) -> tuple[int, ...]:
    """Return ``values`` as a tuple of ``length`` positive ints, else raise ``ModelError``."""
    values = tuple(values)
    ok = len(values) == length and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    )
    if not ok:
        raise ModelError(
            f"{model} config: {field} must be {length} positive int(s), got {values!r}; "
            f"pass e.g. the preset's value with each entry changed."
        )
    return values


def out_channels(model: str, state_dict: Mapping[str, Any], key: str, dim: int = 0) -> int:
    """Return ``state_dict[key].shape[dim]``; raise ``WeightsError`` naming the key if absent."""
    tensor = state_dict.get(key)
    if tensor is None:
        prefixed = any(k.startswith("module.") for k in state_dict)
        hint = " Keys start with 'module.' (DataParallel): strip that prefix." if prefixed else ""
        raise WeightsError(
            f"cannot detect {model} widths: key {key!r} is missing from the state dict "
            f"({len(state_dict)} keys); expected a {model} checkpoint.{hint}"
        )
    return int(tensor.shape[dim])
