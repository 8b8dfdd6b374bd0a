"""The three checkpoint formats, each checked against the budgets before torch or safetensors sees it.

- zip (``torch.save`` since 1.6): the member count and the sizes the members declare are read
  from the central directory before a member is inflated; every member is then read in chunks
  (CRC checked, bytes counted, the clock watched) and every ``*.pkl`` member scanned.
- legacy pickle (``_use_new_zipfile_serialization=False``, or ``pickle.dump``): the leading
  pickles are scanned, and the tensor bytes they declare must be in the file. A tar archive in
  disguise (torch < 0.4, which torch would still unpickle) is refused.
- safetensors: the header is counted (tensor entries) before it is parsed.

:func:`load_pickled` and :func:`load_safetensors` run those checks and then the only loaders
used (``torch.load(weights_only=True)`` with the named allowlist, safetensors); a refusal is a
:class:`~mlbench.errors.WeightsError` with a ``budget`` or ``code`` attribute.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import struct
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mlbench.budgets import Budgets, Deadline, budget_error
from mlbench.errors import WeightsError
from mlbench.models.pickle_scan import PickleScan, scan_pickle

__all__ = ["ALLOWED_GLOBALS", "FileFacts", "is_code_global", "scan_zip", "scan_legacy", "check_safetensors", "refusal",
           "load_safetensors", "load_pickled"]

ALLOWED_GLOBALS: dict[str, Any] = {"argparse.Namespace": argparse.Namespace}
"""Globals a checkpoint may hold beyond tensors: loaded only when named here."""


@dataclass
class FileFacts:
    """What was learnt from the bytes of a checkpoint file (mutable while it is being filled in)."""

    format: str = "unknown"
    crc_ok: bool | None = None
    unsafe_globals: tuple[str, ...] = ()
    load: str = "not attempted"
    devices: tuple[str, ...] = ()
    problems: list[tuple[str, str]] = field(default_factory=list)


_CODE_ROOTS = frozenset({
    "os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket", "runpy", "importlib",
    "pty", "webbrowser", "code", "codeop", "commands", "popen2", "pickle", "_pickle", "cPickle", "marshal", "types",
    "ctypes", "operator", "functools", "pdb", "bdb", "timeit", "platform", "multiprocessing", "asyncio", "threading",
    "_thread", "signal", "tempfile", "pathlib", "io", "_io", "glob", "urllib", "http", "ftplib", "smtplib",
    "telnetlib", "requests", "distutils", "setuptools", "pip", "posixpath", "ntpath", "zipimport", "pkgutil",
    "ensurepip", "venv", "sysconfig", "cProfile", "profile", "trace", "doctest", "unittest", "inspect", "gc",
    "_posixsubprocess", "_winapi", "_ctypes", "imp", "_imp", "_operator", "_functools", "_signal", "_socket", "ssl",
    "socketserver", "xmlrpc", "asyncore", "pydoc",
})
_CODE_NAMES = frozenset({"eval", "exec", "execfile", "compile", "system", "popen", "__import__", "getattr", "setattr",
                         "delattr", "open", "apply", "import_module", "attrgetter", "methodcaller", "spawn",
                         "spawnl", "spawnv", "execv", "execve", "Popen", "call", "check_call", "check_output",
                         "run", "load", "loads", "runcode", "run_path", "run_module", "interact", "runstring",
                         "pipepager", "tempfilepager", "pipe", "system_call"})
"""Modules, and names in any module, whose globals run code or reach the system: ``code_execution``."""
_DATA_BUILTINS = frozenset({"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "dict", "list",
                            "tuple", "int", "float", "bool", "str", "object"})
"""Builtins that only build a value: a pickled ``nn.Module`` needs ``builtins.set`` (its non-persistent
buffers), which is not on torch's allowlist but runs nothing (``unsafe_globals``, not ``code_execution``)."""


_DATA_CLASSES = frozenset({"pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
                           "pathlib.Path", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
                           "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath", "types.SimpleNamespace",
                           "argparse.Namespace", "functools.partial"})
"""Classes whose pickled instances only hold values (a path in the hyper-parameters, a namespace of
options): not on torch's allowlist (``unsafe_globals``), but building one runs nothing. A
``functools.partial`` (timm's ``partial(nn.LayerNorm, eps=1e-6)``) only calls what another global of
the file names, and each of those is judged on its own."""


def is_code_global(name: str) -> bool:
    """True for a global that runs code or reaches the system (``os.system``, ``builtins.eval``, ...); not
    for a builtin that only builds a value (``builtins.set``) or a class of values (``pathlib.PosixPath``)."""
    root, _, rest = name.partition(".")
    computed = name.startswith("<")  # a name computed while unpickling, or a copyreg extension code
    if (root in ("builtins", "__builtin__") and rest in _DATA_BUILTINS) or name in _DATA_CLASSES:
        return False
    return computed or root in _CODE_ROOTS or rest.rpartition(".")[2] in _CODE_NAMES


_LEGACY_PICKLES = 5
"""A legacy torch file: magic number, protocol, system info, the object, the storage keys; raw bytes follow."""
_SAFETENSORS_HEADER_LIMIT = 100_000_000
"""safetensors' own limit on its JSON header."""


def refusal(code: str, message: str) -> WeightsError:
    """A :class:`WeightsError` carrying the problem ``code`` it should be reported under."""
    exc = WeightsError(message)
    exc.code = code
    return exc


def _central_directory(handle: BinaryIO, size: int, limits: Budgets) -> None:
    """Refuse a zip whose central directory lists too many members, before ``zipfile`` parses it."""
    record = zipfile._EndRecData(handle)  # the end-of-central-directory record only
    if record is None:
        end = _archive_end(handle, size)
        if end is not None:
            raise refusal("load_failed", f"{size - end:,} bytes follow the end of the zip archive at byte {end:,} "
                          "(PyTorch reports 'failed finding central directory'): something was appended to the "
                          "file, a second save into the same file or a download's error text. Copy it again from "
                          f"its source, or keep its first {end:,} bytes (head -c {end} FILE > fixed.pth) and check "
                          "that copy")
        raise refusal("truncated", f"the zip archive is incomplete ({size:,} bytes, no end of central directory): "
                      "PyTorch reports 'failed finding central directory'. The copy or download stopped early: "
                      "copy it again")
    members = record[zipfile._ECD_ENTRIES_TOTAL]
    if members > limits.max_tensors + 16:
        raise budget_error(WeightsError, "max_tensors", limits.max_tensors,
                           "the members of the zip archive (one per tensor storage)", members)


_APPENDED_SEARCH = 64 << 20
"""How far from the end :func:`_archive_end` looks for an archive's end record (bytes)."""


def _archive_end(handle: BinaryIO, size: int) -> int | None:
    """Where a zip archive ends when bytes were appended after it (its end record is then further
    from the file's end than ``zipfile`` looks), else None. Searches the last 64 MiB, backwards."""
    chunk, position = 1 << 20, size
    while position > max(0, size - _APPENDED_SEARCH):
        start = max(0, position - chunk - 21)
        handle.seek(start)
        block = handle.read(position - start)
        found = block.rfind(b"PK\x05\x06")
        while found >= 0:
            record = block[found:found + 22]
            if len(record) == 22:
                _, _, _, _, entries, directory_size, directory_offset, comment = struct.unpack("<4s4H2LH", record)
                end = start + found + 22 + comment
                zip64 = block[max(0, found - 20):found].startswith(b"PK\x06\x07")  # torch.save writes zip64 records
                if (zip64 or entries and directory_offset + directory_size == start + found) and end < size:
                    return end
            found = block.rfind(b"PK\x05\x06", 0, found)
        if start == 0:
            break
        position = start + 21  # a record cut by the block's start is read whole by the next block
    return None


def _members(archive: zipfile.ZipFile, limits: Budgets) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_decompressed_bytes:
        largest = max(infos, key=lambda info: info.file_size)
        raise budget_error(WeightsError, "max_decompressed_bytes", limits.max_decompressed_bytes,
                           f"the zip members declare (largest: {largest.filename}, {largest.file_size:,} bytes "
                           f"from {largest.compress_size:,} compressed) in all", declared, " bytes")
    bomb = next((info for info in infos if info.compress_type != zipfile.ZIP_STORED and info.file_size > BOMB_BYTES
                 and info.file_size > BOMB_RATIO * max(info.compress_size, 1)), None)
    if bomb is not None:
        raise refusal("not_a_checkpoint", f"zip member {bomb.filename} inflates {bomb.compress_size:,} compressed bytes "
                      f"to {bomb.file_size:,} ({bomb.file_size // max(bomb.compress_size, 1):,}x): torch.save stores its "
                      "members uncompressed and weights do not compress like that, so this is a zip bomb or another "
                      "tool's archive; it was not inflated. Get the checkpoint from its source again")
    return infos


BOMB_BYTES = 16 * 2**20
BOMB_RATIO = 100
"""A compressed zip member over ``BOMB_BYTES`` inflated that inflates over ``BOMB_RATIO`` times is refused
before it is read: torch.save writes members stored, and tensor data compresses by a few percent."""


def _refuse_foreign_zip(names: list[str]) -> None:
    """Refuse a zip archive that ``torch.save`` did not write, naming what did: TorchScript
    (``torch.jit.save``: code, constants), NumPy's ``.npz``, a Keras model, or another archive."""
    if any(name.endswith("/constants.pkl") or "/code/__torch__" in name for name in names):
        raise refusal("torchscript", "this is a TorchScript archive (torch.jit.save), not a state dict: it was not "
                      "loaded (torch.jit.load runs its code). If you trust it, save its weights with "
                      "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'weights.pth') and check that")
    if any(name.endswith("data.pkl") for name in names):
        return
    if any(name.endswith(("/archive_format", "/serialized_exported_program.json")) or "/models/" in name and
           name.endswith(".json") for name in names):
        raise refusal("not_a_checkpoint", "this is a torch.export archive (torch.export.save, a .pt2 file), not a "
                      "torch.save checkpoint: it was not loaded. If you trust it, take its weights with "
                      "torch.save(torch.export.load(path).module().state_dict(), 'weights.pth') and check that")
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") if names else "no members"
    if names and all(name.endswith(".npy") for name in names):
        raise refusal("not_a_checkpoint", f"this is a NumPy .npz archive ({listed}), not a PyTorch checkpoint: convert "
                      "it with safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in np.load(path).items()}, "
                      "'weights.safetensors') if its names are the model's keys")
    if "config.json" in names and any(name.endswith(".h5") for name in names):
        raise refusal("not_a_checkpoint", f"this is a Keras model (.keras: {listed}), not a PyTorch checkpoint; these "
                      "models need PyTorch weights")
    if any(name.endswith(("/byteorder", "/version", "/.format_version")) or "/data/" in name for name in names):
        raise refusal("truncated", f"this torch.save archive has lost its data.pkl ({listed}): it is damaged; "
                      "restore a good copy")
    raise refusal("not_a_checkpoint", f"this zip archive holds {listed} but no data.pkl: torch.save did not write it "
                  "(a zipped folder? unpack it and pass the checkpoint inside)")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, deadline: Deadline) -> bytes | None:
    """Read one member in chunks (zipfile stops at the declared size and checks the CRC); its
    bytes for a pickle, ``b""`` for another member, None when its CRC fails."""
    kept, keep = [], info.filename.endswith(".pkl")
    try:
        with archive.open(info) as member:
            while chunk := member.read(1 << 20):
                deadline.check(f"reading zip member {info.filename}")
                if keep:
                    kept.append(chunk)
    except zipfile.BadZipFile as exc:
        if "CRC" not in str(exc):
            raise
        return None
    return b"".join(kept)


def scan_zip(handle: BinaryIO, size: int, limits: Budgets, deadline: Deadline) -> tuple[str | None, list[PickleScan]]:
    """CRC-check every member within the budgets and scan every pickle member.

    Returns the name of the first member whose CRC fails (None when all pass) and the scans.
    """
    _central_directory(handle, size, limits)
    handle.seek(0)
    bad, pickles = None, []
    try:
        with zipfile.ZipFile(handle) as archive:
            infos = _members(archive, limits)
            _refuse_foreign_zip([info.filename for info in infos])
            first = min((info.header_offset for info in infos), default=0)
            if first > 0:  # torch.save writes its first member at byte 0
                raise refusal("load_failed", f"{first:,} bytes come before the zip archive that ends the file: two "
                              "saves went into one file (torch.save to a file opened for appending), or data was put "
                              "in front of it; torch.load reads neither. Copy it again from its source, or keep the "
                              f"bytes from {first:,} on (tail -c +{first + 1} FILE > fixed.pth) and check that copy")
            for info in infos:
                data = _read_member(archive, info, deadline)
                if data is None and info.filename.endswith(".pkl"):
                    raise refusal("crc_mismatch", f"the pickle member {info.filename} fails its CRC check: the file "
                                  "was damaged after saving and was not loaded; restore a good copy")
                bad = bad or (info.filename if data is None else None)
                pickles += [data] if data else []
    except WeightsError:
        raise
    except Exception as exc:  # zipfile and zlib errors of every kind on a damaged archive
        raise refusal("truncated", f"the zip archive is damaged or incomplete ({size:,} bytes; {type(exc).__name__}: "
                      f"{exc}): PyTorch would report 'failed finding central directory' or a read error. "
                      "Copy it again") from None
    return bad, [scan_pickle(io.BytesIO(data), limits, deadline) for data in pickles]


def scan_legacy(handle: BinaryIO, size: int, limits: Budgets, deadline: Deadline) -> list[PickleScan]:
    """Scan the leading pickles of a legacy torch file or a plain pickle; the tensor bytes they
    declare must be in the file."""
    handle.seek(0)
    if tarfile.is_tarfile(handle):
        raise refusal("unreadable_pickle", "this is a tar archive of pickles (the torch < 0.4 format), which torch "
                      "would unpickle without the checks made here; it was not loaded. Re-save it with a current "
                      "torch: torch.save(torch.load(path), new_path) on a trusted machine")
    handle.seek(0)
    scans = []
    while len(scans) < _LEGACY_PICKLES and handle.tell() < size:
        scans.append(scan_pickle(handle, limits, deadline))
    declared = sum(scan.storage_bytes for scan in scans)
    if declared > size:
        raise refusal("truncated", f"the pickle declares {declared:,} bytes of tensor data but the file has only "
                      f"{size:,} bytes: it is truncated or forged (torch would allocate the declared size); "
                      "copy it again")
    return scans


def check_safetensors(handle: BinaryIO, size: int, limits: Budgets) -> None:
    """Refuse a safetensors file whose header is cut short or lists more tensors than the budget."""
    handle.seek(0)
    announced = struct.unpack("<Q", handle.read(8))[0]
    if announced + 8 > size:
        raise refusal("truncated", f"the safetensors header announces {announced:,} bytes of metadata but the "
                      f"file has only {size:,} bytes: the copy or download stopped early; copy it again")
    if announced > _SAFETENSORS_HEADER_LIMIT:
        raise refusal("load_failed", f"the safetensors header announces {announced:,} bytes of metadata, over "
                      f"safetensors' own limit of {_SAFETENSORS_HEADER_LIMIT:,}: the file is damaged or forged")
    header = handle.read(announced)
    tensors = header.count(b'"data_offsets"')
    if tensors > limits.max_tensors:
        raise budget_error(WeightsError, "max_tensors", limits.max_tensors, "the tensors in the safetensors header",
                           tensors)
    described, held = _safetensors_data_end(header), size - 8 - announced
    if described is not None and described > held:
        raise refusal("truncated", f"the safetensors header describes {described:,} bytes of tensor data but the file "
                      f"holds {held:,} after its header: the copy or download stopped early; copy it again")
    if described is not None and described < held:
        raise refusal("load_failed", f"{held - described:,} bytes follow the {described:,} bytes of tensor data that "
                      "the safetensors header describes (safetensors refuses such a file): something was appended "
                      "to it, or two files were written into one; copy it again from its source")


def _safetensors_data_end(header: bytes) -> int | None:
    """The end of the last tensor's bytes that a safetensors header lists; None where the header is not
    a JSON object of such entries (safetensors' own error then says what is wrong)."""
    try:
        entries = json.loads(header.rstrip(b" \0"))
        return max((int(entry["data_offsets"][1]) for name, entry in entries.items() if name != "__metadata__"),
                   default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _classify_globals(scans: list[PickleScan], facts: FileFacts) -> None:
    """Globals beyond torch's weights-only allowlist: code-running ones, then the others."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals())
    found = sorted({name for scan in scans for name in scan.globals if name not in allowed})
    facts.unsafe_globals = tuple(found)
    code = [name for name in found if is_code_global(name)]
    if code:
        facts.problems.append(("code_execution", f"the pickle calls {code}: unpickling it with pickle.load or an "
                               "unrestricted torch.load would run that code. It was not loaded and nothing in it ran. "
                               "Do not load this file anywhere; get the weights from a trusted source"))
    other = [name for name in found if name not in ALLOWED_GLOBALS and name not in code]
    if other:
        facts.problems.append(("unsafe_globals", f"the pickle needs globals {other} that are not on the allowlist "
                               f"{sorted(ALLOWED_GLOBALS)}; it was not loaded. Re-save only the state dict "
                               "(torch.save(model.state_dict())) or as safetensors"))


def _torch_message(exc: Exception) -> str:
    """torch's error without its advice to load unsafely: the unpickler's own line, or the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("WeightsUnpickler error")]
    text = (own or [line for line in lines if "weights_only" not in line] or ["no message"])[0]
    return f"{type(exc).__name__}: {text[:200]}"


_PROTOCOL_OPCODES = {149: "FRAME, pickle protocol 4 or 5", 142: "BINBYTES8, pickle protocol 4", 140: "SHORT_BINUNICODE, "
                     "pickle protocol 4", 148: "MEMOIZE, pickle protocol 4", 150: "BYTEARRAY8, pickle protocol 5",
                     66: "BINBYTES, pickle protocol 3", 67: "SHORT_BINBYTES, pickle protocol 3",
                     76: "LONG, pickle protocol 0", 73: "INT, pickle protocol 0 or 1", 70: "FLOAT, pickle protocol 0",
                     86: "UNICODE, pickle protocol 0", 83: "STRING, pickle protocol 0", 100: "DICT, pickle protocol 0",
                     108: "LIST, pickle protocol 0", 116: "TUPLE, pickle protocol 0", 112: "PUT, pickle protocol 0",
                     103: "GET, pickle protocol 0"}
"""Opcodes that torch's weights-only unpickler does not read, though the scan (all protocols) did:
a file written with ``torch.save(..., pickle_protocol=N)`` or plain ``pickle.dump``, not damaged."""


def _why_load_failed(exc: Exception) -> str:
    """The reason torch's weights-only load failed after the scan passed: a pickle protocol it does
    not read (the opcode named), else damage."""
    if "Invalid magic number" in str(exc):
        return ("it is a plain pickle (pickle.dump, joblib), not a file torch.save wrote, which torch.load does not "
                "read (or an old torch.save file whose first bytes are damaged): if you trust it, unpickle it once "
                "and re-save the state dict with torch.save(state_dict) or as safetensors")
    found = re.search(r"Unsupported operand (\d+)", str(exc))
    opcode = int(found.group(1)) if found else None
    if opcode in _PROTOCOL_OPCODES:
        return (f"opcode {opcode} ({_PROTOCOL_OPCODES[opcode]}) is one torch's safe loader does not read, though the "
                "file may be intact: it was written with torch.save(..., pickle_protocol=...) or pickle.dump. If you "
                "trust it, load it once with weights_only=False and re-save the state dict with torch.save(state_dict) "
                "(the default protocol) or as safetensors")
    return "the file is damaged. Restore a good copy"


def _torch_load(handle: BinaryIO, facts: FileFacts) -> Any:
    """``torch.load(weights_only=True)``, allowlisted globals by name, recording saved devices."""
    locations: list[str] = []

    def to_cpu(storage, location):
        locations.append(str(location))
        return storage

    allow = [ALLOWED_GLOBALS[g] for g in facts.unsafe_globals if g in ALLOWED_GLOBALS]
    handle.seek(0)
    try:
        with torch.serialization.safe_globals(allow), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on a pickle protocol: the failure says it
            obj = torch.load(handle, map_location=to_cpu, weights_only=True)
    except Exception as exc:
        facts.load = f"weights_only=True failed: {type(exc).__name__}"
        facts.problems.append(("load_failed", f"torch.load(weights_only=True) failed ({_torch_message(exc)}) after "
                               f"the scan passed; {_why_load_failed(exc)}"))
        return None
    names = [g for g in facts.unsafe_globals if g in ALLOWED_GLOBALS]
    facts.load = "weights_only=True" + (f" with the named allowlist {names}" if names else "")
    facts.devices = tuple(sorted(set(locations)))
    return obj


def load_safetensors(handle: BinaryIO, path: Path, size: int, limits: Budgets, facts: FileFacts) -> Any:
    """Check the header within ``limits``, then load the tensors (safetensors runs no code)."""
    from safetensors.torch import load_file

    check_safetensors(handle, size, limits)
    descriptor = f"/proc/self/fd/{handle.fileno()}"  # the file checked, not whatever the path names now
    try:
        obj = load_file(descriptor if os.path.exists(descriptor) else str(path))
    except Exception as exc:
        why = ("its header does not follow the format the installed safetensors reads: a tool other than the "
               "safetensors library wrote it (metadata values must be strings), or a newer safetensors did (a dtype "
               "this one does not know: pip install -U safetensors); re-save the tensors with "
               "safetensors.torch.save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})"
               if "header" in str(exc) else "the file is truncated or damaged; copy it again")
        facts.problems.append(("load_failed", f"safetensors could not read it ({exc}): {why}"))
        return None
    facts.load, facts.devices = "safetensors (no code possible)", ("cpu",)
    return obj


def load_pickled(handle: BinaryIO, size: int, limits: Budgets, deadline: Deadline, facts: FileFacts) -> Any:
    """Check and scan a zip or legacy checkpoint; ``torch.load(weights_only=True)`` only when nothing
    unsafe was found. Raises :class:`WeightsError` (``budget`` or ``code``) when it refuses."""
    if facts.format == "zip":
        bad, scans = scan_zip(handle, size, limits, deadline)
        facts.crc_ok = bad is None
        if bad is not None:
            facts.problems.append(("crc_mismatch", f"member {bad} fails its CRC check: the file was damaged after "
                                   "saving (torch.load would load it silently with changed weights); restore a good copy"))
    else:
        scans = scan_legacy(handle, size, limits, deadline)
    _classify_globals(scans, facts)
    if any(code in ("code_execution", "unsafe_globals") for code, _ in facts.problems):
        facts.load = "refused: unsafe globals (nothing was unpickled)"
        return None
    return _torch_load(handle, facts)
