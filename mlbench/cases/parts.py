"""What a case file records about a run: stage summaries, the outcome, previews, the model (and
how to build it again), a weights hash."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch

from mlbench.cases.bundle import CaseError
from mlbench.errors import MlbenchError
from mlbench.models.cards import attach_card, card
from mlbench.pipeline.run import Run
from mlbench.pipeline.result import NO_POLYGONS_WARNING
from mlbench.pipeline.stages import describe

__all__ = ["stage_summaries", "outcome_of", "previews", "state_sha256", "array_stats", "model_record",
           "rebuild_model"]

_PREVIEW_SIDE = 256


def array_stats(value: Any) -> dict[str, Any] | None:
    """Shape, dtype and rounded min/max/mean of an array or tensor (None for anything else)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        return None
    stats: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    if value.size and value.dtype != object:
        data = value.astype(np.float64)
        finite = np.isfinite(data)
        stats.update(min=round(float(np.nanmin(data)), 6) if finite.any() else None,
                     max=round(float(np.nanmax(data)), 6) if finite.any() else None,
                     mean=round(float(data[finite].mean()), 6) if finite.any() else None,
                     non_finite=int((~finite).sum()))
    return stats


def _main_array(name: str, output: Any) -> Any:
    if name == "decode":
        return output.image
    if name == "postprocess":
        return output.probability
    return output


def stage_summaries(run: Run) -> dict[str, dict[str, Any]]:
    """Per stage: status, seconds (rounded), a one-line summary and array statistics."""
    out = {}
    for name, record in run.records.items():
        entry: dict[str, Any] = {"status": record.status,
                                 "seconds": None if record.seconds is None else round(record.seconds, 4)}
        if record.status == "done":
            entry["summary"] = describe(_main_array(name, record.output))
            entry["stats"] = array_stats(_main_array(name, record.output))
            if name == "polygons":
                entry["count"] = len(record.output)
        elif record.status == "failed":
            entry.update(summary=f"{type(record.error).__name__}: {str(record.error)[:300]}", input=record.input_summary)
        out[name] = entry
    return out


def outcome_of(run: Run) -> dict[str, Any]:
    """The outcome to compare on replay: status, failed stage and error, or polygons and mask size."""
    if run.failed:
        return {"status": "failed", "failed_stage": run.failed_stage, "error_type": type(run.error).__name__,
                "error_message": str(run.error)[:2000]}
    mask = np.asarray(run.output("postprocess").mask, dtype=bool)
    outcome = {"status": "done", "failed_stage": None, "error_type": None, "error_message": None,
               "polygons": len(run.output("polygons")), "mask_pixels": int(mask.sum()),
               "mask_fraction": round(float(mask.mean()) if mask.size else 0.0, 6),
               "max_probability": round(float(run.output("postprocess").probability.max()), 6)}
    if not outcome["polygons"]:
        outcome["warning"] = NO_POLYGONS_WARNING
    return outcome


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(rgb)
    image.thumbnail((_PREVIEW_SIDE, _PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def previews(run: Run) -> dict[str, bytes]:
    """Small PNGs: the decoded image, and the mask over it when the run got that far."""
    from mlbench.image.display import overlay, to_display

    out = {}
    if run.records["decode"].status == "done":
        image = run.output("decode").image
        out["previews/decoded.png"] = _png(to_display(image))
        if run.records["postprocess"].status == "done":
            out["previews/overlay.png"] = _png(overlay(image, run.output("postprocess").mask))
    return out


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes, dtypes and bytes, in key order)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_record(model: torch.nn.Module) -> dict[str, Any]:
    """The model as a case records it: names, size, input geometry, weights and state sha256, card."""
    about = card(model)
    bundled = about.source.startswith("bundled")
    return {"name": about.name, "architecture": about.architecture, "size": getattr(model, "mlbench_size", None),
            "input_size": about.input_size, "input_multiple": about.input_multiple,
            "weights_file_sha256": about.sha256 or None, "state_sha256": state_sha256(model),
            "weights": "bundled trained weights" if bundled else (about.source or "untrained, seed 0"),
            "parameters": int(sum(p.numel() for p in model.parameters())), "card": about.to_dict()}


def rebuild_model(record: dict[str, Any]) -> torch.nn.Module:
    """The model a case ran, from its record: a bundled architecture only (never a path), its bundled
    weights or the seeded untrained ones, refused when the state sha256 differs."""
    from mlbench.models import build_model, list_models
    from mlbench.models.loading import load_model
    from mlbench.models.registry import SIZES

    name = record.get("architecture") or record["name"]
    if name not in list_models():
        raise CaseError(f"the case ran a model {name[:80]!r}, which is not one of mlbench's {list_models()}: pass the "
                        "model it ran to load_case(path, model=...) (or replay=False to read the case without running it)")
    if record.get("size") not in (None, *SIZES):
        raise CaseError(f"the case records model size {str(record['size'])[:40]!r}; expected one of {SIZES}: restore "
                        "the case from its original copy, or pass model= to load_case")
    if record.get("weights") == "bundled trained weights":
        try:
            model = load_model(name)
        except MlbenchError as exc:
            raise CaseError(f"the case used the bundled weights of {name} but they cannot be loaded here: {exc}") from exc
    elif record.get("weights_file_sha256"):
        raise CaseError(f"the case ran {record['name'][:80]} with the weights of {record.get('weights', '')[:200]} (sha256 "
                        f"{record['weights_file_sha256'][:12]}...), which are not bundled: pass "
                        "model=mb.load_model(path) to load_case")
    else:
        model = build_model(name, record.get("size") or "small").eval()
    if state_sha256(model) != record["state_sha256"]:
        raise CaseError(f"the {name} weights available here (state sha256 {state_sha256(model)[:12]}...) are not the "
                        f"ones the case ran with ({record['state_sha256'][:12]}...); pass model= to load_case")
    if record.get("input_size"):
        attach_card(model, card(model).changed("case", input_size=int(record["input_size"])))
    return model
