"""One pooled norm or reduction call's statistics per tile, and how they combine into the whole image's.

:class:`CallStatistics` keeps, per tile, the mean and second moment (or the maximum) of one
call's input over the tile's owned part, with its pixel count and, where a prior was recorded
(:meth:`mlbench.probes.pooled_norms.PooledNorms.record`), the prior's per part; it combines
them weighted by pixel count and extrapolates the tiles that ran to the whole image while some
have not (:meth:`CallStatistics.pooled`). The moment functions measure the owned parts: per
tile on slices, or for small maps all parts at once with masks.
"""

from __future__ import annotations

import torch

__all__ = ["CallStatistics", "MASKED_ELEMENTS", "masked_moments", "group_moments", "mean_var"]


class CallStatistics:
    """One norm or reduction call's statistics per tile: mean and second moment (for a maximum:
    the maximum), (T, 2, N * G) float64, and pixel count; with a prior, the prior's per tile and
    over the whole image."""

    def __init__(self, tiles: int, n: int, groups: int, device: torch.device) -> None:
        self._both = torch.zeros(2, tiles, 2, n * groups, dtype=torch.float64, device=device)
        self.moments = self._both[0]
        """Per tile that ran: the latest mean and second moment over its owned part."""
        self.count = [0.0] * tiles
        self.seen = [False] * tiles
        self.prior: tuple[list[float], torch.Tensor] | None = None
        self.full_scale = False
        """True: the prior ran the image itself, so its whole-image statistics are used for every tile."""

    def set_prior(self, moments: torch.Tensor, count: list[float], full_scale: bool = False) -> None:
        """Per tile (T, 2, N * G) moments and counts of a prior run; its whole-image moments.
        ``full_scale``: the prior ran the image itself (not a downsampled copy), and its parts may
        be fewer than the tiles (one, the whole image: only the whole is used)."""
        if sum(count) > 0:
            self._both[1][:len(count)] = moments
            self.prior = (count, (_weights([count], moments) @ moments.flatten(1))[0])
            self.full_scale = full_scale

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Count-weighted mean and variance over the tiles that ran, (N * G,); None if none counts.

        With a prior, while some tiles have not run: those statistics extrapolated to the whole
        image as the prior says the whole differs from the part that ran (per channel, the mean
        shifted and the variance scaled, as an affine change of the features would). With a
        full-scale prior: its whole-image statistics, whatever ran."""
        if self.full_scale:
            return mean_var(self.prior[1].view(2, -1))
        if not sum(self.count) > 0:
            return None
        if self.prior is None or all(self.seen):
            return mean_var((_weights([self.count], self.moments) @ self.moments.flatten(1)).view(2, -1))
        count, whole = self.prior
        part = [c if ran else 0.0 for c, ran in zip(count, self.seen)]
        if not sum(part) > 0:
            return mean_var((_weights([self.count], self.moments) @ self.moments.flatten(1)).view(2, -1))
        weights = _weights([self.count, part], self.moments)  # (2, T): seen tiles, their part of the prior
        pooled = torch.bmm(weights[:, None], self._both.flatten(2)).view(2, -1)
        mean, var = mean_var(torch.cat([pooled, whole[None]]).view(3, 2, -1).transpose(0, 1))
        ratio = (var[2] / var[1].clamp_min(1e-12)).clamp(0.25, 4.0)
        return mean[0] + ratio.sqrt() * (mean[2] - mean[1]), var[0] * ratio


    def maximum(self) -> torch.Tensor | None:
        """The largest value over the tiles that ran and, for those that have not, the prior's
        parts, (N * G,); None if no part has pixels. After a full-scale prior no tile is measured, so
        that is the prior's maximum."""
        parts = [self.moments[tile, 0] for tile, count in enumerate(self.count) if count > 0]
        if self.prior is not None:
            parts += [self._both[1][tile, 0] for tile, count in enumerate(self.prior[0])
                      if count > 0 and not self.seen[tile]]
        return torch.stack(parts).amax(0) if parts else None


def _weights(counts: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Counts normalised to sum 1 per row, (rows, T) (one row: (1, T)), in ``like``'s dtype and device."""
    return torch.tensor([[c / sum(row) for c in row] for row in counts], dtype=like.dtype, device=like.device)


def mean_var(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from (2, ...) mean and second moment."""
    mean = moments[0]
    return mean, (moments[1] - mean.square()).clamp_min(0)


def group_moments(z: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean and second moment per (sample, group) of (N, C, ...), (2, N * G) float64; the variance
    is computed about the mean in z's dtype (two passes: faster than ``var_mean`` on the CPU)."""
    grouped = z if groups == z.shape[1] else z.reshape(z.shape[0], groups, -1)
    dims = tuple(range(2, grouped.dim()))
    mean = grouped.mean(dims, keepdim=True)
    centred = grouped - mean
    var = (centred * centred).mean(dims).flatten().double()
    mean = mean.flatten().double()
    return torch.stack([mean, var.addcmul_(mean, mean)])


MASKED_ELEMENTS = 65536
"""Largest map (elements per tile: channels x height x width) whose owned-part statistics are
computed with masks rather than per tile; measured on 2 CPU cores, masks were 1.4 to 4 times
faster up to 32k elements and 7 times slower at 262k."""


def masked_moments(maps: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean and second moment per (part, sample, channel) of (B or 1, N, C, H, W) maps under
    (B, 1, 1, H, W) masks, (B, 2, N * C) float64; the variance computed about the mean."""
    counts = counts.clamp_min(1)  # a part with no pixels: zeros, weighted 0 by its count
    mean = (maps * masks).sum((-2, -1)) / counts
    centred = (maps - mean[..., None, None]) * masks
    var = (centred * centred).sum((-2, -1)) / counts
    moments = torch.stack([mean, var], 1).double()
    moments[:, 1].addcmul_(moments[:, 0], moments[:, 0])
    return moments.flatten(2)
