"""How far is a tiled mask from the whole-image mask? ``tile_fidelity`` measures it per tile size.

Tiling (``mb.predict_tiled``) saves memory but can change the mask: a tile sees less context
than the whole image, and a norm that averages over its input sees one tile. How much depends
on the model and the image (HRNet's 1/32 branch has 8 x 8 positions in a 256 px tile; a
cluttered image has more objects at tile borders), so the smallest faithful tile is measured,
not assumed: run the model once on the whole image (on the CPU, where memory is plentiful),
then tile by tile at each candidate size, and compare the masks. The answer carries over to the
same model on similar images at any device: pick the smallest faithful tile, then check that
it fits the GPU with ``mb.estimate_memory``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.metrics import pixel_scores
from mlbench.models.cards import card, input_multiple
from mlbench.probes._hooks import check_module
from mlbench.probes.tiling import NORM_STATS, map_output, pad_to_multiple, run_device, run_tiled

__all__ = ["TileFidelity", "tile_fidelity", "logits_to_mask", "mask_iou"]


def logits_to_mask(output: torch.Tensor, probabilities: bool = False) -> torch.Tensor:
    """(N, C, H, W) model output -> (N, H, W) mask: logit > 0 for one channel (probability > 0.5 for a
    model that outputs probabilities, ``ModelCard(output='probability')``), else the arg-max class."""
    if output.shape[1] == 1:
        return output[:, 0] > (0.5 if probabilities else 0)
    return output.argmax(1)


def mask_iou(whole: torch.Tensor, tiled: torch.Tensor) -> float:
    """IoU of two masks from ``logits_to_mask``: of the foreground for a binary mask, else the
    mean over the classes either mask contains (so a pixel moved between classes counts)."""
    if whole.dtype == torch.bool:
        return pixel_scores(whole.numpy(), tiled.numpy()).iou
    classes = torch.unique(torch.cat([whole.flatten(), tiled.flatten()])).tolist()
    return sum(pixel_scores((whole == c).numpy(), (tiled == c).numpy()).iou for c in classes) / len(classes)


@dataclass(frozen=True, repr=False)
class TileFidelity(ReportText):
    """Mask IoU of tiled against whole-image inference, per tile size and ``norm_stats`` mode."""

    table: pd.DataFrame
    """One row per (tile, norm_stats): ``iou``, ``passes``, ``settled`` and ``time_ratio``
    (tiled time / whole-image forward time, measured in the same call)."""
    target: float
    image_size: tuple[int, int]

    def smallest(self, norm_stats: str = "image") -> int | None:
        """The smallest measured tile that meets ``target`` together with every larger measured
        tile (so one lucky size between failing ones does not count); None if the largest misses."""
        rows = self.table[self.table["norm_stats"] == norm_stats].sort_values("tile", ascending=False)
        if rows.empty:
            raise OptionsError(f"norm_stats={norm_stats!r} was not measured; measured: "
                               f"{sorted(set(self.table['norm_stats']))}.")
        found = None
        for tile, iou in zip(rows["tile"], rows["iou"]):
            if iou < self.target:
                break
            found = int(tile)
        return found

    def text(self) -> str:
        height, width = self.image_size
        lines = [f"TileFidelity: mask IoU of tiles against the whole {height}x{width} image (target >= {self.target})"]
        for mode in dict.fromkeys(self.table["norm_stats"]):
            rows = self.table[self.table["norm_stats"] == mode]
            scores = ", ".join(f"{t}: {iou:.4f}" for t, iou in zip(rows["tile"], rows["iou"]))
            best = self.smallest(mode)
            verdict = (f"smallest faithful tile {best}" if best is not None
                       else "no measured tile is faithful: use a larger tile or the whole image")
            lines.append(f"  norm_stats={mode!r}: {scores} -> {verdict}")
        return "\n".join(lines)


def _default_tiles(side: int, overlap: int, multiple: int) -> list[int]:
    """Half to seven eighths of the image's shorter side, in eighths, on the model's multiple."""
    tiles = sorted({side * k // 8 // multiple * multiple for k in (4, 5, 6, 7)})
    return [t for t in tiles if t > 2 * overlap]


def tile_fidelity(model: nn.Module, x: torch.Tensor, tiles: list[int] | None = None, overlap: int = 64, *,
                  norm_stats: tuple[str, ...] | str = ("tile", "image"), target: float = 0.99,
                  **options) -> TileFidelity:
    """Compare ``predict_tiled``'s mask with one whole-image forward for each tile size.

    Parameters
    ----------
    model : nn.Module
        In the mode you run it (``model.eval()``); not changed.
    x : Tensor
        (N, C, H, W) input the whole model fits in memory for (run it on the CPU if the GPU is small).
    tiles : list of int, optional
        Tile sides to try; default half to seven eighths of the shorter side, on the model's
        ``input_multiple``, each larger than twice ``overlap``.
    overlap : int
        As for ``predict_tiled``.
    norm_stats : str or tuple of str
        The ``predict_tiled`` modes to measure: "tile", "image" and/or "pooled".
    target : float
        The mask IoU a tile size must reach to count as faithful.
    **options
        Passed on to ``predict_tiled`` (``tile_batch``, ``device``, ``max_passes``, ``tolerance``...).

    Returns
    -------
    TileFidelity
        ``.table`` of IoU, passes and time per tile and mode, ``.smallest(mode)``, a text summary.

    Notes
    -----
    Each size and mode costs one tiled run: about 2 to 4.5 whole-image forwards for ``"tile"`` and
    ``"image"`` (``bench/tiling.py``), 2 to 20 for ``"pooled"``. Pass fewer ``tiles`` or one mode
    to check a single choice.

    An image that fits in one batch's pixels (``tile_batch`` tiles, 4 by default) gets its own
    statistics in ``"image"`` mode, so there the table measures the context a tile lacks. A
    production image larger than a batch gets them from a downsampled prior, which can be
    further off on cluttered images: pass ``tile_batch=1`` to measure with a prior of one tile's
    pixels, the case of an image many times a batch.
    """
    model = check_module(model)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise OptionsError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}; "
                           "add the batch axis with x[None].")
    modes = (norm_stats,) if isinstance(norm_stats, str) else tuple(norm_stats)
    if not modes or any(mode not in NORM_STATS for mode in modes):
        raise OptionsError(f"norm_stats must be one or more of {', '.join(map(repr, NORM_STATS))}, got {norm_stats!r}.")
    if not 0 < target <= 1:
        raise OptionsError(f"target is a mask IoU in (0, 1], got {target!r}; e.g. target=0.99.")
    multiple = input_multiple(model)
    if tiles is None:
        tiles = _default_tiles(min(x.shape[-2:]), overlap, multiple)
        if not tiles:
            raise OptionsError(f"the {tuple(x.shape[-2:])} image is too small to tile with overlap {overlap}: "
                               "pass tiles=[...] and a smaller overlap.")
    device = run_device(model, options.get("device"))
    probabilities = card(model).output == "probability"
    whole_s = float("inf")
    for _ in range(2):  # the faster of two: the first call also pays one-off allocations
        start = time.perf_counter()
        with torch.no_grad():
            padded, (height, width) = pad_to_multiple(x, multiple)  # as predict_tiled pads, then crops
            output = map_output(model, model(padded.to(device)))[..., :height, :width]
            whole = logits_to_mask(output.float().cpu(), probabilities)
        whole_s = min(whole_s, time.perf_counter() - start)
    rows = []
    for tile in sorted(tiles):
        for mode in modes:
            start = time.perf_counter()
            with warnings.catch_warnings():  # an unsettled run is reported in the table instead
                warnings.filterwarnings("ignore", message=r"predict_tiled\(norm_stats='pooled'\): the last of",
                                        category=RuntimeWarning)
                run = run_tiled(model, x, tile, overlap, norm_stats=mode, **options)
            seconds = time.perf_counter() - start
            iou = mask_iou(whole, logits_to_mask(run.output, probabilities))
            rows.append({"tile": run.tile, "norm_stats": mode, "iou": round(iou, 4), "passes": run.passes,
                         "settled": run.settled, "time_ratio": round(seconds / max(whole_s, 1e-9), 1)})
    return TileFidelity(pd.DataFrame(rows), target, tuple(x.shape[-2:]))


def add_tiles_command(sub) -> None:
    """Add ``tiles IMAGE [--model M] [--input-size S] [--tiles ...] [--overlap O] [--mode ...] [--json]``
    (``mlbench`` adds ``--weights PATH`` and ``--card JSON``)."""
    p = sub.add_parser("tiles", help="which tile sizes reproduce the whole-image mask (mask IoU per tile size)")
    p.add_argument("image", help="image file, run through the pipeline's decode and preprocess stages")
    p.add_argument("--model", default="hrnet", help="hrnet | cbam_resunet | ma_resunet (or a service id); trained "
                   "weights; default hrnet, or with --weights the architecture the checkpoint must be")
    p.add_argument("--input-size", type=int, default=512, help="side the image is preprocessed to (default 512)")
    p.add_argument("--tiles", type=int, nargs="+", default=None, help="tile sides (default: 1/2 to 7/8 of the side)")
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--mode", nargs="+", default=["tile", "image"], choices=list(NORM_STATS),
                   help="norm_stats modes to measure (default tile and image)")
    p.add_argument("--target", type=float, default=0.99, help="mask IoU a tile must reach (default 0.99)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_tiles)


def _tiles(args) -> int:
    """Exit 0 when some measured tile is faithful in the last mode asked for, else 1."""
    import json

    from mlbench.models.loading import load_model
    from mlbench.pipeline.run import Pipeline

    model = (args.model if isinstance(args.model, nn.Module) else load_model(args.model)).eval()
    run = Pipeline(model, input_size=args.input_size).start(args.image).run_until("preprocess").raise_for_error()
    fidelity = tile_fidelity(model, run.output("preprocess"), args.tiles, args.overlap, norm_stats=tuple(args.mode),
                             target=args.target)
    smallest = {mode: fidelity.smallest(mode) for mode in args.mode}
    if args.json:
        print(json.dumps({"model": card(model).name, "image": str(args.image), "image_size": list(fidelity.image_size),
                          "target": args.target, "smallest": smallest,
                          "rows": fidelity.table.to_dict(orient="records")}, indent=1))
    else:
        print(fidelity)
    return 0 if smallest[args.mode[-1]] is not None else 1
