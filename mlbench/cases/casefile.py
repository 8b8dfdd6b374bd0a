"""Case files: a run saved for a postmortem, and replayed later to see if it still happens.

A case is one folder (or the same files in one ``.zip``): ``case.json`` (model id and
weights sha256, preset and options, per-stage summaries, the outcome, the exception and its
diagnosis, the doctor report, and the sha256 of every other file), ``case.sig`` (an HMAC of
``case.json``), the original image bytes, ``outcome.npz`` (the mask) and small PNG previews.
JSON, npy/npz and PNG only: never pickle.

Cases come from other teams and are untrusted: :func:`load_case` reads them within the budgets of
:class:`mlbench.budgets.Budgets` (``max_case_*``; :mod:`mlbench.cases.bundle`: no symlinks, no path
outside the case, no duplicate names, sizes counted while inflating), checks the manifest's shape,
its file list (every listed file present with its sha256, nothing unlisted, never empty) and its
options as a user's (:mod:`mlbench.cases.manifest`), says who vouches for ``case.json``
(:mod:`mlbench.cases.signing`: an HMAC with this machine's key; a case from another machine cannot
be verified by that key and loads as ``foreign``, checked for self-consistency only, which
``Case.integrity`` and the case's text say), rebuilds the model, and replays the run within the
memory budget (:mod:`mlbench.cases.replaying`), saying whether the outcome is the same as recorded.
Every refusal is a :class:`CaseError` naming the case, what is wrong and the fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlbench.budgets import Budgets, budget_error, budgets
from mlbench.cases import manifest, signing
from mlbench.cases.bundle import CaseError, read_files, write_files
from mlbench.cases.manifest import FORMAT
from mlbench.cases.parts import model_record, outcome_of, previews, rebuild_model, stage_summaries
from mlbench.cases.replaying import Replay, differences, run_within_budgets
from mlbench.errors import OptionsError
from mlbench.findings import Problem, ReportText
from mlbench.pipeline.run import Pipeline, Run

__all__ = ["Case", "Replay", "CaseError", "save_case", "load_case", "FORMAT"]


@dataclass(frozen=True, repr=False)
class Case(ReportText):
    """A loaded case: its record (``meta``), its files, the replay if one was made, and its
    ``integrity``: a Problem whose code is ``signed``, ``bundled``, ``foreign`` or ``unsigned``
    (see :mod:`mlbench.cases.signing`)."""

    name: str
    path: Path
    meta: dict
    files: dict = field(repr=False)
    replay: Replay | None = None
    integrity: Problem | None = None

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
            return manifest.read_npy(self.image_bytes, f"case {self.path}: {self.meta['image']['file']}", budgets())
        return self.image_bytes

    @property
    def recorded_mask(self) -> np.ndarray | None:
        if "outcome.npz" not in self.files:
            return None
        return manifest.read_mask(self.files["outcome.npz"], f"case {self.path}: outcome.npz", budgets())

    def build_model(self) -> torch.nn.Module:
        """The model of the case: bundled weights when the sha256 matches, else the seeded untrained one."""
        return rebuild_model(self.meta["model"])

    def pipeline(self, preset: str | None = None, model: torch.nn.Module | None = None, **changes: Any) -> Pipeline:
        """The recorded pipeline; ``preset`` swaps the option set (e.g. "fixed"), ``changes`` override options."""
        if preset is None:
            options = {**self.meta["options"], **changes}
            return Pipeline(model or self.build_model(), self.meta["preset"], **options)
        return Pipeline(model or self.build_model(), preset, **changes)

    def start(self, preset: str | None = None, **changes: Any) -> Run:
        """A fresh, un-executed Run of the case's image (for stepping, e.g. with the Stepper).

        Its options were checked at load; the forward's memory is predicted only by :meth:`rerun`.
        """
        return self.pipeline(preset, **changes).start(self.image_source)

    def rerun(self, preset: str | None = None, **changes: Any) -> Replay:
        """Run the case again (optionally with another preset or options) and compare with the record.

        Raises
        ------
        CaseError
            When the image, the model input or the forward's predicted memory exceed the budgets
            (``max_pixels``, ``max_decoded_bytes``, ``max_replay_bytes``): nothing is run then.
        """
        image = None if self.meta["image"]["file"].endswith(".npy") else self.image_bytes
        run = run_within_budgets(self.start(preset, **changes), image, str(self.path), budgets())
        observed = outcome_of(run)
        return Replay(run, self.meta["outcome"], observed, tuple(differences(self.meta["outcome"], observed, run, self.recorded_mask)))

    def text(self) -> str:
        m, o = self.meta, self.meta["outcome"]
        result = (f"FAILED at {o['failed_stage']}: {o['error_type']}: {o['error_message'][:200]}" if o["status"] == "failed"
                  else f"done, {o['polygons']} polygon(s), mask covers {o['mask_fraction']:.1%}")
        lines = [f"Case {self.name!r}: {self.failure_class}", f"  model {m['model']['name']} ({m['model']['weights']}), preset {m['preset']!r}",
                 f"  image {m['image']['file']} ({m['image']['bytes']} bytes), {result}"]
        if self.integrity is not None and self.integrity.code in ("foreign", "unsigned"):
            lines.append(f"  integrity: {self.integrity.message}")
        if m.get("note"):
            lines.append(f"  note: {m['note']}")
        lines += [f"  {name}: {s['status']}" + (f" -> {s['summary']}" if s.get("summary") else "") for name, s in m["stages"].items()]
        if self.replay is not None:
            lines.append("  " + repr(self.replay).replace("\n", "\n  "))
        return "\n".join(lines)


def save_case(run: Run, path: str | Path, *, name: str | None = None, note: str = "", failure_class: str | None = None,
              doctor_report: dict | None = None, fix: str = "") -> Path:
    """Save ``run`` (failed or not) as a case folder, or as one zip when ``path`` ends in ``.zip``.

    ``case.json`` is signed with this machine's key (``case.sig``, see :mod:`mlbench.cases.signing`).

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
    fix : str
        What solved it, for the casebook (recorded in ``case.json`` when given).

    Raises
    ------
    CaseError
        When the target exists, or the case would exceed the budgets :func:`load_case` reads within.
    """
    from mlbench.checks.environment import doctor

    target = Path(path)
    if target.exists() or target.is_symlink():
        raise CaseError(f"{target} already exists; choose a new name or delete it first (cases are never overwritten)")
    image_file = "image" + _suffix(run.source)
    files = {image_file: _source_bytes(run.source)}
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
        "model": model_record(run.pipeline.model), "preset": run.pipeline.preset, "options": run.options.to_dict(),
        "image": {"file": image_file, "bytes": len(files[image_file]), "sha256": _sha(files[image_file])},
        "stages": stage_summaries(run), "outcome": outcome, "diagnosis": diagnosis,
        "traceback": _traceback(run.error), "doctor": doctor_report or doctor(imports=False).to_dict(),
        "files": {rel: _sha(data) for rel, data in files.items()},
    }
    if fix:
        meta["fix"] = fix
    files["case.json"] = json.dumps(meta, indent=1, default=str).encode()
    signature = signing.sign(files["case.json"], CaseError)
    if signature is not None:
        files[signing.SIGNATURE_FILE] = signature
    _check_size(target, files, budgets())
    write_files(target, files)
    return target


def load_case(path: str | Path, *, replay: bool = True, model: torch.nn.Module | None = None,
              require_signature: bool = False) -> Case:
    """Load a case folder or zip, check it (see the module docstring), and (by default) replay it.

    Parameters
    ----------
    path : str or Path
        The case folder or ``.zip``.
    replay : bool
        Rebuild the model and run the case again (within ``max_replay_bytes``).
    model : nn.Module, optional
        The model to replay with (needed when the case ran weights that are not bundled).
    require_signature : bool
        Refuse a case not signed with this machine's key (a foreign, unsigned or bundled one).

    Raises
    ------
    CaseError
        For a missing, damaged, unsafe or over-budget case, a manifest that is not one, a listed
        file missing or changed, an unlisted file, a ``case.json`` changed since it was signed
        here, options outside their allowed values, or a replay over the budgets.
    """
    source, limits = Path(path), budgets()
    files = read_files(source, limits)
    if "case.json" not in files:
        raise CaseError(f"{source} is not a case: no case.json inside (found {sorted(files)[:5]}); pass the folder or "
                        ".zip mb.save_case wrote")
    where = str(source)
    integrity = signing.verify(files["case.json"], files.get(signing.SIGNATURE_FILE), source, CaseError)
    meta = manifest.parse_manifest(files["case.json"], where, limits)
    manifest.check_manifest(meta, where)
    if require_signature and integrity.code != "signed":
        raise CaseError(f"case {source} is not signed with this machine's key ({integrity.message}); it was refused "
                        "because require_signature=True: load it without that to check it for self-consistency only")
    manifest.check_files(meta, files, where, _sha, extra=(signing.SIGNATURE_FILE,))
    manifest.check_options(meta, where, limits)
    case = Case(meta["name"], source, meta, files, None, integrity)
    if meta["image"]["file"].endswith(".npy"):
        case.image_source  # noqa: B018 - its header and size are checked here, before any replay
    if "outcome.npz" in files:
        case.recorded_mask  # noqa: B018
    if replay:
        case = Case(case.name, source, meta, files, case.rerun(model=model) if model is not None else case.rerun(), integrity)
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
    """``.npy`` for an array, else the format's (bytes) or the file's suffix; ``.bin`` when odd."""
    if isinstance(source, np.ndarray):
        return ".npy"
    if isinstance(source, (bytes, bytearray, memoryview)):
        from mlbench.image.formats import sniff_format

        return "." + (sniff_format(bytes(source[:16])) or "bin").replace("jpeg", "jpg").replace("tiff", "tif")
    suffix = Path(source).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".bin"


def _check_size(target: Path, files: dict[str, bytes], limits: Budgets) -> None:
    """Refuse to write a case that :func:`load_case` would refuse for its size."""
    what = f"cannot save {target}, load_case would refuse it:"
    checks = [("max_case_members", f"{what} its files", len(files), ""),
              ("max_case_manifest_bytes", f"{what} case.json", len(files["case.json"]), " bytes"),
              ("max_case_bytes", f"{what} its files together", sum(map(len, files.values())), " bytes")]
    checks += [("max_case_member_bytes", f"{what} {rel}", len(data), " bytes") for rel, data in files.items()]
    for budget, words, actual, unit in checks:
        if actual > getattr(limits, budget):
            raise budget_error(CaseError, budget, getattr(limits, budget), words, actual, unit)


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
