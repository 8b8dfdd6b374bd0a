"""Case files: a run saved for a postmortem, and replayed later to see if it still happens.

A case is one folder (or the same files in one ``.zip``): ``case.json`` (model id and
weights sha256, preset and options, per-stage summaries, the outcome, the exception and its
diagnosis, the doctor report, and the sha256 of every other file), the original image bytes,
``outcome.npz`` (the mask) and small PNG previews. JSON, npz and PNG only: never pickle.
:func:`load_case` refuses files whose sha256 differs, rebuilds the model and the pipeline,
replays the run and says whether the outcome is the same as recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlbench.cases.parts import outcome_of, previews, stage_summaries, state_sha256
from mlbench.errors import DataError, MlbenchError, OptionsError
from mlbench.findings import ReportText
from mlbench.models.cards import attach_card, card
from mlbench.pipeline.run import Pipeline, Run

__all__ = ["Case", "Replay", "CaseError", "save_case", "load_case", "FORMAT"]

FORMAT = "mlbench-case/1"


class CaseError(MlbenchError, ValueError):
    """A case file that is incomplete, damaged (checksum) or cannot be replayed."""


@dataclass(frozen=True, repr=False)
class Replay(ReportText):
    """A case replayed: the new run and how its outcome compares with the recorded one."""

    run: Run
    recorded: dict
    observed: dict
    differences: tuple = ()

    @property
    def same(self) -> bool:
        return not self.differences

    def text(self) -> str:
        head = "replay: SAME outcome as recorded" if self.same else "replay: DIFFERENT outcome"
        status = f"({self.observed['status']}" + (f" at {self.observed['failed_stage']}" if self.observed.get("failed_stage") else "") + ")"
        return "\n".join([f"{head} {status}"] + [f"  differs: {d}" for d in self.differences])


@dataclass(frozen=True, repr=False)
class Case(ReportText):
    """A loaded case: its record (``meta``), its files, and the replay if one was made."""

    name: str
    path: Path
    meta: dict
    files: dict = field(repr=False)
    replay: Replay | None = None

    @property
    def failure_class(self) -> str:
        return self.meta.get("failure_class", "unknown")

    @property
    def image_bytes(self) -> bytes:
        return self.files[self.meta["image"]["file"]]

    @property
    def image_source(self) -> bytes | np.ndarray:
        """What the run was given: the original bytes, or the array for a run started from an array."""
        if self.meta["image"]["file"].endswith(".npy"):
            return np.load(io.BytesIO(self.image_bytes), allow_pickle=False)
        return self.image_bytes

    @property
    def recorded_mask(self) -> np.ndarray | None:
        if "outcome.npz" not in self.files:
            return None
        with np.load(io.BytesIO(self.files["outcome.npz"]), allow_pickle=False) as data:
            return np.unpackbits(data["mask_bits"])[: int(np.prod(data["shape"]))].reshape(data["shape"]).astype(bool)

    def build_model(self) -> torch.nn.Module:
        """The model of the case: bundled weights when the sha256 matches, else the seeded untrained one."""
        return _rebuild_model(self.meta["model"])

    def pipeline(self, preset: str | None = None, model: torch.nn.Module | None = None, **changes: Any) -> Pipeline:
        """The recorded pipeline; ``preset`` swaps the option set (e.g. "fixed"), ``changes`` override options."""
        if preset is None:
            options = {**self.meta["options"], **changes}
            return Pipeline(model or self.build_model(), self.meta["preset"], **options)
        return Pipeline(model or self.build_model(), preset, **changes)

    def start(self, preset: str | None = None, **changes: Any) -> Run:
        """A fresh, un-executed Run of the case's image (for stepping, e.g. with the Stepper)."""
        return self.pipeline(preset, **changes).start(self.image_source)

    def rerun(self, preset: str | None = None, **changes: Any) -> Replay:
        """Run the case again (optionally with another preset or options) and compare with the record."""
        run = self.start(preset, **changes).run()
        observed = outcome_of(run)
        return Replay(run, self.meta["outcome"], observed, tuple(_differences(self.meta["outcome"], observed, run, self.recorded_mask)))

    def text(self) -> str:
        m, o = self.meta, self.meta["outcome"]
        result = (f"FAILED at {o['failed_stage']}: {o['error_type']}: {o['error_message'][:200]}" if o["status"] == "failed"
                  else f"done, {o['polygons']} polygon(s), mask covers {o['mask_fraction']:.1%}")
        lines = [f"Case {self.name!r}: {self.failure_class}", f"  model {m['model']['name']} ({m['model']['weights']}), preset {m['preset']!r}",
                 f"  image {m['image']['file']} ({m['image']['bytes']} bytes), {result}"]
        if m.get("note"):
            lines.append(f"  note: {m['note']}")
        lines += [f"  {name}: {s['status']}" + (f" -> {s['summary']}" if s.get("summary") else "") for name, s in m["stages"].items()]
        if self.replay is not None:
            lines.append("  " + repr(self.replay).replace("\n", "\n  "))
        return "\n".join(lines)


def save_case(run: Run, path: str | Path, *, name: str | None = None, note: str = "", failure_class: str | None = None,
              doctor_report: dict | None = None) -> Path:
    """Save ``run`` (failed or not) as a case folder, or as one zip when ``path`` ends in ``.zip``.

    Parameters
    ----------
    run : Run
        A run; stages not yet executed are run first (failures are recorded, not raised).
    path : str or Path
        A new folder, or a ``.zip`` file; an existing target is refused.
    name, note : str
        A short name (default: the folder's) and a free-text description.
    failure_class : str, optional
        The class to file the case under; default: the triage of the exception, or
        "postprocessing" for a run that found no polygon, or "none" for a good run.
    doctor_report : dict, optional
        The environment record; default ``mb.doctor(imports=False).to_dict()``.
    """
    from mlbench.checks.environment import doctor

    target = Path(path)
    if target.exists():
        raise CaseError(f"{target} already exists; choose a new name or delete it first (cases are never overwritten)")
    files = {"image" + _suffix(run.source): _source_bytes(run.source)}
    run.run()
    files.update(previews(run))
    outcome = outcome_of(run)
    if run.done:
        post = run.output("postprocess")
        mask = np.asarray(post.mask, dtype=bool)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mask_bits=np.packbits(mask.ravel()), shape=np.array(mask.shape, dtype=np.int64))
        files["outcome.npz"] = buffer.getvalue()
    diagnosis = _diagnosis(run, failure_class)
    meta = {
        "format": FORMAT, "name": name or target.stem, "note": note, "failure_class": diagnosis["failure_class"],
        "model": _model_record(run.pipeline.model), "preset": run.pipeline.preset, "options": run.options.to_dict(),
        "image": {"file": next(iter(files)), "bytes": len(files[next(iter(files))]), "sha256": _sha(files[next(iter(files))])},
        "stages": stage_summaries(run), "outcome": outcome, "diagnosis": diagnosis,
        "traceback": _traceback(run.error), "doctor": doctor_report or doctor(imports=False).to_dict(),
        "files": {rel: _sha(data) for rel, data in files.items()},
    }
    files["case.json"] = json.dumps(meta, indent=1, default=str).encode()
    _write(target, files)
    return target


def load_case(path: str | Path, *, replay: bool = True, model: torch.nn.Module | None = None) -> Case:
    """Load a case folder or zip, check every file's sha256, and (by default) replay it.

    Raises
    ------
    CaseError
        When ``case.json`` is missing or not a case, a listed file is missing, or a
        file's sha256 differs from the one recorded.
    """
    source = Path(path)
    files = _read(source)
    if "case.json" not in files:
        raise CaseError(f"{source} is not a case: no case.json inside (found {sorted(files)[:5]})")
    meta = json.loads(files["case.json"])
    if meta.get("format") != FORMAT:
        raise CaseError(f"{source}/case.json has format {meta.get('format')!r}; expected {FORMAT!r}")
    for rel, expected in meta["files"].items():
        if rel not in files:
            raise CaseError(f"case {source}: file {rel} is listed in case.json but missing; the case is incomplete")
        actual = _sha(files[rel])
        if actual != expected:
            raise CaseError(f"case {source}: {rel} has sha256 {actual[:16]}... but case.json records {expected[:16]}...; "
                            "the file was changed or damaged: restore the case from its original copy")
    case = Case(meta.get("name", source.stem), source, meta, files)
    if replay:
        case = Case(case.name, source, meta, files, case.rerun(model=model) if model is not None else case.rerun())
    return case


# ---- helpers ------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_bytes(source: Any) -> bytes:
    if isinstance(source, np.ndarray):
        if source.dtype == object:
            raise OptionsError("an object array cannot be saved in a case (it would need pickle); pass a numeric image")
        buffer = io.BytesIO()
        np.save(buffer, source, allow_pickle=False)
        return buffer.getvalue()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def _suffix(source: Any) -> str:
    if isinstance(source, np.ndarray):
        return ".npy"
    if isinstance(source, (bytes, bytearray, memoryview)):
        from mlbench.image.formats import sniff_format

        return "." + (sniff_format(bytes(source[:16])) or "bin").replace("jpeg", "jpg").replace("tiff", "tif")
    return Path(source).suffix.lower() or ".bin"


def _model_record(model: torch.nn.Module) -> dict[str, Any]:
    about = card(model)
    bundled = about.source.startswith("bundled")
    return {"name": about.name, "architecture": about.architecture, "size": getattr(model, "mlbench_size", None),
            "input_size": about.input_size, "input_multiple": about.input_multiple,
            "weights_file_sha256": about.sha256 or None, "state_sha256": state_sha256(model),
            "weights": "bundled trained weights" if bundled else (about.source or "untrained, seed 0"),
            "parameters": int(sum(p.numel() for p in model.parameters())), "card": about.to_dict()}


def _rebuild_model(record: dict[str, Any]) -> torch.nn.Module:
    from mlbench.models import build_model
    from mlbench.models.loading import load_model

    name = record.get("architecture") or record["name"]
    if record.get("weights") == "bundled trained weights":
        try:
            model = load_model(name)
        except MlbenchError as exc:
            raise CaseError(f"the case used the bundled weights of {name} but they cannot be loaded here: {exc}") from exc
    elif record.get("weights_file_sha256"):
        raise CaseError(f"the case ran {record['name']} with the weights of {record.get('weights')} (sha256 "
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


def _diagnosis(run: Run, failure_class: str | None) -> dict[str, Any]:
    from mlbench.failures._triage import make_diagnosis, triage

    if run.failed and failure_class is None:
        return triage(run.error, casebook=False).to_dict()
    if failure_class is None:
        failure_class = "postprocessing" if not run.output("polygons") else "none"
    evidence = f"{type(run.error).__name__}: {run.error}" if run.failed else outcome_of(run).get("warning", "run completed")
    return make_diagnosis(failure_class, evidence).to_dict()


def _traceback(error: BaseException | None) -> str:
    import traceback

    from mlbench.paths import cut_machine_paths

    if error is None:
        return ""
    return cut_machine_paths("".join(traceback.format_exception(type(error), error, error.__traceback__)))


def _write(target: Path, files: dict[str, bytes]) -> None:
    if target.suffix == ".zip":
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for rel in sorted(files):
                archive.writestr(zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0)), files[rel])
        return
    for rel, data in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)


def _read(source: Path) -> dict[str, bytes]:
    if source.is_dir():
        return {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}
    if not source.exists():
        raise DataError(f"no case at {source}: expected a case folder or .zip (see mb.save_case)")
    raise CaseError(f"{source} is neither a case folder nor a zip file")


def _differences(recorded: dict, observed: dict, run: Run, recorded_mask: np.ndarray | None) -> list[str]:
    out = [f"{key}: recorded {recorded.get(key)!r}, now {observed.get(key)!r}"
           for key in ("status", "failed_stage", "error_type", "polygons") if recorded.get(key) != observed.get(key)]
    if recorded.get("error_message") != observed.get("error_message") and not out:
        out.append(f"error message: recorded {recorded.get('error_message')!r}, now {observed.get('error_message')!r}")
    if recorded_mask is not None and run.done:
        mask = np.asarray(run.output("postprocess").mask, dtype=bool)
        if mask.shape != recorded_mask.shape:
            out.append(f"mask shape: recorded {recorded_mask.shape}, now {mask.shape}")
        elif (changed := int((mask != recorded_mask).sum())) > 0:
            out.append(f"mask: {changed} pixel(s) differ ({changed / mask.size:.2%})")
    return out
