"""MA-ResUNet, the service's ``resunet_advanced``.

A residual U-Net whose blocks carry multi-stage attention (SimAM, then triplet attention, then a
1x1 fusion conv-norm-ReLU plus a residual), with attention gates on the skips and multi-head
self-attention (no residual inside it) over all H x W tokens of the 1/16 bottleneck. SimAM and
triplet attention follow the service's code, which differs from their papers; the golden outputs
of the service's own classes pin them (``tests/test_golden.py``). It has no resize guard: H and W must be multiples of 16,
else the attention gate's ``W_g(g) + W_x(x)`` raises PyTorch's size-mismatch error (1000 x 1000:
``The size of tensor a (124) must match the size of tensor b (125) at non-singleton dimension 3``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlbench.errors import ModelError
from mlbench.models.blocks import (
    AttentionGate,
    ResidualBlock,
    SegmentationNet,
    channel_pool,
    check_widths,
    conv_norm,
    out_channels,
)

NAME = "ma_resunet"
ENCODER_DEPTHS = (2, 2, 3, 3)
DECODER_DEPTH = 2
DROPOUT = 0.1
"""``Dropout2d`` probability after the first ReLU of every residual block (train mode only)."""
WINDOW = 7
"""Window of the (unused) relative position bias table: (2 * 7 - 1) ** 2 = 169 rows."""


@dataclass(frozen=True)
class MaConfig:
    """Widths of MA-ResUNet.

    Parameters
    ----------
    widths : tuple of 4 int
        Encoder widths, top to bottom (the decoder mirrors them).
    bottleneck : int
        Width of the bottleneck; must be divisible by ``heads``.
    heads : int
        Heads of the bottleneck self-attention.
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    bottleneck: int = 512
    heads: int = 8


    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", check_widths(NAME, "widths", self.widths, 4))
        check_widths(NAME, "bottleneck and heads", (self.bottleneck, self.heads), 2)
        if self.bottleneck % self.heads:
            raise ModelError(
                f"{NAME} config: bottleneck ({self.bottleneck}) must be divisible by heads "
                f"({self.heads}); choose a bottleneck width that is a multiple of {self.heads}."
            )

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> MaConfig:
        """Config with these encoder widths, a bottleneck twice the last one and 8 heads."""
        widths = check_widths(NAME, "widths", widths, 4)
        return cls(widths, 2 * widths[-1], 8)


FULL = MaConfig((32, 64, 128, 256), 512, 8)
SMALL = MaConfig((16, 32, 48, 64), 128, 8)


class SimAM(nn.Module):
    """SimAM as the service computes it (not as its paper does); (N, C, H, W) kept.

    Per channel: ``y = (x - mean) / sqrt(var + 1e-4)`` with the population variance over H x W,
    and the output is ``x * sigmoid(-y)``: above-average activations are damped, not boosted.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        centred = x - mean
        variance = centred.square().sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
        return x * torch.sigmoid(-(centred / (variance + self.e_lambda).sqrt()))


class TripletAttention(nn.Module):
    """Three sigmoid gates multiplied onto ``x``, as the service computes them; (N, C, H, W) kept.

    ``conv_ch`` (1 x 7) gates rows: ``x`` averaged over W, then channel mean and max, (N, 2, H, 1);
    ``conv_cw`` (7 x 1) gates columns: ``x`` averaged over H, then channel mean and max,
    (N, 2, 1, W); ``conv_hw`` (7 x 7) gates pixels from the channel mean and max of ``x``.
    The output is ``x * rows * columns * pixels``. A 1 x 7 kernel on an (H, 1) map (and 7 x 1
    on a (1, W) map) sees only its centre tap: those two gates are per-row and per-column
    scalings of the pooled profiles, not convolutions along them.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv_ch = nn.Conv2d(2, 1, (1, kernel_size), padding=(0, pad), bias=False)
        self.conv_cw = nn.Conv2d(2, 1, (kernel_size, 1), padding=(pad, 0), bias=False)
        self.conv_hw = nn.Conv2d(2, 1, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.sigmoid(self.conv_ch(channel_pool(x.mean(dim=3, keepdim=True))))
        columns = torch.sigmoid(self.conv_cw(channel_pool(x.mean(dim=2, keepdim=True))))
        pixels = torch.sigmoid(self.conv_hw(channel_pool(x)))
        return x * rows * columns * pixels


class MultiStageAttention(nn.Module):
    """SimAM (``stage1``), triplet attention (``stage2``), ``fusion`` (1x1 conv, norm, ReLU), + x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stage1 = SimAM()
        self.stage2 = TripletAttention()
        self.fusion = conv_norm(channels, channels, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fusion(self.stage2(self.stage1(x)))


class MaBlock(ResidualBlock):
    """3x3 conv, norm, ReLU, dropout, 3x3 conv, norm, multi-stage attention, + shortcut, ReLU.

    The shortcut is ``skip`` (1x1 conv + norm) when the widths differ. The service's blocks
    use their class default ``Dropout2d(0.1)`` (the model's ``dropout_rate=0.2`` never reaches
    them); it only acts in train mode.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        convs = [(in_channels, out_channels, 3), (out_channels, out_channels, 3)]
        super().__init__(convs, dropout=DROPOUT)
        self.attention = MultiStageAttention(out_channels)
        self.skip = conv_norm(in_channels, out_channels) if in_channels != out_channels else None

    def refine_body(self, y: torch.Tensor) -> torch.Tensor:
        return self.attention(y)


class MaGate(AttentionGate):
    """Attention gate (psi conv with bias) followed by triplet attention (``refine``)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, channels // 2, psi_bias=True)
        self.refine = TripletAttention()

    def post_gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(x)


class BottleneckAttention(nn.Module):
    """Multi-head self-attention over all H x W tokens; (N, C, H, W) kept.

    As in the service, the module returns ``proj(attention @ v)`` with **no** residual: the
    bottleneck's next block sees only the attended map.

    ``qkv`` is a depthwise 3x3 conv then a 1x1 conv to 3C (no biases); ``proj`` a 1x1 conv with
    bias. The attention matrix (N, heads, H*W, H*W) is built explicitly with ``matmul``, so its
    memory is quadratic in tokens, as in the service. ``relative_position_bias_table`` exists in
    the service's checkpoints but the forward never uses it.
    """

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(channels // heads)
        table = torch.empty((2 * WINDOW - 1) ** 2, heads)
        self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        self.qkv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, 3 * channels, 1, bias=False),
        )
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.unbind(dim=1)
        attention = torch.softmax(torch.matmul(q.transpose(-2, -1), k) * self.scale, dim=-1)
        out = torch.matmul(v, attention.transpose(-2, -1)).reshape(n, c, h, w)
        return self.proj(out)


def _stage(in_channels: int, out_channels: int, depth: int) -> nn.Sequential:
    rest = (MaBlock(out_channels, out_channels) for _ in range(depth - 1))
    return nn.Sequential(MaBlock(in_channels, out_channels), *rest)


class MaResUNet(SegmentationNet):
    """MA-ResUNet: (N, 3, H, W) -> (N, 1, H, W) raw logits; H, W multiples of 16, at least 32.

    Parameters
    ----------
    config : MaConfig
        Widths; ``FULL`` reproduces the service's checkpoints (19,573,189 parameters).
    """

    mlbench_name = NAME
    input_multiple = 16
    min_input_size = 32
    sizes = {"full": FULL, "small": SMALL}

    def __init__(self, config: MaConfig = FULL) -> None:
        super().__init__(config)
        widths = config.widths
        self.init_conv = conv_norm(3, widths[0], 7, relu=True)
        inputs = (widths[0],) + widths[:-1]
        for level, (in_ch, width, depth) in enumerate(zip(inputs, widths, ENCODER_DEPTHS), 1):
            setattr(self, f"encoder{level}", _stage(in_ch, width, depth))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            MaBlock(widths[-1], config.bottleneck),
            BottleneckAttention(config.bottleneck, config.heads),
            MaBlock(config.bottleneck, config.bottleneck),
        )
        previous = config.bottleneck
        for level in range(len(widths), 0, -1):
            width = widths[level - 1]
            setattr(self, f"upconv{level}", nn.ConvTranspose2d(previous, width, 2, stride=2))
            setattr(self, f"att{level}", MaGate(width))
            setattr(self, f"decoder{level}", _stage(2 * width, width, DECODER_DEPTH))
            previous = width
        head = widths[0] // 2
        self.final_conv = nn.Sequential(
            *conv_norm(widths[0], head, 3, relu=True), nn.Conv2d(head, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` (N, 3, H, W); returns logits (N, 1, H, W). No resize guard."""
        levels = len(self.config.widths)
        skips = []
        y = self.init_conv(x)
        for level in range(1, levels + 1):
            y = getattr(self, f"encoder{level}")(y)
            skips.append(y)
            y = self.pool(y)
        y = self.bottleneck(y)
        for level in range(levels, 0, -1):
            y = getattr(self, f"upconv{level}")(y)
            gated = getattr(self, f"att{level}")(y, skips[level - 1])
            y = getattr(self, f"decoder{level}")(torch.cat([gated, y], dim=1))
        return self.final_conv(y)


def detect_config(state_dict: Mapping[str, Any]) -> MaConfig:
    """Read widths from ``encoder{i}.0.conv1.weight``, heads from the bias table's columns."""
    keys = (f"encoder{level}.0.conv1.weight" for level in range(1, 5))
    widths = tuple(out_channels(NAME, state_dict, key) for key in keys)
    bottleneck = out_channels(NAME, state_dict, "bottleneck.0.conv1.weight")
    heads = out_channels(NAME, state_dict, "bottleneck.1.relative_position_bias_table", dim=1)
    return MaConfig(widths, bottleneck, heads)
