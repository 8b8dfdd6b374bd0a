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
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FileFacts, inspect_file
from .errors import OptionsError, WeightsError
from .io import Problem
from .models import build_model, config_from_state_dict, list_models, model_config, resolve_name
from .paths import data_dir, sha256_file

__all__ = ["WeightsReport", "Fit", "check_weights", "read_checkpoint", "strip_prefix", "rank_architectures",
           "add_check_weights_command"]

_WRAPPERS = ("model_state_dict", "state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")


@dataclass(frozen=True)
class Fit:
    """How well a checkpoint fits one registered architecture at the widths read from it."""

    model: str
    widths: str
    score: float
    matched: int
    expected: int

    def __str__(self) -> str:
        return f"{self.model} ({self.widths}): {self.matched}/{self.expected} keys fit, score {self.score:.2f}"


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`check_weights` found. ``ok`` is False when any problem was found; the repr is the report."""

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

    def __str__(self) -> str:
        lines = [f"WeightsReport({self.path})"]
        if not self.exists:
            lines.append(f"  absolute path tried {self.absolute_path}, working directory {self.cwd}")
        else:
            lines.append(f"  {self.size:,} bytes, sha256 {self.sha256[:12]}..., {self.manifest or 'not in the manifest'}")
            lines.append(f"  format {self.format}, CRC {'-' if self.crc_ok is None else ('ok' if self.crc_ok else 'BAD')}, "
                         f"unsafe globals {list(self.unsafe_globals) or 'none'}")
            lines.append(f"  load: {self.load}; saved on {list(self.devices) or '?'}")
        if self.tensors:
            lines.append(f"  {self.container}; prefix {self.prefix!r}; {self.tensors} tensors, {self.parameters:,} values, "
                         f"dtypes {list(self.dtypes)}")
            lines += [f"  fit: {fit}" for fit in self.fits[:3]]
        if self.diff:
            lines.append("  against the model: " + ", ".join(f"{len(v)} {k}" for k, v in self.diff.items()))
        lines += [f"  problem [{p.code}] {p.message}" for p in self.problems] or ["  no problems"]
        return "\n".join(lines)


def strip_prefix(state_dict: Mapping[str, Any], known_keys: Collection[str] = ()) -> tuple[OrderedDict, str]:
    """A copy of ``state_dict`` without the prefix every key shares, and that prefix.

    The usual wrappers (``module.``, ``model.``, ``net.``, ``_orig_mod.``) are stripped whenever
    every key has them; any other first segment every key shares (``encoder_decoder.``) only when
    stripping it turns the keys into ``known_keys`` (those of the registered architectures).
    """
    out, removed = OrderedDict(state_dict), ""
    while out:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None and known_keys:
            prefix = _shared_wrapper(out, known_keys)
        if prefix is None:
            break
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(out, prefix)
        removed += prefix
    return out, removed


def _shared_wrapper(state_dict: Mapping[str, Any], known_keys: Collection[str]) -> str | None:
    """The first key segment every key shares, if without it most keys become known ones."""
    first = {key.split(".", 1)[0] for key in state_dict}
    if len(first) != 1 or not all("." in key for key in state_dict):
        return None
    prefix = first.pop() + "."
    known = set(known_keys)
    before = sum(key in known for key in state_dict)
    after = sum(key[len(prefix):] in known for key in state_dict)
    return prefix if after > max(before, len(state_dict) // 2) else None


def _known_keys(model: Any) -> set[str]:
    """Key names of every registered architecture (small widths), and of ``model`` when it is a module."""
    keys = set().union(*(_shapes(name, model_config(name, "small")) for name in list_models()))
    return keys | set(model.state_dict()) if isinstance(model, torch.nn.Module) else keys


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """The state dict inside ``obj`` (itself, or a training dict's ``model_state_dict``/``state_dict``) and a description."""
    if _is_state_dict(obj):
        return obj, "a plain state dict"
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if _is_state_dict(obj.get(key)):
                others = sorted(str(k) for k in obj if k != key)
                return obj[key], f"a training dict: state dict under {key!r}, also {others}"
        return None, f"a dict with keys {sorted(str(k) for k in obj)[:8]} but no state dict"
    return None, f"a {type(obj).__name__}, not a state dict"


@lru_cache(maxsize=32)
def _shapes(name: str, config: Any) -> dict[str, torch.Tensor]:
    """Key -> meta tensor (shape and dtype only) of model ``name`` at ``config``; cached."""
    return dict(build_model(name, widths=config, device="meta").state_dict())


def rank_architectures(state_dict: Mapping[str, torch.Tensor]) -> tuple[Fit, ...]:
    """Every registered architecture at the widths detected from the tensors, best fit first."""
    fits = []
    for name in list_models():
        try:
            config = config_from_state_dict(name, state_dict)
        except Exception:  # keys the detection needs are absent: compare with the small preset
            config = model_config(name, "small")
        label = next((s for s in ("small", "full") if model_config(name, s) == config), f"widths {config}")
        expected = _shapes(name, config)
        matched = sum(1 for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) == tuple(v.shape))
        score = matched / max(len(expected), len(state_dict))
        fits.append(Fit(name, label, round(score, 4), matched, len(expected)))
    return tuple(sorted(fits, key=lambda f: (-f.score, f.model)))


def _expected(model: str | torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    name = resolve_name(model)
    try:
        config = config_from_state_dict(name, state_dict)
    except Exception:
        config = model_config(name, "small")
    return _shapes(name, config)


def diff_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Missing, unexpected, shape- and dtype-mismatched keys of ``state_dict`` against ``expected``."""
    common = [k for k in expected if k in state_dict]
    return {
        "missing": [k for k in expected if k not in state_dict],
        "unexpected": [k for k in state_dict if k not in expected],
        "shape": [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in common
                  if tuple(state_dict[k].shape) != tuple(expected[k].shape)],
        "dtype": [f"{k}: {state_dict[k].dtype} vs {expected[k].dtype}" for k in common
                  if state_dict[k].dtype != expected[k].dtype],
    }


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


def _tensor_findings(state_dict: Mapping[str, torch.Tensor], prefix: str, devices: tuple[str, ...]) -> list[Problem]:
    problems = []
    if prefix:
        problems.append(Problem("prefix", f"every key starts with {prefix!r} (saved from a DataParallel/wrapped model): "
                                "load_state_dict(strict=False) would load nothing and keep a random network; strip it "
                                "(mb.read_checkpoint does)"))
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state_dict.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        problems.append(Problem("nonfinite", f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {next(iter(bad))} "
                                f"({next(iter(bad.values()))} values): the training diverged; use an earlier checkpoint"))
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
                                "would 'succeed' and load nothing. " + (f"The checkpoint fits {fits[0]}" if fits else "")))
    elif diff["missing"] or diff["unexpected"] or diff["shape"]:
        problems.append(Problem("key_mismatch", f"against {name}: {len(diff['missing'])} missing, "
                                f"{len(diff['unexpected'])} unexpected, {len(diff['shape'])} shape mismatches "
                                f"(first: {(diff['missing'] + diff['unexpected'] + diff['shape'])[0]}); best fit: "
                                f"{fits[0] if fits else '?'}"))
    if diff["dtype"]:
        problems.append(Problem("dtype_mismatch", f"{len(diff['dtype'])} tensors differ in dtype (first: "
                                f"{diff['dtype'][0]}); load_state_dict casts silently"))
    return problems


def _analyse(obj: Any, facts: FileFacts, model: Any) -> tuple[dict[str, Any], list[Problem], Mapping | None]:
    state_dict, container = unwrap(obj)
    if state_dict is None:
        return {"container": container}, [Problem("no_state_dict", f"the file holds {container}; expected a state "
                                                  "dict or a training dict with 'model_state_dict'")], None
    state_dict, prefix = strip_prefix(state_dict, _known_keys(model))
    fits = rank_architectures(state_dict)
    problems = _tensor_findings(state_dict, prefix, facts.devices)
    fields_ = {"container": container, "prefix": prefix, "tensors": len(state_dict), "fits": fits,
               "parameters": sum(v.numel() for v in state_dict.values()),
               "dtypes": tuple(sorted({str(v.dtype).replace("torch.", "") for v in state_dict.values()}))}
    if model is not None:
        expected = _expected(model, state_dict)
        fields_["diff"] = diff_keys(state_dict, expected)
        problems += _fit_findings(fields_["diff"], len(expected), fits, model)
    elif fits and fits[0].score < 1.0:
        problems.append(Problem("no_exact_fit", f"no registered architecture fits every key; best: {fits[0]}"))
    return fields_, problems, state_dict


def _inspect(path: str | Path, model: Any) -> tuple[WeightsReport, Mapping | None]:
    if model is not None and not isinstance(model, (str, torch.nn.Module)):
        raise OptionsError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    path = Path(path)
    base = {"path": str(path), "absolute_path": str(path.absolute()), "cwd": str(Path.cwd())}
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        return WeightsReport(exists=False, problems=(Problem("missing", f"{path} {what} (absolute path tried "
                             f"{path.absolute()}, working directory {Path.cwd()}); relative weight paths resolve "
                             "against the working directory: start the service from the right folder or use an "
                             "absolute path"),), **base), None
    size = path.stat().st_size
    digest = sha256_file(path)
    manifest, problems = _manifest_note(path, digest)
    facts, obj = inspect_file(path, size)
    problems = [Problem(c, m) for c, m in facts.problems] + problems
    fields_, state_dict = {}, None
    if obj is not None:
        fields_, more, state_dict = _analyse(obj, facts, model)
        problems += more
    report = WeightsReport(exists=True, size=size, sha256=digest, manifest=manifest, format=facts.format,
                           crc_ok=facts.crc_ok, unsafe_globals=facts.unsafe_globals, load=facts.load,
                           devices=facts.devices, problems=tuple(problems), **fields_, **base)
    return report, state_dict


def check_weights(path: str | Path, model: str | torch.nn.Module | None = None) -> WeightsReport:
    """Inspect a checkpoint file without running code from it.

    Parameters
    ----------
    path : str or Path
        The checkpoint (``.pth``/``.pt`` zip or legacy pickle, or ``.safetensors``).
    model : str or nn.Module, optional
        Compare keys, shapes and dtypes with this model (a name is built with the widths
        detected from the checkpoint, or the small preset when detection fails).

    Returns
    -------
    WeightsReport
        Never raises for a bad file: every defect is a problem with a stable code (``missing``,
        ``empty``, ``truncated``, ``crc_mismatch``, ``code_execution``, ``unsafe_globals``,
        ``load_failed``, ``prefix``, ``nonfinite``, ``saved_on_cuda``, ``no_keys_match``,
        ``key_mismatch``, ``dtype_mismatch``, ``sha256_mismatch`` ...).

    Raises
    ------
    OptionsError
        When ``model`` is neither a name nor a module; ModelError for an unknown model name.
    """
    return _inspect(path, model)[0]


def read_checkpoint(path: str | Path, model: str | torch.nn.Module | None = None) -> tuple[OrderedDict, WeightsReport]:
    """The repaired state dict (unwrapped, prefix stripped, on the CPU) and the report.

    Raises
    ------
    WeightsError
        When no state dict can be read safely, or it does not fit ``model``; the message is the report.
    """
    report, state_dict = _inspect(path, model)
    blocking = {"missing", "empty", "truncated", "not_a_checkpoint", "lfs_pointer", "code_execution", "unsafe_globals",
                "load_failed", "no_state_dict", "no_keys_match", "key_mismatch", "crc_mismatch", "nonfinite"}
    found = [p.code for p in report.problems if p.code in blocking]
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
