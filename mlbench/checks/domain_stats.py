"""The statistics behind :func:`mlbench.check_domain`: what an image looks like to a model.

One image is measured in three ways, all through the model's own pipeline (its card's scaling,
channels and geometry):

- **image statistics** of the grey model input before mean/std (after the card's bit-depth
  scaling): the 1st, 50th and 99th intensity percentiles, the contrast (p99 - p1), the background
  level (median of a thin frame along the border, where objects are rare), the polarity of the
  objects (-1: every pixel far from the background is darker than it, dark bodies on a bright
  background; +1: brighter, bright objects on dark) and the object radius (median equivalent
  radius, in model-input pixels, of the connected regions far from the background);
- **activation statistics**: the per-channel mean and standard deviation over (H, W) of three
  feature maps, picked by depth with :func:`pick_layers` (forward hooks, removed afterwards);
- the **confidence profile** of the output, at the model's resolution: the foreground fraction,
  the uncertain fraction (probability in (0.1, 0.9)) and the mean confidence ``|2p - 1|``.

:func:`domain_reference` summarises many in-domain images into a small JSON-ready record (what
``data/weights/manifest.json`` keeps under ``domain`` for the bundled models); :func:`layer_distance`
compares one image's activations with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from mlbench.errors import OptionsError, WeightsError
from mlbench.models.cards import card
from mlbench.pipeline.postprocess import to_probability
from mlbench.pipeline.run import Pipeline
from mlbench.probes.shapes import trace_shapes

__all__ = ["IMAGE_STATISTICS", "CONFIDENCE_STATISTICS", "pick_layers", "image_statistics", "measure_images",
           "domain_reference", "layer_zscores", "layer_distance", "manifest_reference", "resolve_reference"]

IMAGE_STATISTICS = ("p1", "median", "p99", "contrast", "background", "polarity", "object_radius")
CONFIDENCE_STATISTICS = ("foreground", "uncertain", "mean_confidence")
_SHAPE = re.compile(r"^\((\d+), (\d+), (\d+), (\d+)\)$")


def _rounded(value: float) -> float:
    """Four significant digits: what the manifest keeps."""
    return float(f"{float(value):.4g}")


def pick_layers(model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, str]]:
    """Three feature maps of any model, chosen by depth from one traced forward of ``x``.

    Only blocks count: modules with submodules, called once, whose output is one (N, C, H, W)
    tensor with C >= 2. ``early`` is the first block to start (the stem or first block);
    ``deep`` is the block at the coarsest resolution, the shallowest and then the last to finish
    (the bottleneck); ``late`` is the input of the model's last top-level module with a
    (N, C >= 2, H, W) input: the features the head reads.

    Returns
    -------
    list of dict
        ``{"role", "module", "at"}`` with ``at`` "output" or "input"; roles that no module
        fits are left out.
    """
    table = trace_shapes(model, x, stats=False).table
    counts = table["path"].value_counts()
    blocks, heads = [], []
    for row in table.itertuples():
        if row.path == "(model)" or counts[row.path] != 1:
            continue
        inputs, outputs = _maps(row.inputs), _maps(row.outputs)
        if row.depth == 1 and inputs:
            heads.append((row.finished, row.path))
        if outputs and any(True for _ in model.get_submodule(row.path).children()):
            blocks.append((row.finished, row.depth, outputs[2] * outputs[3], row.path))
    picked = []
    if blocks:
        coarsest = min(b[2] for b in blocks)
        deep = min((b for b in blocks if b[2] == coarsest), key=lambda b: (b[1], -b[0]))
        picked += [{"role": "early", "module": blocks[0][3], "at": "output"}]
        picked += [{"role": "deep", "module": deep[3], "at": "output"}] if deep != blocks[0] else []
    if heads:
        picked.append({"role": "late", "module": max(heads)[1], "at": "input"})
    return picked


def _maps(shape_text: str) -> tuple[int, ...] | None:
    """A traced shape text as (N, C, H, W) when it is one such tensor with C >= 2, else None."""
    found = _SHAPE.match(shape_text)
    dims = tuple(int(v) for v in found.groups()) if found else None
    return dims if dims and dims[1] >= 2 else None


def _polarity(grey: np.ndarray, background: float) -> tuple[float, np.ndarray]:
    """(bright - dark) / (bright + dark) among pixels far from the background, and the signed
    deviation ``(grey - background) * sign``, positive on the object side."""
    deviation = grey - background
    reach = max(abs(float(np.percentile(grey, 1)) - background), abs(float(np.percentile(grey, 99)) - background))
    far = np.abs(deviation) > max(0.5 * reach, 1e-3)  # a flat image has no objects, not float noise
    bright, dark = int((far & (deviation > 0)).sum()), int((far & (deviation < 0)).sum())
    polarity = (bright - dark) / max(bright + dark, 1)
    return polarity, deviation * (1.0 if polarity >= 0 else -1.0)


def image_statistics(grey: np.ndarray) -> dict[str, float]:
    """The image statistics of one (H, W) grey model input in [0, 1] (see the module's docstring)."""
    frame = max(2, round(0.02 * min(grey.shape)))
    border = np.concatenate([grey[:frame].ravel(), grey[-frame:].ravel(), grey[:, :frame].ravel(), grey[:, -frame:].ravel()])
    background = float(np.median(border))
    p1, median, p99 = (float(v) for v in np.percentile(grey, [1, 50, 99]))
    polarity, toward_objects = _polarity(grey, background)
    labels, _ = ndi.label(toward_objects > max(0.5 * float(np.percentile(toward_objects, 99)), 1e-3))
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas >= 9]
    radius = float(np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0
    return {"p1": p1, "median": median, "p99": p99, "contrast": p99 - p1, "background": background,
            "polarity": polarity, "object_radius": radius}


def _confidence(probability: np.ndarray) -> dict[str, float]:
    return {"foreground": float((probability > 0.5).mean()),
            "uncertain": float(((probability > 0.1) & (probability < 0.9)).mean()),
            "mean_confidence": float(np.abs(2 * probability - 1).mean())}


@contextmanager
def _recording(model: torch.nn.Module, layers: Sequence[dict[str, str]]) -> Iterator[dict[str, np.ndarray]]:
    """Forward (pre-)hooks that keep each layer's per-channel means then stds, (2C,); removed on exit."""
    found: dict[str, np.ndarray] = {}

    def keep(role: str, value: Any) -> None:
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            maps = value.detach()[0].float().flatten(1)
            found[role] = torch.cat([maps.mean(1), maps.std(1, correction=0)]).cpu().numpy()

    handles = []
    try:
        for layer in layers:
            module, role = _submodule(model, layer["module"]), layer["role"]
            if layer["at"] == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, role=role: keep(role, args)))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, role=role: keep(role, out)))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise OptionsError(f"the reference names layer {path!r}, which {type(model).__name__} does not have: the "
                           "reference belongs to another model; compute one for this model with reference=[in-domain "
                           "images]") from None


def measure_images(model: torch.nn.Module, images: Sequence[Any], layers: Sequence[dict[str, str]] | None,
                   preset: str = "fixed", **options: Any) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Measure each image (path or array) through ``Pipeline(model, preset, **options)``.

    ``layers`` None picks them (:func:`pick_layers`) on the first image's model input.

    Returns
    -------
    (measurements, layers)
        One ``{"name", "image", "confidence", "layers"}`` per image (``layers``: role -> (2C,) array).

    Raises
    ------
    StageError
        When the pipeline fails on an image (it cannot be read, or the model refuses its size).
    """
    pipeline = Pipeline(model, preset, **options)
    out = []
    for image in images:
        run = pipeline.start(image).run_until("preprocess").raise_for_error()
        if layers is None:
            layers = pick_layers(model, run.output("preprocess"))
        with _recording(model, layers) as found:
            run.run_until("forward").raise_for_error()
        grey = run.with_options(normalize="none").run_until("preprocess").raise_for_error().output("preprocess")
        probability, _ = to_probability(run.output("forward"), run.options.sigmoid, pipeline.card)
        out.append({"name": run.output("decode").report.name, "image": image_statistics(grey[0].mean(0).numpy()),
                    "confidence": _confidence(probability), "layers": dict(found)})
    return out, list(layers or [])


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": _rounded(array.mean()), "sd": _rounded(array.std()), "min": _rounded(array.min()),
            "max": _rounded(array.max())}


def layer_zscores(vector: np.ndarray, reference: Mapping[str, Any]) -> np.ndarray:
    """z-scores of a layer's (2C,) channel means then stds against a reference layer, (2C,).

    Each feature's spread is floored at a tenth of the median spread of its kind (means or stds),
    so a channel that never varied in training (a normalised map) cannot dominate the score.
    """
    channels = int(reference["channels"])
    if vector.shape != (2 * channels,):
        raise OptionsError(f"layer {reference['module']!r} has {vector.size // 2} channels, the reference "
                           f"{channels}: the reference belongs to another model; compute one for this model "
                           "with reference=[in-domain images]")
    z = []
    for part, kind in ((vector[:channels], "channel_mean"), (vector[channels:], "channel_std")):
        mean, sd = np.asarray(reference[kind]["mean"]), np.asarray(reference[kind]["sd"])
        z.append((part - mean) / np.maximum(sd, max(0.1 * float(np.median(sd)), 1e-4)))
    return np.concatenate(z)


def layer_distance(vector: np.ndarray, reference: Mapping[str, Any]) -> float:
    """Root mean square of :func:`layer_zscores`: 0 at the training mean, about 1 for a typical training image."""
    return float(np.sqrt(np.mean(layer_zscores(vector, reference) ** 2)))


def domain_reference(model: torch.nn.Module, images: Sequence[Any], *, preset: str = "fixed",
                     source: str = "", **options: Any) -> dict[str, Any]:
    """The statistics of in-domain ``images`` (paths or arrays) as seen by ``model``: a small,
    rounded, JSON-ready record (the manifest's ``domain`` entry; ``check_domain(reference=...)``).

    Raises
    ------
    OptionsError
        With fewer than 2 images (a spread needs two).
    """
    if len(images) < 2:
        raise OptionsError(f"a domain reference needs at least 2 in-domain images, got {len(images)}; pass 8 or "
                           "more images you know the model segments well")
    measured, layers = measure_images(model, images, None, preset, **options)
    record: dict[str, Any] = {"source": source or f"{len(images)} reference images", "images": len(images),
                              "preset": preset}
    for kind, names in (("image", IMAGE_STATISTICS), ("confidence", CONFIDENCE_STATISTICS)):
        record[kind] = {name: _summary([m[kind][name] for m in measured]) for name in names}
    record["layers"] = []
    for layer in layers:
        vectors = np.stack([m["layers"][layer["role"]] for m in measured]).astype(np.float64)
        channels = vectors.shape[1] // 2
        entry = {**layer, "channels": channels}
        for kind, part in (("channel_mean", vectors[:, :channels]), ("channel_std", vectors[:, channels:])):
            entry[kind] = {"mean": [_rounded(v) for v in part.mean(0)], "sd": [_rounded(v) for v in part.std(0)]}
        entry["train_max"] = _rounded(max(layer_distance(v, entry) for v in vectors))
        record["layers"].append(entry)
    return record


def manifest_reference(model: torch.nn.Module) -> tuple[dict[str, Any] | None, str]:
    """The ``domain`` entry of the manifest's weights whose sha256 the model's card carries, and its source."""
    from mlbench.models.loading import load_manifest

    model_card = card(model)
    try:
        models = load_manifest()["models"]
    except WeightsError:
        return None, "none (no weights manifest)"
    for name, entry in models.items():
        if model_card.sha256 and entry.get("sha256") == model_card.sha256 and "domain" in entry:
            return entry["domain"], f"manifest entry of {name}: {entry['domain']['source']}"
    return None, "none"


def resolve_reference(model: torch.nn.Module, reference: Any, preset: str) -> tuple[dict[str, Any] | None, str]:
    """A reference record and its source: the manifest's (``reference`` None), a record, or one built from images."""
    if reference is None:
        return manifest_reference(model)
    if isinstance(reference, Mapping):
        missing = sorted({"image", "confidence", "layers", "source"} - set(reference))
        if missing:
            raise OptionsError(f"reference dict lacks {missing}; expected what mlbench.checks.domain_stats."
                               "domain_reference(model, images) returns, or pass the in-domain images themselves")
        return dict(reference), str(reference["source"])
    if isinstance(reference, (str, Path, np.ndarray, bytes)) or not hasattr(reference, "__iter__"):
        raise OptionsError(f"reference must be a list of in-domain images (paths or arrays), got "
                           f"{type(reference).__name__}; e.g. reference=['a.png', 'b.png', ...] (8 or more)")
    built = domain_reference(model, list(reference), preset=preset)
    return built, built["source"]
