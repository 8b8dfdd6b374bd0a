"""HRNetV2 for binary segmentation, as the service's ``hrnet``.

Stem of two stride-2 3x3 convs (1/4 resolution), stage 1 of four bottlenecks, then stages 2/3/4
with 2/3/4 parallel branches (1/4, 1/8, 1/16, 1/32) of 1/4/3 modules, each module four basic
blocks per branch followed by multi-resolution fusion. The head concatenates all branches at
branch 1's size and upsamples the logits by a *scale factor* of 4, so sizes that are not
multiples of 4 come back larger: 250 x 250 gives 252 x 252, silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.models.blocks import (
    ConvSpec,
    ResidualBlock,
    SegmentationNet,
    check_widths,
    conv_norm,
    norm2d,
    out_channels,
    resize_to,
)

NAME = "hrnet"
STAGE_MODULES = (1, 4, 3)
"""Modules in stages 2, 3 and 4."""
BLOCKS = 4
"""Blocks per branch in a module, and bottlenecks in stage 1."""
EXPANSION = 4


@dataclass(frozen=True)
class HrnetConfig:
    """Widths of HRNetV2.

    Parameters
    ----------
    stem : int
        Width of the two stem convolutions.
    stage1 : int
        Bottleneck width of stage 1 (its output is ``4 * stage1`` channels).
    widths : tuple of 4 int
        Branch widths at 1/4, 1/8, 1/16 and 1/32 resolution.
    """

    stem: int = 64
    stage1: int = 64
    widths: tuple[int, ...] = (48, 96, 192, 384)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", check_widths(NAME, "widths", self.widths, 4))
        check_widths(NAME, "stem and stage1", (self.stem, self.stage1), 2)

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> HrnetConfig:
        """Config with these branch widths and stem = stage1 = ``4 * widths[0] // 3``."""
        widths = check_widths(NAME, "widths", widths, 4)
        stem = max(1, 4 * widths[0] // 3)
        return cls(stem, stem, widths)


FULL = HrnetConfig(64, 64, (48, 96, 192, 384))
SMALL = HrnetConfig(16, 16, (8, 16, 32, 64))


class HrnetBlock(ResidualBlock):
    """Residual block with ``bn{i}`` norms and an optional ``downsample`` (1x1 conv + norm)."""

    norm_prefix = "bn"
    shortcut_name = "downsample"

    def __init__(self, convs: Sequence[ConvSpec]) -> None:
        super().__init__(convs)
        in_channels, out_channels = convs[0][0], convs[-1][1]
        same = in_channels == out_channels
        self.downsample = None if same else conv_norm(in_channels, out_channels)


def basic_block(width: int) -> HrnetBlock:
    """Two 3x3 convs at ``width``, identity shortcut."""
    return HrnetBlock([(width, width, 3), (width, width, 3)])


def bottleneck_block(in_channels: int, planes: int) -> HrnetBlock:
    """1x1 (to ``planes``), 3x3, 1x1 (to ``4 * planes``) convs."""
    wide = EXPANSION * planes
    return HrnetBlock([(in_channels, planes, 1), (planes, planes, 3), (planes, wide, 1)])


def _fuse_path(widths: Sequence[int], source: int, target: int) -> nn.Module | None:
    """Map branch ``source`` onto branch ``target``'s width (resolution matched in forward)."""
    if source == target:
        return None
    if source > target:
        return conv_norm(widths[source], widths[target])
    steps = target - source
    chain = [
        conv_norm(widths[source], widths[source], 3, stride=2, relu=True) for _ in range(steps - 1)
    ]
    chain.append(conv_norm(widths[source], widths[target], 3, stride=2))
    return nn.Sequential(*chain)


class HighResolutionModule(nn.Module):
    """Parallel branches of basic blocks, then fusion by sum into every branch.

    Lower resolutions are mapped by 1x1 conv + norm and bilinearly resized to the target
    branch's *size*; higher resolutions by chained stride-2 3x3 convs (+ norm, ReLU between).
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        count = len(widths)
        self.branches = nn.ModuleList(
            nn.Sequential(*(basic_block(width) for _ in range(BLOCKS))) for width in widths
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_path(widths, j, i) for j in range(count)) for i in range(count)
        )
        self.relu = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map a list of (N, C_b, H_b, W_b) maps, one per branch, to the same shapes."""
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        return [self.relu(self._fuse(target, xs)) for target in range(len(xs))]

    def _fuse(self, target: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """Sum every branch's contribution to ``target``, in branch order as the service does
        (float sums depend on their order)."""
        size = xs[target].shape[-2:]
        out = None
        for source, x in enumerate(xs):
            path = self.fuse_layers[target][source]
            y = x if path is None else path(x)
            if source > target:
                y = resize_to(y, size, align_corners=True)
            out = y if out is None else out + y
        return out


def _transition(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
    """Adapt existing branches (3x3 conv when widths change) and add new stride-2 branches."""
    layers: list[nn.Module | None] = []
    for index, width in enumerate(current):
        if index < len(previous):
            same = previous[index] == width
            layers.append(None if same else conv_norm(previous[index], width, 3, relu=True))
            continue
        steps = index + 1 - len(previous)
        outs = [previous[-1]] * (steps - 1) + [width]
        chain = [conv_norm(previous[-1], out, 3, stride=2, relu=True) for out in outs]
        layers.append(nn.Sequential(*chain))
    return nn.ModuleList(layers)


class HRNet(SegmentationNet):
    """HRNetV2: (N, 3, H, W) -> (N, 1, 4 * ceil(H / 4), 4 * ceil(W / 4)) raw logits.

    ``min_input_size`` is 33: below it the 1/32 branch is 1x1 and ``InstanceNorm2d`` refuses it.

    Parameters
    ----------
    config : HrnetConfig
        Widths; ``FULL`` reproduces the service's checkpoints (65,846,401 parameters).
    """

    mlbench_name = NAME
    input_multiple = 4
    min_input_size = 33
    sizes = {"full": FULL, "small": SMALL}

    def __init__(self, config: HrnetConfig = FULL) -> None:
        super().__init__(config)
        stem, planes, widths = config.stem, config.stage1, config.widths
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm2d(stem)
        self.conv2 = nn.Conv2d(stem, stem, 3, stride=2, padding=1, bias=False)
        self.bn2 = norm2d(stem)
        self.relu = nn.ReLU()
        first = bottleneck_block(stem, planes)
        rest = (bottleneck_block(EXPANSION * planes, planes) for _ in range(BLOCKS - 1))
        self.layer1 = nn.Sequential(first, *rest)
        previous: Sequence[int] = [EXPANSION * planes]
        for stage, modules in enumerate(STAGE_MODULES, start=2):
            current = widths[:stage]
            setattr(self, f"transition{stage - 1}", _transition(previous, current))
            layers = (HighResolutionModule(current) for _ in range(modules))
            setattr(self, f"stage{stage}", nn.Sequential(*layers))
            previous = current
        total = sum(widths)
        self.last_layer = nn.Sequential(
            nn.Conv2d(total, total, 1), norm2d(total), nn.ReLU(), nn.Conv2d(total, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` (N, 3, H, W); returns logits (N, 1, 4 * ceil(H / 4), 4 * ceil(W / 4))."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        ys = [self.layer1(y)]
        for stage in range(2, 2 + len(STAGE_MODULES)):
            transition = getattr(self, f"transition{stage - 1}")
            ys = getattr(self, f"stage{stage}")(_apply_transition(transition, ys))
        size = ys[0].shape[-2:]
        y = torch.cat([ys[0], *(resize_to(branch, size, align_corners=True) for branch in ys[1:])], dim=1)
        y = self.last_layer(y)
        return F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=True)


def _apply_transition(transition: nn.ModuleList, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs of the next stage: existing branches (adapted or not), new ones from the last."""
    xs = []
    for index, layer in enumerate(transition):
        source = ys[index] if index < len(ys) else ys[-1]
        xs.append(source if layer is None else layer(source))
    return xs


def detect_config(state_dict: Mapping[str, Any]) -> HrnetConfig:
    """Read stem, stage-1 and branch widths from ``conv1``, ``layer1.0.conv1`` and stage 4."""
    widths = tuple(
        out_channels(NAME, state_dict, f"stage4.0.branches.{b}.0.conv1.weight") for b in range(4)
    )
    stem = out_channels(NAME, state_dict, "conv1.weight")
    return HrnetConfig(stem, out_channels(NAME, state_dict, "layer1.0.conv1.weight"), widths)
