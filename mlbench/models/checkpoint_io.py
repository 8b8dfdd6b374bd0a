"""Reading a checkpoint file without running code from it.

The file-level half of :func:`mlbench.check_weights`: format sniffing (zip pickle, legacy
pickle, safetensors, and the usual impostors: empty files, HTML error pages, git-lfs
pointers), the zip CRC check that ``torch.load`` skips, the pickle's globals listed without
unpickling, and a ``weights_only=True`` load that accepts extra globals only from a named
allowlist (``argparse.Namespace``), recording the device each tensor was saved on.
"""

from __future__ import annotations

import argparse
import io
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ALLOWED_GLOBALS", "BLOCKING", "FileFacts", "sniff_checkpoint", "inspect_file", "unwrap", "strip_prefix",
           "StateDictRead", "read_state_dict"]

_WRAPPERS = ("model_state_dict", "state_dict", "model", "net", "weights")
_EMA_WRAPPERS = ("ema_state_dict", "state_dict_ema", "model_ema", "ema")
"""Where training code keeps exponential-moving-average weights (timm, Lightning callbacks, YOLO)."""
_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")
BLOCKING = frozenset({"missing", "empty", "truncated", "not_a_checkpoint", "lfs_pointer", "code_execution",
                      "unsafe_globals", "load_failed", "no_state_dict", "no_keys_match", "key_mismatch",
                      "crc_mismatch", "nonfinite"})
"""Problem codes that make a checkpoint unusable: loading refuses it."""

ALLOWED_GLOBALS: dict[str, Any] = {"argparse.Namespace": argparse.Namespace}
"""Globals a checkpoint may hold beyond tensors: loaded only when named here."""
_CODE_MODULES = ("os.", "posix.", "nt.", "subprocess.", "builtins.", "sys.", "shutil.", "socket.", "runpy.",
                 "importlib.", "pty.", "webbrowser.", "code.", "commands.", "pickle.", "marshal.", "types.")


@dataclass
class FileFacts:
    """What was learnt from the bytes of a checkpoint file (mutable while it is being filled in)."""

    format: str = "unknown"
    crc_ok: bool | None = None
    unsafe_globals: tuple[str, ...] = ()
    load: str = "not attempted"
    devices: tuple[str, ...] = ()
    problems: list[tuple[str, str]] = field(default_factory=list)


def sniff_checkpoint(head: bytes, size: int) -> str:
    """Format from the first bytes: zip, safetensors, legacy_pickle, git_lfs_pointer, html, empty or unknown."""
    if size == 0:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 10 and head[8:10] in (b'{"', b"{}", b"{ "):  # 8-byte header length, then JSON
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy_pickle"
    if head.startswith(b"version https://git-lfs"):
        return "git_lfs_pointer"
    if head.lstrip()[:1] == b"<":
        return "html"
    return "unknown"


_IMPOSTORS = {
    "empty": ("empty", "the file is empty (0 bytes): the copy or download failed; copy it again"),
    "git_lfs_pointer": ("lfs_pointer", "this is a git-lfs pointer, not the weights: run `git lfs pull`"),
    "html": ("not_a_checkpoint", "this is text/HTML (an error page saved as the checkpoint?); download it again"),
    "unknown": ("not_a_checkpoint", "not a PyTorch zip, legacy pickle or safetensors file; check how it was produced"),
}


def _zip_check(path: Path, size: int, facts: FileFacts) -> bool:
    """CRC-check every member; False when the archive cannot even be opened."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        facts.problems.append(("truncated", f"the zip archive is incomplete ({size:,} bytes; {exc}): PyTorch reports "
                               "'failed finding central directory'. The copy or download stopped early: copy it again"))
        return False
    except Exception as exc:  # zlib errors on a damaged member
        bad = f"? ({type(exc).__name__}: {exc})"
    facts.crc_ok = bad is None
    if bad is not None:
        facts.problems.append(("crc_mismatch", f"member {bad} fails its CRC check: the file was damaged after saving "
                               "(torch.load would load it silently with changed weights); restore a good copy"))
    return True


def _scan_pickle(stream: io.BytesIO) -> list[str]:
    """Globals named by one pickle, read opcode by opcode (nothing is executed)."""
    found, strings, memo = [], [], {}
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE") and strings:
            memo[arg if arg is not None else len(memo)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET") and arg in memo:
            strings.append(memo[arg])
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if op.name == "STOP":
            break
    return found


def _legacy_globals(path: Path) -> list[str]:
    """Unsafe globals of a legacy (non-zip) torch file or plain pickle: its first pickles, scanned."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals())
    stream, found = io.BytesIO(path.read_bytes()), []
    for _ in range(5):  # magic, protocol, sys info, object, storage keys
        try:
            found += _scan_pickle(stream)
        except Exception:  # raw storage bytes follow the pickles
            break
    return sorted({g for g in found if g not in allowed})


def _unsafe_globals(path: Path, fmt: str, facts: FileFacts) -> None:
    try:
        if fmt == "zip":
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        else:
            found = _legacy_globals(path)
    except Exception as exc:
        facts.problems.append(("unreadable_pickle", f"the pickle cannot be scanned ({type(exc).__name__}: {exc})"))
        return
    facts.unsafe_globals = tuple(sorted(found))
    code = [g for g in found if g.startswith(_CODE_MODULES)]
    if code:
        facts.problems.append(("code_execution", f"the pickle calls {code}: loading it with weights_only=False would run "
                               "that code. It was not loaded. Do not use this file; get the weights from a trusted source"))
    other = [g for g in found if g not in ALLOWED_GLOBALS and g not in code]
    if other:
        facts.problems.append(("unsafe_globals", f"the pickle needs globals {other} that are not on the allowlist "
                               f"{sorted(ALLOWED_GLOBALS)}; it was not loaded. Re-save only the state dict "
                               "(torch.save(model.state_dict())) or as safetensors"))


def _torch_load(path: Path, facts: FileFacts) -> Any:
    """``torch.load(weights_only=True)``, allowlisted globals by name, recording saved devices."""
    locations: list[str] = []

    def to_cpu(storage, location):
        locations.append(str(location))
        return storage

    allow = [ALLOWED_GLOBALS[g] for g in facts.unsafe_globals if g in ALLOWED_GLOBALS]
    try:
        with torch.serialization.safe_globals(allow):
            obj = torch.load(path, map_location=to_cpu, weights_only=True)
    except Exception as exc:
        facts.load = f"weights_only=True failed: {type(exc).__name__}"
        facts.problems.append(("load_failed", f"torch.load(weights_only=True) failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'}); the file is damaged"))
        return None
    names = [g for g in facts.unsafe_globals if g in ALLOWED_GLOBALS]
    facts.load = "weights_only=True" + (f" with the named allowlist {names}" if names else "")
    facts.devices = tuple(sorted(set(locations)))
    return obj


def inspect_file(path: Path, size: int) -> tuple[FileFacts, Any]:
    """Sniff, CRC-check, scan and (when safe) load a checkpoint; never runs code from the file.

    Returns
    -------
    facts : FileFacts
    obj : the loaded object (dict of tensors, training dict ...) or None when it was not loaded.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
    facts = FileFacts(format=sniff_checkpoint(head, size))
    if facts.format in _IMPOSTORS:
        facts.problems.append(_IMPOSTORS[facts.format])
        return facts, None
    if facts.format == "safetensors":
        from safetensors.torch import load_file

        announced = struct.unpack("<Q", head[:8])[0]
        if announced + 8 > size:
            facts.problems.append(("truncated", f"the safetensors header announces {announced:,} bytes of metadata but the "
                                   f"file has only {size:,} bytes: the copy or download stopped early; copy it again"))
            return facts, None
        try:
            obj = load_file(str(path))
        except Exception as exc:
            facts.problems.append(("load_failed", f"safetensors could not read it ({exc}); the file is truncated or damaged"))
            return facts, None
        facts.load, facts.devices = "safetensors (no code possible)", ("cpu",)
        return facts, obj
    if facts.format == "zip" and not _zip_check(path, size, facts):
        return facts, None
    _unsafe_globals(path, facts.format, facts)
    if any(code in ("code_execution", "unsafe_globals", "unreadable_pickle") for code, _ in facts.problems):
        facts.load = "refused: unsafe globals (never loaded with weights_only=False)"
        return facts, None
    return facts, _torch_load(path, facts)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any, key: str | None = None) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """The state dict inside ``obj`` and a description of where it was found.

    ``obj`` itself when it is one; else the training dict's ``key`` when given, else its first of
    ``model_state_dict``, ``state_dict`` (Lightning), ``model``, ``net``, ``weights``, else its EMA
    weights (``ema_state_dict``, ``state_dict_ema``, ``model_ema``, ``ema``) when those are all
    there is. The description names what else the dict holds (an EMA copy that was *not* used, too).
    """
    if _is_state_dict(obj):
        return obj, "a plain state dict"
    if not isinstance(obj, Mapping):
        return None, f"a {type(obj).__name__}, not a state dict"
    keys = [key] if key is not None else [*_WRAPPERS, *_EMA_WRAPPERS]
    for name in keys:
        if _is_state_dict(obj.get(name)):
            others = sorted(str(k) for k in obj if k != name)
            ema = [k for k in _EMA_WRAPPERS if k != name and _is_state_dict(obj.get(k))]
            note = f"; EMA weights under {ema[0]!r} not used (pass key={ema[0]!r} for them)" if ema else ""
            return obj[name], f"a training dict: state dict under {name!r}, also {others}{note}"
    wanted = f"no state dict under {key!r}" if key is not None else "no state dict"
    return None, f"a dict with keys {sorted(str(k) for k in obj)[:8]} but {wanted}"


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


@dataclass
class StateDictRead:
    """A checkpoint read safely: the file's facts, the state dict found in it (or None) and every
    problem so far, as ``(code, message)``; a code in :data:`BLOCKING` makes it unusable."""

    facts: FileFacts
    state_dict: OrderedDict | None = None
    container: str = ""
    prefix: str = ""

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.facts.problems

    @property
    def blocking(self) -> list[str]:
        return [code for code, _ in self.problems if code in BLOCKING]


def read_state_dict(path: Path, size: int, known_keys: Collection[str] = (), key: str | None = None) -> StateDictRead:
    """Read the state dict of a checkpoint file without running code from it.

    :func:`inspect_file`, then the state dict unwrapped from a training dict and stripped of a
    wrapper prefix (``known_keys`` lets an unusual shared prefix go too), then a NaN/Inf check.
    """
    facts, obj = inspect_file(path, size)
    read = StateDictRead(facts)
    if obj is None:
        return read
    state_dict, read.container = unwrap(obj, key)
    if state_dict is None:
        facts.problems.append(("no_state_dict", f"the file holds {read.container}; expected a state dict or a "
                               "training dict with 'model_state_dict'"))
        return read
    read.state_dict, read.prefix = strip_prefix(state_dict, known_keys)
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in read.state_dict.items() if v.is_floating_point()}
    bad = {k: n for k, n in counts.items() if n}
    if bad:
        facts.problems.append(("nonfinite", f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {next(iter(bad))} "
                               f"({next(iter(bad.values()))} values): the training diverged; use an earlier checkpoint"))
    return read
