"""CBAM-ResUNet, the service's ``resunet_small``.

A residual U-Net with CBAM attention (squeeze-excite, then spatial attention) in every block and
attention gates on the skips. Five encoder levels, each followed by a 2x2 max-pool, so the
bottleneck runs at 1/32 of the input. Bilinear resize guards keep any input size: where an
up-sampled map and its skip differ, the up-sampled map is resized to the skip's size, and the
output is resized to the input's size. Those are the only guards: as in the service, an input
whose 1/32 bottleneck map would be 1 x 1 (both sides under 64 px) makes ``InstanceNorm2d`` refuse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlbench.models.blocks import (
    AttentionGate,
    ResidualBlock,
    SegmentationNet,
    SpatialAttention,
    check_widths,
    conv_norm,
    out_channels,
    resize_to,
)

NAME = "cbam_resunet"
DROPOUT = 0.15
"""The service's ``dropout_rate``: its blocks drop ``DROPOUT / 2`` after the first ReLU (and in the
squeeze-excite MLP) and ``DROPOUT`` after the second norm; the bottleneck's blocks use 1.2 times
that; the stem and the head drop ``DROPOUT / 2``. Train mode only."""


@dataclass(frozen=True)
class CbamConfig:
    """Widths of CBAM-ResUNet.

    Parameters
    ----------
    widths : tuple of 5 int
        Encoder widths, top to bottom (the decoder mirrors them).
    bottleneck : int
        Width of the two bottleneck blocks.
    """

    widths: tuple[int, ...] = (48, 96, 192, 384, 512)
    bottleneck: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", check_widths(NAME, "widths", self.widths, 5))
        check_widths(NAME, "bottleneck", (self.bottleneck,), 1)

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> CbamConfig:
        """Config with these encoder widths and a bottleneck twice the last one."""
        widths = check_widths(NAME, "widths", widths, 5)
        return cls(widths, 2 * widths[-1])


FULL = CbamConfig((48, 96, 192, 384, 512), 1024)
SMALL = CbamConfig((16, 32, 48, 64, 80), 160)
"""Small widths the service's own loader rebuilds: it reads the five ``downs.{i}`` widths from a
checkpoint and always builds a bottleneck twice the last one."""


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool, MLP (reduction 16, at least 8 hidden), sigmoid.

    ``fc`` is ``Linear, ReLU, Dropout, Linear, Sigmoid`` (Linears at 0 and 3, as in the service's
    checkpoints). Shape kept: (N, C, H, W).
    """

    def __init__(self, channels: int, dropout: float, reduction: int = 16, min_hidden: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class CbamBlock(ResidualBlock):
    """3x3 conv, norm, ReLU, dropout, 3x3 conv, norm, dropout, + shortcut, ReLU, SE, spatial attention.

    The shortcut is ``adjust_channels`` (1x1 conv, no norm) when the widths differ.
    """

    shortcut_name = "adjust_channels"

    def __init__(self, in_channels: int, out_channels: int, dropout: float = DROPOUT) -> None:
        convs = [(in_channels, out_channels, 3), (out_channels, out_channels, 3)]
        super().__init__(convs, dropout=dropout / 2, dropout_out=dropout)
        self.adjust_channels = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else None
        )
        self.se = SqueezeExcite(out_channels, dropout / 2)
        self.spatial_attention = SpatialAttention()

    def refine_output(self, y: torch.Tensor) -> torch.Tensor:
        return self.spatial_attention(self.se(y))


class CbamGate(AttentionGate):
    """Attention gate (psi conv without bias, at least 8 inner channels) followed by spatial
    attention on the gated skip."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, max(channels // 2, 8))
        self.spatial_attention = SpatialAttention()

    def post_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_attention(x)


class CbamResUNet(SegmentationNet):
    """CBAM-ResUNet: (N, 3, H, W) -> (N, 1, H, W) raw logits, for any H, W that leave the
    bottleneck more than one pixel (every square of 64 px or more; 63 x 100 works, 63 x 63 not).

    Below that ``InstanceNorm2d`` refuses the 1 x 1 bottleneck map (in eval mode too), exactly as
    the service's class does.

    Parameters
    ----------
    config : CbamConfig
        Widths; ``FULL`` reproduces the service's checkpoints (58,060,957 parameters).
    """

    mlbench_name = NAME
    input_multiple = 1
    min_input_size = 64
    sizes = {"full": FULL, "small": SMALL}

    def __init__(self, config: CbamConfig = FULL) -> None:
        super().__init__(config)
        widths, bottleneck = config.widths, config.bottleneck
        self.init_conv = nn.Sequential(
            *conv_norm(3, widths[0], 7, relu=True), nn.Dropout2d(DROPOUT / 2)
        )
        inputs = (widths[0],) + widths[:-1]
        self.downs = nn.ModuleList(CbamBlock(i, o) for i, o in zip(inputs, widths))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            CbamBlock(widths[-1], bottleneck, 1.2 * DROPOUT),
            CbamBlock(bottleneck, bottleneck, 1.2 * DROPOUT),
        )
        ups: list[nn.Module] = []
        previous = bottleneck
        for width in reversed(widths):
            ups += [nn.ConvTranspose2d(previous, width, 2, stride=2), CbamBlock(2 * width, width)]
            previous = width
        self.ups = nn.ModuleList(ups)
        self.attentions = nn.ModuleList(CbamGate(width) for width in reversed(widths))
        head = widths[0] // 2
        self.final_conv = nn.Sequential(
            *conv_norm(widths[0], head, 3, relu=True), nn.Dropout2d(DROPOUT / 2), nn.Conv2d(head, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` (N, 3, H, W); returns logits (N, 1, H, W)."""
        size = x.shape[-2:]
        skips = []
        y = self.init_conv(x)
        for down in self.downs:
            y = down(y)
            skips.append(y)
            y = self.pool(y)
        y = self.bottleneck(y)
        for level, gate in enumerate(self.attentions):
            skip = skips[-1 - level]
            y = self.ups[2 * level](y)
            if y.shape[-2:] != skip.shape[-2:]:
                y = resize_to(y, skip.shape[-2:])
            y = self.ups[2 * level + 1](torch.cat([gate(y, skip), y], dim=1))
        y = self.final_conv(y)
        return y if y.shape[-2:] == size else resize_to(y, size)


def detect_config(state_dict: Mapping[str, Any]) -> CbamConfig:
    """Read the widths from ``downs.{i}.conv1.weight`` and ``bottleneck.0.conv1.weight``."""
    widths = tuple(out_channels(NAME, state_dict, f"downs.{i}.conv1.weight") for i in range(5))
    return CbamConfig(widths, out_channels(NAME, state_dict, "bottleneck.0.conv1.weight"))
