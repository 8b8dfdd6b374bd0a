"""Golden outputs: what a model gives on a set of images, recorded once and checked in any environment.

A library upgrade (OpenCV, Pillow, torch) can change a segmentation silently: the service keeps
answering 200, with 76 polygons where it used to find 303. :func:`golden_record` runs the
pipeline on a set of images and keeps, per image, the sha256 of the file, of the decoded array
and of the model input, the logits (float16), the mask and the polygon count; with them the
environment (package versions, Python, platform, device), the model's identity (card, weights
sha256, a hash of its tensors, and how to build it again) and the pipeline preset and options,
in one safetensors file (tensors plus a JSON metadata string). :func:`golden_check` runs the
same images again and says per image what moved and by how much
(:mod:`mlbench.studies.golden_report`); :mod:`mlbench.studies.golden_bisect` finds the version
of a package that moved them; ``mlbench golden record|check|bisect`` is the command line.

The model is built again from what was recorded: a bundled name, a checkpoint (``weights``, with
an architecture name), or a factory ``"module:callable"`` / ``"path/to/file.py:callable"`` that
returns your own ``nn.Module`` (with ``weights`` loaded into it when given), plus the card fields
you set. Paths are stored relative to the golden file's folder, so a repository's golden files
and images move with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from mlbench.errors import DataError, OptionsError
from mlbench.findings import ReportText
from mlbench.models.cards import ModelCard, attach_card, card as card_of
from mlbench.models.loading import load_model
from mlbench.paths import sha256_file
from mlbench.pipeline.run import Pipeline, Run
from mlbench.studies._sweep import list_images
from mlbench.studies.golden_identity import ModelSpec, card_fields, environment, model_identity
from mlbench.studies.golden_report import (ATOL, MAX_POLYGON_DELTA, MIN_IOU, RTOL, GoldenReport, Tolerance,
                                           compare_image, diff_values)

__all__ = ["Golden", "golden_record", "golden_check", "load_golden", "golden_images", "FORMAT"]

FORMAT = "mlbench-golden/1"
"""The ``format`` key of a golden file's metadata."""
LABEL_STEMS = ("_mask", ".labels")
"""Ground-truth files beside the images (``x_mask.png``, ``x.labels.png``) are not recorded."""
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def golden_images(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files to record: a folder's images (sorted; ground truth ``*_mask.*``, ``*.labels.*`` left
    out) or the files given, folders among them expanded.

    Raises
    ------
    OptionsError
        A path that is neither a file nor a folder, or no image at all.
    """
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found += [p for p in list_images(item) if not p.stem.endswith(LABEL_STEMS)]
        elif item.is_file():
            found.append(item)
        else:
            raise OptionsError(f"image {str(item)!r} is neither a file nor a folder (absolute {item.absolute()}); "
                               "give image files or folders of images")
    if not found:
        raise OptionsError(f"no image found in {[str(i) for i in items]}; expected PNG, TIFF, JPEG or BMP files")
    return found


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def observe(run: Run) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run ``run`` (over an image path) to the end; its record (status, hashes, polygon count) and arrays
    (``logits`` float16, ``mask`` bool) as far as it got. An error names the image by its file name, so
    the same failure reads the same from another folder."""
    run.run()
    out = run.outputs
    entry: dict[str, Any] = {"status": "failed" if run.failed else "ok"}
    if run.failed:
        first = (str(run.error).strip().splitlines() or [""])[0].replace(str(run.source), Path(run.source).name)
        entry |= {"stage": run.failed_stage, "error": f"{type(run.error).__name__}: {first}"[:300]}
    arrays: dict[str, np.ndarray] = {}
    if "decode" in out:
        entry["decoded_sha256"] = _digest(out["decode"].image)
    if "preprocess" in out:
        x = out["preprocess"].detach().cpu()
        entry["input_sha256"], entry["input_shape"] = _digest(x.numpy()), list(x.shape)
    if "forward" in out:
        logits = out["forward"].float().numpy()
        arrays["logits"] = np.clip(logits, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)
    if "postprocess" in out:
        arrays["mask"] = np.asarray(out["postprocess"].mask, dtype=bool)
        entry["foreground"] = round(float(arrays["mask"].mean()), 6) if arrays["mask"].size else 0.0
    if "polygons" in out:
        entry["n_polygons"] = len(out["polygons"])
    return entry, arrays


@dataclass(frozen=True, repr=False)
class Golden(ReportText):
    """A golden file: ``meta`` (model, pipeline, environment, one record per image) and its arrays by key."""

    path: Path
    meta: dict
    arrays: dict

    @property
    def spec(self) -> ModelSpec | None:
        """How to build the recorded model again; None for a model given as an object without a file."""
        stored = self.meta["model"].get("spec")
        return None if stored is None else ModelSpec.restored(stored, self.path.resolve().parent)

    def image_arrays(self, key: str) -> dict[str, np.ndarray]:
        """``logits`` and ``mask`` of the image recorded under ``key`` (those its run reached)."""
        return {name: self.arrays[f"{key}/{name}"] for name in ("logits", "mask") if f"{key}/{name}" in self.arrays}

    def image_path(self, entry: Mapping[str, Any]) -> Path:
        return (self.path.resolve().parent / entry["path"]).resolve()

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), **self.meta}

    def text(self) -> str:
        env, model = self.meta["environment"], self.meta["model"]["identity"]
        packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
        lines = [f"Golden({model['name']}, {self.path.name}): {len(self.meta['images'])} image(s), preset "
                 f"{self.meta['pipeline']['preset']}, options {self.meta['pipeline']['options']}",
                 f"  recorded {self.meta['created']} on python {env['python']}, {env['platform']}, {env['device']}",
                 f"  packages: {packages}"]
        for entry in self.meta["images"]:
            state = "ok" if entry["status"] == "ok" else f"FAILED at {entry['stage']}: {entry['error']}"
            lines.append(f"  {entry['name']}: {state}, {entry.get('n_polygons', '-')} polygon(s), "
                         f"foreground {entry.get('foreground', '-')}")
        return "\n".join(lines)


def _spec_for(model: str | torch.nn.Module | None, weights: str | os.PathLike | None, card) -> ModelSpec | None:
    if isinstance(model, torch.nn.Module):
        return None
    return ModelSpec(str(model or ""), str(weights or ""), card_fields(card))


def _model_for(model, weights, card) -> tuple[ModelSpec | None, torch.nn.Module]:
    spec = _spec_for(model, weights, card)
    if spec is not None:
        return spec, spec.build()
    if weights is not None:
        return None, load_model(Path(weights), model=model, card=ModelCard.from_dict(card_fields(card)))
    if card is None:
        return None, model
    shallow = copy.copy(model)  # the caller's module keeps its own card; parameters are shared, not copied
    return None, attach_card(shallow, card_of(model).merged(ModelCard.from_dict(card_fields(card))))


def golden_record(model: str | torch.nn.Module | None, images, out: str | os.PathLike, *,
                  weights: str | os.PathLike | None = None, card: ModelCard | Mapping[str, Any] | None = None,
                  preset: str = "fixed", options: Mapping[str, Any] | None = None,
                  packages: Sequence[str] = ()) -> Golden:
    """Run the pipeline on ``images`` and write what it gave to the golden file ``out`` (safetensors).

    Parameters
    ----------
    model : a bundled name, a checkpoint path, a factory ``"module:callable"`` or ``"file.py:callable"``,
        or an ``nn.Module`` (then :func:`golden_check` needs it again: ``model=``).
    images : a folder, an image file, or a list of them (see :func:`golden_images`).
    out : the golden file to write (its folder is created).
    weights : a checkpoint loaded into ``model`` (an architecture name, a factory or a module).
    card : card fields (a ``ModelCard`` or a dict such as ``{"input_size": 128}``) over the model's own.
    preset, options : the pipeline's (:class:`mlbench.Pipeline`).
    packages : more distributions whose versions the environment records (besides torch, numpy,
        Pillow, OpenCV, tifffile, ...).

    Returns
    -------
    Golden
        What was written; an image whose run failed is recorded as failing, at its stage.
    """
    paths = golden_images(images)
    spec, net = _model_for(model, weights, card)
    options = dict(options or {})
    pipeline = Pipeline(net, preset=preset, **options)
    out = Path(out)
    base = out.absolute().parent
    records, arrays = [], {}
    for index, path in enumerate(paths):
        entry, found = observe(pipeline.start(str(path)))
        relative = Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
        records.append({"key": str(index), "name": path.name, "path": relative, "file_sha256": sha256_file(path)} | entry)
        arrays |= {f"{index}/{name}": value for name, value in found.items()}
    meta = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"spec": None if spec is None else spec.stored(base.resolve()), "identity": model_identity(net)},
            "pipeline": {"preset": preset, "options": options, "resolved": pipeline.options.to_dict()},
            "environment": environment(packages, pipeline.options.device), "packages": list(packages),
            "images": records}
    _write(out, meta, arrays)
    return Golden(out, meta, arrays)


def _write(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``path`` whole or not at all (masks bit-packed: 8 pixels a byte)."""
    from safetensors.numpy import save

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    stored = {k: (np.packbits(v) if v.dtype == bool else v) for k, v in arrays.items()}
    shapes = {k: list(v.shape) for k, v in arrays.items() if v.dtype == bool}
    partial.write_bytes(save(stored, metadata={"format": FORMAT, "golden": json.dumps(meta | {"mask_shapes": shapes})}))
    os.replace(partial, path)


def load_golden(path: str | os.PathLike) -> Golden:
    """Read a golden file written by :func:`golden_record`.

    Raises
    ------
    DataError
        The file is missing, not safetensors, or not a golden file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"golden file {str(path)!r} does not exist (absolute {path.absolute()}); record one first: "
                        "mlbench golden record --model NAME --images DIR --out FILE")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise DataError(f"golden file {path} is not a readable safetensors file ({exc}); record it again") from None
    if metadata.get("format") != FORMAT:
        raise DataError(f"{path} is not a golden file of this mlbench (metadata format {metadata.get('format')!r}, "
                        f"expected {FORMAT!r}); record it again with mlbench golden record")
    meta = json.loads(metadata["golden"])
    for key, shape in meta.pop("mask_shapes", {}).items():
        arrays[key] = np.unpackbits(arrays[key], count=int(np.prod(shape))).reshape(shape).astype(bool)
    return Golden(path, meta, arrays)


def golden_check(golden: str | os.PathLike | Golden, *, model: str | torch.nn.Module | None = None,
                 weights: str | os.PathLike | None = None, card: ModelCard | Mapping[str, Any] | None = None,
                 preset: str | None = None, options: Mapping[str, Any] | None = None, atol: float = ATOL,
                 rtol: float = RTOL, min_iou: float = MIN_IOU, max_polygon_delta: int = MAX_POLYGON_DELTA,
                 packages: Sequence[str] = ()) -> GoldenReport:
    """Run the recorded images again and report what moved (:class:`GoldenReport`; ``.ok`` is False beyond tolerance).

    ``model``, ``weights``, ``card``, ``preset`` and ``options`` default to the recorded ones; each
    given one replaces its recorded value (``options`` are merged over the recorded options), so
    ``golden_check(path, weights="new.pth")`` checks a new checkpoint against the golden outputs.

    Raises
    ------
    DataError
        The golden file cannot be read, or an image it recorded is gone.
    OptionsError
        A bad tolerance or option, or a golden file recorded from an in-memory model checked without ``model=``.
    """
    gold = golden if isinstance(golden, Golden) else load_golden(golden)
    tolerance = Tolerance(atol, rtol, min_iou, max_polygon_delta)
    net = _checked_model(gold, model, weights, card)
    recorded = gold.meta["pipeline"]
    pipeline = Pipeline(net, preset=preset or recorded["preset"], **{**recorded["options"], **dict(options or {})})
    diffs = []
    for entry in gold.meta["images"]:
        path = gold.image_path(entry)
        if not path.is_file():
            raise DataError(f"image {entry['name']!r} of {gold.path} is gone: it was recorded at {entry['path']!r} "
                            f"relative to the golden file's folder ({path}); restore it or record the golden file again")
        found, arrays = observe(pipeline.start(str(path)))
        found["file_sha256"] = sha256_file(path)
        diffs.append(compare_image(entry["name"], entry, gold.image_arrays(entry["key"]), found, arrays, tolerance))
    env = environment((*gold.meta.get("packages", []), *packages), pipeline.options.device)
    options_now = {"preset": pipeline.preset, **pipeline.options.to_dict()}
    return GoldenReport(str(gold.path), card_of(net).name, tolerance, tuple(diffs), env,
                        diff_values(gold.meta["environment"], env),
                        diff_values(gold.meta["model"]["identity"], model_identity(net)),
                        diff_values({"preset": recorded["preset"], **recorded["resolved"]}, options_now))


def _checked_model(gold: Golden, model, weights, card) -> torch.nn.Module:
    """The model ``golden_check`` runs: the recorded one, with each given part replacing its recorded value."""
    recorded = gold.spec
    if isinstance(model, torch.nn.Module) or (recorded is None and model is None and weights is None):
        if model is None:
            raise OptionsError(f"{gold.path} was recorded from a model object ({gold.meta['model']['identity']['module']}) "
                               "that it cannot build again; pass it: golden_check(path, model=net)")
        return _model_for(model, weights, card)[1]
    recorded = recorded or ModelSpec()
    return ModelSpec(str(model) if model is not None else recorded.model,
                     str(weights) if weights is not None else recorded.weights,
                     card_fields(card) if card is not None else recorded.card).build()
