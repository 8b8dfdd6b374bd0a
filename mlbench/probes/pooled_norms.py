"""Whole-image normalisation statistics for tiled inference, gathered from the tiles.

An ``InstanceNorm`` or ``GroupNorm`` normalises by the mean and variance of what it sees, so
a tile normalised by its own statistics departs from the whole image. :class:`PooledNorms`
makes every such norm of a model normalise each tile by statistics of the whole image instead:
the tiles partition the image (each owns the part nearer to it than to its neighbours), and at
each norm call the mean and variance over the owned parts of the tiles running now (a batch,
measured live) are combined, weighted by pixel count, with those of the other tiles from their
latest run.

A norm's input depends on the norms before it, so this is exact in one pass only when every
tile runs in the same batch: then each norm sees every owned part at once. With fewer tiles
per batch, the tiles that have not run yet are stood in for by a prior,
:meth:`PooledNorms.record`: one forward of the whole image downsampled to as many pixels as one
batch of tiles (so no more memory than a batch; the image itself when it fits), recording each
norm call's statistics over every tile's part of it. The statistics of the
tiles that ran are then extrapolated to the whole image as the prior says the whole differs
from their part (per channel, the mean shifted and the variance scaled: an affine change of the
features between the scales). A prior that ran the image itself (``NormPrior.full_scale``) holds
the whole image's statistics: every tile is normalised by them and none is measured. They come
from the whole image's features, not the tiles', which differ near the tiles' borders (less
context), so the tiles come closer to the whole image than with every tile in one batch.
``predict_tiled`` runs one such pass (``norm_stats="image"``) or repeats passes until they settle
(``norm_stats="pooled"``; after a full-scale prior one pass is final). Memory: one batch of tiles, plus a
mean and a second moment per channel, norm call and tile.

Reductions of a whole map (a squeeze-and-excitation's mean, CBAM's channel attention, SimAM's
mean and variance) are pooled the same way, in the same sequence of calls:
:mod:`mlbench.probes.pooled_reductions` recognises them in the tile's forward. Means over one
axis (MA-ResUNet's triplet attention) take the whole image's profile where it is known
(:mod:`mlbench.probes.pooled_profiles`); attention over all positions still sees one tile.

Tried and measured (three small models, 512 px samples, 256 px tiles in batches of 4; relative
L2 error of the logits against all tiles in one batch): the prior's whole-image statistics
standing in for every missing tile, 0.06 to 0.15 on the 8-bit spheroids; its per-part
statistics, 0.015 to 0.055; extrapolated as above, 0.011 to 0.056 (0.11 and 0.19 for MA-ResUNet
and HRNet on the cluttered nuclei); without a prior, 0.07 to 0.34. A prior at the whole image's
size brought the nuclei to 0.006 to 0.035 extrapolated, for one more whole-image forward (on
1024 px images with 512 px tiles, against all tiles in one batch: mask IoU 0.84 -> 0.98 for HRNet
and 0.9977 -> 0.9997 for MA-ResUNet on the nuclei). Its own statistics for every tile, instead of
extrapolating the tiles', came closer still, to the whole image itself: what the prior at a batch's
pixels now gives where the image fits in them (a batch of four 256 px tiles holds a 512 px image;
mask IoU against the whole image, 256 px tiles: CBAM-ResUNet's RGB spheroids 0.9972 -> 1.0,
HRNet's nuclei 0.833 -> 0.856; 1024 px nuclei, 512 px tiles: HRNet 0.886 -> 0.920, where all tiles
in one batch give 0.885). Running corner tiles first did worse;
so did, in the iterative method of an earlier version, freezing every statistic from the previous
pass (it diverged), alternating the tile order, and Anderson mixing (at most one pass saved in
ten); so did, for HRNet, extrapolating the statistics from priors at two scales to the full one
(0.74 against 0.84), and a prior from a batch of full-resolution crops, one per tile (0.68 to
0.82): the statistics follow the scale and the context, and crops have less of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mlbench.probes._hooks import plain_torch
from mlbench.probes.pooled_moments import MASKED_ELEMENTS, CallStatistics, group_moments, masked_moments, mean_var
from mlbench.probes.pooled_profiles import pooled_profile, tile_slices
from mlbench.probes.pooled_reductions import Reduction, SpatialReductions
from mlbench.probes.spatial_maps import MapProbe

__all__ = ["Box", "NormPrior", "PooledNorms", "pooled_norm_modules"]

Box = tuple[int, int, int, int]
"""``(top, bottom, left, right)`` of the part of a tile it owns, in the tile's pixels."""


def pooled_norm_modules(model: nn.Module) -> list[nn.Module]:
    """The norms whose output depends on the extent of their input: ``InstanceNorm1d/2d/3d``
    without running statistics (or in training mode) and ``GroupNorm``."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            found.append(module)
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if module.training or not module.track_running_stats:
                found.append(module)
    return found


@dataclass(frozen=True)
class NormPrior:
    """Statistics of every norm and reduction call in one forward of a downsampled whole image,
    over each tile's owned part scaled to it: what stands in for the tiles that have not run yet."""

    calls: tuple[tuple[torch.Tensor, list[float]], ...]
    """Per call, in call order: mean and second moment (a maximum's call: the maximum) per part,
    (T, 2, N * G) float64, and each part's pixel count."""
    size: tuple[int, int] = (0, 0)
    """(H, W) of the downsampled image that was run."""
    reduces: bool = True
    """Whether the model reduced a whole map (if not, the tiles need no :class:`SpatialReductions`)."""
    full_scale: bool = False
    """Whether the forward ran the image itself rather than a downsampled copy: then its statistics
    are the whole image's, and every tile is normalised by them (none is measured)."""
    profiles: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per call index of a mean over one spatial axis, the forward's profile, (N, C, L) float64
    (:mod:`mlbench.probes.pooled_profiles`; used where the forward ran the image itself)."""


class PooledNorms:
    """Pooled statistics of every extent-dependent norm of ``model``, per tile and norm call.

    Parameters
    ----------
    model : nn.Module
        Its norms are patched while :meth:`tiles` is entered, and restored after.
    boxes : sequence of Box
        Per tile (by index), the part it owns, in its own pixels.
    size : (int, int)
        (H, W) of every tile as it enters the model (padded); a map of another resolution scales
        the boxes by its size over this.
    prior : NormPrior, optional
        From :meth:`record` with these tiles' parts: the tiles that ran are extrapolated to the
        whole image with it while some have not; without one only the tiles that ran count.
    origins : sequence of (int, int), optional
        Per tile, its (top, left) in the image: where its slice of a row or column profile lies
        (without them a mean over one axis sees the tile only).
    maps : MapProbe, optional
        Which recognised reductions reduce a feature map (:mod:`mlbench.probes.spatial_maps`):
        only those are pooled. Without it every recognised reduction of a map no larger than a
        tile is taken for one.
    """

    def __init__(self, model: nn.Module, boxes: Sequence[Box] = ((0, 1, 0, 1),), size: tuple[int, int] = (1, 1),
                 prior: NormPrior | None = None, origins: Sequence[tuple[int, int]] | None = None,
                 maps: MapProbe | None = None) -> None:
        self.norms = pooled_norm_modules(model)
        self.boxes, self.size, self.prior, self.maps = list(boxes), size, prior, maps
        self.origins = None if origins is None else list(origins)
        self._profiles: dict[int, torch.Tensor] = {}
        self._calls: list[CallStatistics] = []
        self._batch: list[int] = []
        self._call = 0
        self._reduction = 0  # recognised reductions so far in this forward, the index into ``maps``
        self._shared = False  # True: the tiles of a batch are parts of one input, not stacked inputs
        self.reductions_seen: int | None = None
        """Recognised reductions in the first batch of tiles' forward (None before it has run)."""
        self.reduces: bool | None = None if prior is None else prior.reduces
        """Whether the model reduces whole maps (None: not known until a batch has run)."""
        self._mask_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}

    @contextmanager
    def tiles(self, indices: Sequence[int]) -> Iterator[None]:
        """Pool the norms and whole-map reductions while the tiles ``indices`` run as one batch,
        tile-major: the model's input is (len(indices) * N, C, H, W), tile ``indices[j]``'s N
        images at ``j * N``."""
        self._batch, self._call, self._reduction = list(indices), 0, 0
        saved = [(norm, norm.__dict__.get("forward")) for norm in self.norms]
        for norm in self.norms:
            norm.forward = partial(self._pooled_forward, norm)
        mode = SpatialReductions(self._reduce) if self.reduces is not False else nullcontext()
        try:
            with mode:
                yield
            if self.reduces is None:  # later batches skip the mode's cost per op where there is nothing to pool
                self.reduces = mode.recognised > 0
            if isinstance(mode, SpatialReductions) and not self._shared and self.reductions_seen is None:
                self.reductions_seen = self._reduction
        finally:
            for norm, forward in saved:
                if forward is None:
                    del norm.forward
                else:
                    norm.forward = forward

    @classmethod
    def record(cls, model: nn.Module, x: torch.Tensor, boxes: Sequence[tuple[float, float, float, float]],
               forward: Callable[[torch.Tensor], object] | None = None, full_scale: bool = False,
               maps: MapProbe | None = None) -> NormPrior:
        """Run ``model`` on ``x`` once (through ``forward``, default the model itself; the output is
        discarded) and keep every norm call's statistics over each of ``boxes`` (parts of ``x`` in
        its pixels, which should partition it), as the prior of tiles owning those parts of a
        larger image, or, ``full_scale``, of the image ``x`` itself."""
        pooled = cls(model, boxes, tuple(x.shape[-2:]), maps=maps)
        pooled._shared = True
        with pooled.tiles(range(len(pooled.boxes))):
            (forward or model)(x)
        return NormPrior(tuple((call.moments, list(call.count)) for call in pooled._calls), tuple(x.shape[-2:]),
                         bool(pooled.reduces), full_scale, dict(pooled._profiles))

    def _samples(self, z: torch.Tensor) -> int | None:
        """N, the images per tile in ``z`` (the running tiles stacked); None if ``z`` is not such a stack."""
        batch = 1 if self._shared else len(self._batch)
        return None if z.shape[0] % batch else z.shape[0] // batch

    def _record(self, index: int, n: int, groups: int, z: torch.Tensor) -> CallStatistics:
        """The statistics of norm call ``index``, created (with the prior if one fits) at its first call."""
        if index < len(self._calls):
            call = self._calls[index]
            if call.moments.shape[2] != n * groups:
                raise ValueError(f"norm call {index}: tiles with different batch sizes or channels cannot pool "
                                 f"statistics ({call.moments.shape[2]} vs {n} x {groups} statistics)")
            return call
        call = CallStatistics(len(self.boxes), n, groups, z.device)
        if self.prior is not None and index < len(self.prior.calls):
            moments, count = self.prior.calls[index]
            if moments.shape == call.moments.shape or (self.prior.full_scale and moments.shape[1:] == call.moments.shape[1:]):
                call.set_prior(moments.to(z.device), count, self.prior.full_scale)
        self._calls.append(call)
        return call

    def _pooled_forward(self, norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
        with plain_torch():  # the statistics' few dozen small ops skip any TorchFunctionMode (tile_grid's)
            return self._pooled(norm, z)

    def _pooled(self, norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
        index, self._call = self._call, self._call + 1
        batch = 1 if self._shared else len(self._batch)
        n = self._samples(z)
        if n is None:
            raise ValueError(f"{type(norm).__name__}: a batch of {batch} tiles cannot have {z.shape[0]} samples")
        groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else z.shape[1]
        call = self._record(index, n, groups, z)
        if not call.full_scale:  # a full-scale prior's statistics are used as they are
            self._measure(call, z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, n, groups)
        if self._shared:  # the parts partition this one map: its own statistics are the pooled ones
            return _own_statistics(norm, z)
        stats = call.pooled()
        if stats is None:  # no tile owns any of this map (and no prior): the batch's own statistics
            stats = mean_var(group_moments(z.reshape(batch, n, *z.shape[1:]).movedim(0, 2), groups))
        return _normalise(norm, z, n, groups, *stats)

    def _reduce(self, reduction: Reduction) -> torch.Tensor | None:
        """What a whole-map reduction of the running tiles' maps gives over the whole image, the
        same for every tile, (tiles * N, C) (keepdim: (tiles * N, C, 1, 1)). None (the call runs
        as it is): while recording a prior (the parts make up this one map), and where the map is
        not a stack of the tiles' maps (another batch size, larger than a tile, not a feature map by
        ``maps``) or no part has pixels."""
        z = reduction.input
        ordinal, self._reduction = self._reduction, self._reduction + 1
        if self.maps is not None and not self.maps.spatial(ordinal, tuple(z.shape), self.size):
            return None  # not a feature map: it takes no call index, here and in the prior alike
        n = self._samples(z)
        if n is None or z.shape[-2] > self.size[0] or z.shape[-1] > self.size[1]:
            return None
        if reduction.axis is not None:
            return self._profile(reduction, n)
        with plain_torch():
            index, self._call = self._call, self._call + 1
            call = self._record(index, n, z.shape[1], z)
            measured = None if call.full_scale else z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
            if reduction.kind == "max":
                if measured is not None:  # a full-scale prior's statistics are used as they are
                    self._measure_max(call, measured, n)
                value = None if self._shared else call.maximum()
            else:
                if measured is not None:
                    self._measure(call, measured, n, z.shape[1])
                stats = None if self._shared else call.pooled()
                value = None if stats is None else _reduced(reduction, *stats, z.shape[-2] * z.shape[-1],
                                                            self._whole_count(*z.shape[-2:]))
            if value is None:
                return None
            value = value.to(reduction.dtype or z.dtype).view(n, z.shape[1]).repeat(z.shape[0] // n, 1)
            return value[..., None, None] if reduction.keepdim else value

    def _profile(self, reduction: Reduction, n: int) -> torch.Tensor | None:
        """A mean or sum over one spatial axis: each running tile's slice of the whole image's profile,
        from a prior of the image itself or pooled over every tile's owned part when all run in this
        batch; None (the tile's own) otherwise, and while recording a prior (its profile is kept)."""
        z, axis = reduction.input, reduction.axis
        with plain_torch():
            index, self._call = self._call, self._call + 1
            self._record(index, n, 1, z)  # unused statistics: they keep the later calls' indexes the prior's
            if self._shared:
                self._profiles[index] = z.mean(axis, dtype=torch.float64)
                return None
            if self.origins is None:
                return None
            kept = 5 - axis
            scale = z.shape[kept] / self.size[kept - 2]
            offsets = [round(self.origins[tile][kept - 2] * scale) for tile in self._batch]
            profile = self.prior.profiles.get(index) if self.prior is not None and self.prior.full_scale else None
            if profile is None and len(self._batch) == len(self.boxes):
                across, along = (self._cols, self._rows) if axis == 3 else (self._rows, self._cols)
                profile = pooled_profile(z, n, axis, self._batch, offsets, across, along)
            value = None if profile is None else tile_slices(profile.to(z.device), z, n, axis, offsets,
                                                             reduction.keepdim)
            if value is None:
                return None
            if reduction.kind == "sum":  # the whole image's mean times the tile's extent, as for whole maps
                value = value * z.shape[axis]
            return value.to(reduction.dtype or z.dtype)

    def _whole_count(self, height: int, width: int) -> int:
        """Pixels of a map ``height`` x ``width`` of a tile, over all tiles' owned parts: the whole image's map."""
        return sum((rows[1] - rows[0]) * (cols[1] - cols[0]) for rows, cols in (
            (self._rows(tile, height), self._cols(tile, width)) for tile in range(len(self.boxes))))

    def _measure_max(self, call: CallStatistics, z: torch.Tensor, n: int) -> None:
        """Record the maximum of each running tile's owned part of the (tiles * N, C, h, w) ``z``."""
        for j, tile in enumerate(self._batch):
            owned = z if self._shared else z[j * n:(j + 1) * n]
            owned = owned[..., slice(*self._rows(tile, z.shape[-2])), slice(*self._cols(tile, z.shape[-1]))]
            call.count[tile], call.seen[tile] = owned[0, 0].numel(), True
            if owned[0, 0].numel():
                call.moments[tile, 0] = owned.amax((-2, -1)).flatten()

    def _measure(self, call: CallStatistics, z: torch.Tensor, n: int, groups: int) -> None:
        """Record the statistics of each running tile's owned part of ``z``: per tile on slices,
        or for small 2-D maps of an ``InstanceNorm`` all at once with masks (fewer, larger ops:
        faster where the per-op overhead dominates)."""
        if z.dim() == 4 and groups == z.shape[1] and z[:n].numel() <= MASKED_ELEMENTS:
            masks, counts, pixels = self._masks(*z.shape[-2:], z)
            maps = z[None] if self._shared else z.view(len(self._batch), n, *z.shape[1:])
            call.moments[self._batch] = masked_moments(maps, masks, counts)
            for tile, count in zip(self._batch, pixels):
                call.count[tile], call.seen[tile] = count, True
            return
        for j, tile in enumerate(self._batch):
            owned = z if self._shared else z[j * n:(j + 1) * n]
            if z.dim() >= 4:  # 1-D maps: all of it
                owned = owned[..., slice(*self._rows(tile, z.shape[-2])), slice(*self._cols(tile, z.shape[-1]))]
            count = owned[0, 0].numel() * (z.shape[1] // groups)
            call.count[tile], call.seen[tile] = count, True
            if count:
                call.moments[tile] = group_moments(owned, groups)

    def _rows(self, tile: int, height: int) -> tuple[int, int]:
        """The rows of a map ``height`` high that tile ``tile`` owns: its box scaled to the map."""
        scale = height / self.size[0]
        return round(self.boxes[tile][0] * scale), round(self.boxes[tile][1] * scale)

    def _cols(self, tile: int, width: int) -> tuple[int, int]:
        scale = width / self.size[1]
        return round(self.boxes[tile][2] * scale), round(self.boxes[tile][3] * scale)

    def _masks(self, height: int, width: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Owned-part masks (B, 1, 1, height, width) of the running tiles and their pixel counts,
        (B, 1, 1) in z's dtype and device and as a list (cached)."""
        key = (tuple(self._batch), height, width, z.dtype, z.device)
        if key not in self._mask_cache:
            masks = torch.zeros(len(self._batch), 1, 1, height, width, dtype=z.dtype)
            for j, tile in enumerate(self._batch):
                masks[j, ..., slice(*self._rows(tile, height)), slice(*self._cols(tile, width))] = 1
            counts = masks.sum((-2, -1))
            self._mask_cache[key] = (masks.to(z.device), counts.to(z.device), [int(c) for c in counts.flatten()])
        return self._mask_cache[key]


def _reduced(reduction: Reduction, mean: torch.Tensor, var: torch.Tensor, pixels: int, whole: int) -> torch.Tensor:
    """A tile's ``mean``/``sum``/``var``/``std`` with the whole image's statistics: the sum is the
    mean times the tile map's ``pixels``, the variance's correction applies to the ``whole`` map's count."""
    if reduction.kind == "mean":
        return mean
    if reduction.kind == "sum":
        return mean * pixels
    var = var * whole / max(whole - reduction.correction, 1)
    return var if reduction.kind == "var" else var.sqrt()


def _own_statistics(norm: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to ``z`` with ``z``'s own statistics, and no running statistics updated."""
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(z, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.instance_norm(z, weight=norm.weight, bias=norm.bias, use_input_stats=True, eps=norm.eps)


def _normalise(norm: nn.Module, z: torch.Tensor, n: int, groups: int, mean: torch.Tensor,
               var: torch.Tensor) -> torch.Tensor:
    """``(z - mean) / sqrt(var + eps)`` per (sample, group), then the norm's affine, in z's dtype:
    one ``batch_norm`` over the tiles of (tiles * N, C, ...) with N * C statistics (mean and var
    are (N * G,))."""
    channels = z.shape[1]
    if groups != channels:
        mean, var = mean.repeat_interleave(channels // groups), var.repeat_interleave(channels // groups)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if n > 1 and weight is not None:
        weight, bias = weight.repeat(n), bias.repeat(n)
    folded = z.reshape(z.shape[0] // n, n * channels, *z.shape[2:])
    out = F.batch_norm(folded, mean.to(z.dtype), var.to(z.dtype), weight, bias, False, 0.0, norm.eps)
    return out.reshape(z.shape)
