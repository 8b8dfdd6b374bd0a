"""Tiny models with known answers for the probe, estimate and tiling tests."""

from __future__ import annotations

import torch
from torch import nn


class ToyNet(nn.Sequential):
    """conv3x3 (3->4) -> ReLU -> conv1x1 (4->1). Receptive-field radius 1.

    For input (1, 3, H, W) float32 the live activations peak at the ReLU: conv output and
    ReLU output, 2 * 4 * H * W * 4 = 32 * H * W bytes.
    """

    input_multiple = 1

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


class StridedNet(ToyNet):
    """ToyNet that declares a stride of 8 (for max_input_size)."""

    input_multiple = 8


class LocalNet(nn.Sequential):
    """Two 3x3 convs, no normalisation: receptive-field radius 2, so tiling is exact."""

    input_multiple = 1

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))


class FlakyNet(LocalNet):
    """LocalNet that raises ``torch.OutOfMemoryError`` for inputs wider than ``limit``, or, with
    ``only_copies=True``, unless it runs on copied parameters (the CPU fallback)."""

    def __init__(self, limit: int = 10**9, only_copies: bool = False) -> None:
        super().__init__()
        self.limit, self.only_copies = limit, only_copies
        self.original = self[0].weight.data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copied = self[0].weight.data_ptr() != self.original
        if x.shape[-1] > self.limit or (self.only_copies and not copied):
            raise torch.OutOfMemoryError(f"simulated: out of memory at width {x.shape[-1]}")
        return super().forward(x)


class TupleNet(nn.Module):
    """Returns a tuple and a dict, to check nested shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        return y, {"half": y[:, :1]}


class NormNet(nn.Sequential):
    """conv3x3 -> InstanceNorm2d -> ReLU -> conv3x3 -> GroupNorm(2) -> ReLU -> conv1x1: receptive-field
    radius 2, but every norm depends on the whole input, so plain tiles differ from the whole image."""

    input_multiple = 1

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 1, 1))
            for norm in (self[1], self[4]):
                nn.init.normal_(norm.weight, 1.0, 0.3)
                nn.init.normal_(norm.bias, 0.0, 0.3)


class FlakyNormNet(NormNet):
    """NormNet that raises ``torch.OutOfMemoryError`` for inputs wider than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: out of memory at width {x.shape[-1]}")
        return super().forward(x)


class ProfileNet(nn.Module):
    """Gates from means over one spatial axis and no norm, as triplet attention (``x.mean(dim=3)``,
    a row profile) and coordinate attention (``nn.AdaptiveAvgPool2d((1, None))``, a column profile)
    compute them. Receptive-field radius 2 otherwise, so tiles given the whole image's profiles are exact."""

    input_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
            self.columns = nn.AdaptiveAvgPool2d((1, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y * torch.sigmoid(4 * y.mean(dim=3, keepdim=True) - 2) * torch.sigmoid(3 - 5 * self.columns(y))
        return self.conv2(y + y.sum(dim=-2, keepdim=True) / y.shape[-2])


class ReduceNet(nn.Module):
    """Whole-map reductions and no norm, as users write them: a squeeze-and-excitation
    (``nn.AdaptiveAvgPool2d(1)``), CBAM-style channel attention (``x.mean`` and ``x.amax``),
    SimAM (a sum over H x W divided by the map's size, ``torch.var``) and a gate from ``std``.
    Receptive-field radius 2 otherwise, so tiles that pool the reductions are exact."""

    input_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.squeeze, self.excite = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 8)
            self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y * torch.sigmoid(self.excite(self.squeeze(y).flatten(1)))[..., None, None]
        y = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True) - torch.amax(y, dim=(-2, -1), keepdim=True))
        y = self.conv2(y)
        centred = y - y.mean((2, 3), keepdim=True)
        variance = centred.square().sum(dim=(2, 3), keepdim=True) / (y.shape[2] * y.shape[3])
        y = y * torch.sigmoid(centred / (variance + 1e-4).sqrt()) + torch.var(y, (2, 3), keepdim=True)
        return self.head(y / y.std(dim=(2, 3), keepdim=True))


class AttentionNet(nn.Module):
    """A stride-8 map with an ``InstanceNorm``, then self-attention over its positions whose softmax is
    written by hand (``exp`` over its sum over the last axis, of an (N, 1, P, P) matrix) or not
    (``manual=False``: ``torch.softmax``), and a mean over the channels of the map in channels-last
    layout. Neither is a reduction of a feature map, though both are means or sums over the last axis
    of a 4-D tensor: tiled, both variants must compute the same."""

    input_multiple = 8

    def __init__(self, manual: bool = True) -> None:
        super().__init__()
        self.manual = manual
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(6)
            self.down, self.norm = nn.Conv2d(3, 8, 8, stride=8), nn.InstanceNorm2d(8)
            self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.down(x))
        n, c, h, w = z.shape
        q = z.flatten(2).transpose(1, 2)[:, None]  # (N, 1, P, C)
        scores = q @ q.transpose(-1, -2) / c ** 0.5
        if self.manual:
            scores = (scores - scores.amax(-1, keepdim=True)).exp()
            weights = scores / scores.sum(-1, keepdim=True)
        else:
            weights = torch.softmax(scores, -1)
        z = z + (weights @ q)[:, 0].transpose(1, 2).reshape(n, c, h, w)
        last = z.permute(0, 2, 3, 1)  # (N, H, W, C)
        z = (last - last.mean(-1, keepdim=True)).permute(0, 3, 1, 2)
        return nn.functional.interpolate(self.head(z), scale_factor=8)
