"""``check_weights``: everything that can be wrong with a checkpoint, found without running it.

The service tried ``torch.load(weights_only=True)``, fell back to an unsafe load, then
``load_state_dict(strict=False)`` without logging: a ``module.``-prefixed checkpoint loaded
nothing into a random network and nobody noticed. :func:`check_weights` reports the file
(existence with the absolute path and working directory, size, sha256 against the manifest,
format, CRCs, unsafe globals, the safe load, the device it was saved on), the state dict
(training-dict unwrapping, prefixes, NaN/Inf) and the fit to the registered architectures.
:func:`read_checkpoint` returns the repaired state dict, ready for ``strict=True``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mlbench.budgets import Budgets, budget_error, describe_file
from mlbench.budgets import budgets as budgets_in_force
from mlbench.errors import OptionsError, WeightsError
from mlbench.findings import Problem, ReportText
from mlbench.models.checkpoint_io import BLOCKING, PREFIX_ORIGINS, StateDictRead, read_state_dict
from mlbench.models.fitting import Fit, diff_keys, expected_shapes, known_keys, rank_architectures
from mlbench.paths import data_dir, sha256_file

__all__ = ["WeightsReport", "check_weights", "read_checkpoint", "add_check_weights_command"]



@dataclass(frozen=True, repr=False)
class WeightsReport(ReportText):
    """What :func:`check_weights` found. ``ok`` is False when any problem was found; the repr is the report.

    ``absolute_path`` and ``cwd`` (where a relative path was looked for) are attributes and in
    :meth:`to_dict`, never in the text: a report shown in a notebook names no path of the machine.
    """

    path: str
    absolute_path: str
    cwd: str
    exists: bool
    size: int = 0
    sha256: str = ""
    manifest: str = ""
    format: str = ""
    crc_ok: bool | None = None
    unsafe_globals: tuple[str, ...] = ()
    load: str = ""
    container: str = ""
    prefix: str = ""
    tensors: int = 0
    parameters: int = 0
    dtypes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    nonfinite: dict[str, int] = field(default_factory=dict)
    fits: tuple[Fit, ...] = ()
    diff: dict[str, list[str]] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def best_fit(self) -> Fit | None:
        return self.fits[0] if self.fits else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [{"code": p.code, "message": p.message} for p in self.problems]
        out["ok"] = self.ok
        return out

    def text(self) -> str:
        """The report: the file, the state dict, the best fits and the problems."""
        lines = [f"WeightsReport({self.path})"]
        if not self.exists:
            lines.append("  not found: the absolute path tried and the working directory are .absolute_path and .cwd")
        elif not self.sha256:
            lines.append(f"  {self.format or f'{self.size:,} bytes'}: not read (see the problem)")
        else:
            lines.append(f"  {self.size:,} bytes, sha256 {self.sha256[:12]}..., {self.manifest or 'not in the manifest'}")
            lines.append(f"  format {self.format}, CRC {self._crc}, unsafe globals {list(self.unsafe_globals) or 'none'}")
            lines.append(f"  load: {self.load}; saved on {list(self.devices) or '?'}")
        if self.tensors:
            lines.append(f"  {self.container}; prefix {self.prefix!r}; {self.tensors} tensors, {self.parameters:,} values, "
                         f"dtypes {list(self.dtypes)}")
            lines += [f"  fit: {fit}" for fit in self.fits[:3]]
        if self.diff:
            lines.append("  against the model: " + ", ".join(f"{len(v)} {k}" for k, v in self.diff.items()))
        return "\n".join(lines + self._problem_lines(self.problems))

    @property
    def _crc(self) -> str:
        return "-" if self.crc_ok is None else ("ok" if self.crc_ok else "BAD")

    def _repr_html_(self) -> str:
        facts = [("size", f"{self.size:,} bytes"), ("sha256", f"{self.sha256[:12]}..."),
                 ("manifest", self.manifest or "not in the manifest"), ("format", self.format), ("CRC", self._crc),
                 ("load", self.load), ("container", self.container), ("prefix", repr(self.prefix)),
                 ("tensors", f"{self.tensors} ({self.parameters:,} values)")] if self.exists else [("file", "not found")]
        fits = [(f.model, f.widths, f"{f.matched}/{f.expected}", f"{f.score:.2f}") for f in self.fits]
        return self._html(f"WeightsReport({self.path})", (("fact", "value"), facts),
                          (("fits", "widths", "keys", "score"), fits),
                          self._problem_table(self.problems))


def _manifest_note(path: Path, digest: str) -> tuple[str, list[Problem]]:
    manifest_path = data_dir() / "weights" / "manifest.json"
    if not manifest_path.exists():
        return "", []
    models = json.loads(manifest_path.read_text()).get("models", {})
    for name, entry in models.items():
        if entry.get("sha256") == digest:
            return f"sha256 matches the bundled {name} weights", []
    for name, entry in models.items():
        if entry.get("file") == path.name:
            return "", [Problem("sha256_mismatch", f"named like the bundled {name} weights but its sha256 "
                                f"{digest[:12]}... differs from the manifest's {entry['sha256'][:12]}...: "
                                "the file was changed or damaged; restore it from git or retrain")]
    return "", []


def _tensor_findings(prefix: str, devices: tuple[str, ...]) -> list[Problem]:
    problems = []
    if prefix:
        origin = "saved from " + " around ".join(PREFIX_ORIGINS.get(part + ".", f"a wrapper module's {part!r}")
                                                 for part in prefix.rstrip(".").split("."))
        problems.append(Problem("prefix", f"every key starts with {prefix!r} ({origin}): "
                                "load_state_dict(strict=False) would load nothing and keep a random network; strip it "
                                "(mb.read_checkpoint and mb.load_model do)"))
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda and not torch.cuda.is_available():
        problems.append(Problem("saved_on_cuda", f"tensors were saved on {cuda}; on this machine without CUDA a plain "
                                "torch.load fails: pass map_location='cpu' (done here)"))
    return problems


def _fit_findings(diff: dict[str, list[str]], n_expected: int, fits: tuple[Fit, ...], model: Any) -> list[Problem]:
    problems = []
    name = model if isinstance(model, str) else type(model).__name__
    if diff["missing"] and len(diff["missing"]) == n_expected:
        problems.append(Problem("no_keys_match", f"every one of the {n_expected} keys of {name} is missing: strict=False "
                                "would 'succeed' and load nothing; " + _best_fit(fits, diff["unexpected"])))
    elif diff["missing"] or diff["unexpected"] or diff["shape"]:
        problems.append(Problem("key_mismatch", f"against {name}: {len(diff['missing'])} missing, "
                                f"{len(diff['unexpected'])} unexpected, {len(diff['shape'])} shape mismatches "
                                f"(first: {(diff['missing'] + diff['unexpected'] + diff['shape'])[0]}); best fit: "
                                f"{fits[0] if fits else '?'}"))
    if diff["dtype"]:
        problems.append(Problem("dtype_mismatch", f"{len(diff['dtype'])} tensors differ in dtype (first: "
                                f"{diff['dtype'][0]}); load_state_dict casts silently, losing precision or range"))
    return problems


def _best_fit(fits: tuple[Fit, ...], keys: list[str]) -> str:
    """The registered architecture the checkpoint fits best, or, when it shares no key with any,
    that it is another model's (its first keys show which)."""
    if fits and fits[0].matched:
        return f"best: {fits[0]}"
    return (f"it shares no key with any registered architecture (its keys begin {keys[:3]}): the weights of another "
            "model; build that model, or register it (mb.register_model)")


def _analyse(read: StateDictRead, model: Any) -> tuple[dict[str, Any], list[Problem]]:
    state_dict = read.state_dict
    if state_dict is None:
        return ({"container": read.container} if read.container else {}), []
    fits = rank_architectures(state_dict)
    problems = _tensor_findings(read.prefix, read.facts.devices)
    fields_ = {"container": read.container, "prefix": read.prefix, "tensors": len(state_dict), "fits": fits,
               "parameters": sum(v.numel() for v in state_dict.values()),
               "dtypes": tuple(sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()}))}
    if model is not None:
        expected = expected_shapes(model, state_dict)
        fields_["diff"] = diff_keys(state_dict, expected)
        problems += _fit_findings(fields_["diff"], len(expected), fits, model)
    elif fits and fits[0].score < 1.0:
        problems.append(Problem("no_exact_fit", "no registered architecture fits every key; "
                                + _best_fit(fits, list(state_dict)) + _against_best(fits[0], state_dict)))
    return fields_, problems


def _against_best(fit: Fit, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which keys keep the best-fitting architecture from fitting: the first few of each kind."""
    if not fit.matched:
        return ""
    diff = diff_keys(state_dict, expected_shapes(fit.model, state_dict))
    parts = [f"{len(diff[kind])} {label} {diff[kind][:3]}" for kind, label in
             (("missing", "missing"), ("unexpected", "unexpected"), ("shape", "of another shape")) if diff[kind]]
    return f"; against it: {', '.join(parts)}" if parts else ""


def _unread(path: Path, code: str, words: str, base: dict[str, str], size: int = 0) -> WeightsReport:
    """The report of a file that was not read: missing, not a regular file (a FIFO, a device ...),
    over the ``max_file_bytes`` budget, or unreadable (``words`` is then the whole message)."""
    if code == "missing":
        return WeightsReport(exists=False, problems=(Problem("missing", f"{path} {words} (absolute path tried "
                             f"{path.absolute()}, working directory {Path.cwd()}); relative weight paths resolve "
                             "against the working directory: start the service from the right folder or use an "
                             "absolute path"),), **base)
    if code == "not_a_file":
        words = (f"{path} {words}, not a regular file: refused before opening it (reading it could block or never "
                 "end); pass the path of the checkpoint file itself")
    return WeightsReport(exists=True, size=size, format="not a file" if code == "not_a_file" else "", load="not read",
                         problems=(Problem(code, words),), **base)


def _inspect(path: str | Path, model: Any, limits: Budgets | None) -> tuple[WeightsReport, Mapping | None]:
    if model is not None and not isinstance(model, (str, torch.nn.Module)):
        raise OptionsError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise OptionsError(f"path must be the checkpoint's path (str or pathlib.Path), got {type(path).__name__} "
                           f"{path!r:.80}; for a state dict already in memory, save it first or pass the model to "
                           "model.load_state_dict(state_dict, strict=True)")
    code, words = describe_file(path)  # before Path(): Path("") is "."
    path, limits = Path(path), budgets_in_force(limits)
    base = {"path": str(path), "absolute_path": str(path.absolute()), "cwd": str(Path.cwd())}
    if code != "regular":
        return _unread(path, code, words, base), None
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        exc = budget_error(WeightsError, "max_file_bytes", limits.max_file_bytes, "the file size", size, " bytes")
        return _unread(path, "over_budget", str(exc), base, size), None
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return _unread(path, "unreadable", f"{path} cannot be read ({type(exc).__name__}: {exc.strerror}); check "
                       "its permissions", base, size), None
    manifest, problems = _manifest_note(path, digest)
    read = read_state_dict(path, size, known_keys(model), limits=limits)
    fields_, more = _analyse(read, model)
    facts = read.facts
    problems = [Problem(c, m) for c, m in facts.problems] + problems + more
    report = WeightsReport(exists=True, size=size, sha256=digest, manifest=manifest, format=facts.format,
                           crc_ok=facts.crc_ok, unsafe_globals=facts.unsafe_globals, load=facts.load,
                           devices=facts.devices, problems=tuple(problems), **fields_, **base)
    return report, read.state_dict


def check_weights(path: str | Path, model: str | torch.nn.Module | None = None, *,
                  budgets: Budgets | None = None) -> WeightsReport:
    """Inspect a checkpoint file without running code from it.

    Parameters
    ----------
    path : str or Path
        The checkpoint (``.pth``/``.pt`` zip or legacy pickle, or ``.safetensors``).
    model : str or nn.Module, optional
        Compare keys, shapes and dtypes with this model (a name is built with the widths
        detected from the checkpoint, or the small preset when detection fails).
    budgets : Budgets, optional
        Bounds on reading the file (bytes, zip sizes, pickle opcodes and depth, tensors, seconds);
        default :func:`mlbench.budgets.budgets` (the defaults and the ``MLBENCH_MAX_*`` variables).

    Returns
    -------
    WeightsReport
        Never raises for a bad file: every defect is a problem with a stable code (``missing``,
        ``not_a_file``, ``empty``, ``truncated``, ``not_a_checkpoint`` (naming what it is: an image,
        ONNX, Keras, .npz ...), ``torchscript``, ``crc_mismatch``, ``code_execution``, ``unsafe_globals``,
        ``unreadable_pickle``, ``over_budget`` (naming the budget),
        ``load_failed``, ``prefix``, ``nonfinite``, ``saved_on_cuda``, ``no_keys_match``,
        ``key_mismatch``, ``dtype_mismatch``, ``sha256_mismatch`` ...).

    Raises
    ------
    OptionsError
        When ``model`` is neither a name nor a module; ModelError for an unknown model name.

    Examples
    --------
    >>> from mlbench.models.loading import weights_path
    >>> report = check_weights(weights_path("hrnet"))
    >>> report.ok, report.format, str(report.best_fit)
    (True, 'safetensors', 'hrnet (small): 921/921 keys fit, score 1.00')
    >>> check_weights("no/such/file.pth").problems[0].code
    'missing'
    """
    return _inspect(path, model, budgets)[0]


def read_checkpoint(path: str | Path, model: str | torch.nn.Module | None = None, *,
                    budgets: Budgets | None = None) -> tuple[OrderedDict, WeightsReport]:
    """The repaired state dict (unwrapped, prefix stripped, on the CPU) and the report
    (``budgets`` as in :func:`check_weights`).

    Raises
    ------
    WeightsError
        When no state dict can be read safely, or it does not fit ``model``; the message is the report.
    """
    report, state_dict = _inspect(path, model, budgets)
    found = [p.code for p in report.problems if p.code in BLOCKING]
    if state_dict is None or found:
        raise WeightsError(f"cannot use {path}: {found or 'no state dict'}\n{report}")
    return OrderedDict(state_dict), report


def add_check_weights_command(sub) -> None:
    """Register ``mlbench check-weights PATH [--model NAME] [--json]`` on argparse sub-parsers."""
    p = sub.add_parser("check-weights", help="inspect a checkpoint without running code from it")
    p.add_argument("path", help="checkpoint file (.pth, .pt, .safetensors)")
    p.add_argument("--model", default=None, help="compare with this model: hrnet | cbam_resunet | ma_resunet")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run_check_weights)


def run_check_weights(args: argparse.Namespace) -> int:
    """Handler of ``check-weights``: exit status 1 when the checkpoint has a problem, else 0."""
    report = check_weights(args.path, model=args.model)
    print(json.dumps(report.to_dict(), indent=1) if args.json else str(report))
    return int(not report.ok)
