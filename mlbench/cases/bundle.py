"""The files of a case, read from a folder or a zip within the budgets, and written back.

A case comes from another team, so its container is untrusted before its contents are. Reading
refuses, before a byte of a member is inflated: more members than ``max_case_members`` (from the
zip's end record, before :mod:`zipfile` parses the central directory), names that are not plain
relative paths (absolute, ``..``, drive letters, backslashes, NUL, empty parts), duplicate names,
symlinks and other non-regular entries (the Unix mode in a zip entry; ``lstat`` in a folder, never
followed), encrypted members, compressions other than stored and deflate, and declared sizes over
``max_case_member_bytes`` or ``max_case_bytes``. Members are then inflated in chunks, every byte
counted against the same budgets (a member whose data inflates past what it declares fails its CRC),
within ``max_seconds``. Every refusal is a :class:`CaseError` naming the case, the entry and the fix.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path

from mlbench.budgets import Budgets, Deadline, budget_error, describe_file, open_regular, read_regular
from mlbench.errors import MlbenchError

__all__ = ["CaseError", "read_files", "write_files", "check_name"]


class CaseError(MlbenchError, ValueError):
    """A case file that is incomplete, damaged (checksum), unsafe or cannot be replayed."""


_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_PARTS = 4
_CHUNK = 1 << 20
_DIRECTORY_ENTRY = 1024
"""Bytes of the zip directory allowed per member: a 46-byte record, the name, extra fields."""
_SENT = ("it was not read. A case holds only the files mb.save_case writes, under plain relative names: "
         "ask its sender for the case as saved, or re-save it with mb.save_case")


def check_name(name: str, where: object) -> None:
    """Refuse a member name that is not a plain relative path (letters, digits, ``_-.``, ``/`` between parts)."""
    parts = name.split("/")
    reason = ("is an absolute path" if name.startswith(("/", "\\")) else
              "has a drive letter" if re.match(r"[A-Za-z]:", name) else
              "has a backslash" if "\\" in name else
              "has a NUL character" if "\0" in name else
              "leaves the case ('..')" if ".." in parts else
              "has an empty or '.' part" if any(p in ("", ".") for p in parts) else
              f"is nested {len(parts)} deep (at most {_MAX_PARTS})" if len(parts) > _MAX_PARTS else
              "has a part other than letters, digits, '_', '-' and '.' (not first)" if not all(_PART.fullmatch(p) for p in parts)
              else "")
    if reason:
        raise CaseError(f"case {where}: the entry {name[:200]!r} {reason}; {_SENT}")


def read_files(source: Path, limits: Budgets) -> dict[str, bytes]:
    """Every file of the case folder or zip at ``source``, by relative name.

    Raises
    ------
    CaseError
        For anything the module docstring lists, a missing path, or a path that is neither a
        folder nor a zip.
    """
    deadline = Deadline(limits.max_seconds, CaseError)
    if source.is_dir():
        return _read_folder(source, limits, deadline)
    code, words = describe_file(source)
    if code == "missing":
        raise CaseError(f"no case at {source}: it {words}; expected a case folder or .zip saved by mb.save_case")
    with open_regular(source, CaseError, max_bytes=limits.max_case_bytes) as handle:
        try:
            return _read_zip(handle, source, limits, deadline)
        except (CaseError, MemoryError):
            raise
        except Exception as exc:  # zipfile, zlib and struct errors of every kind on a damaged archive
            raise CaseError(f"case {source}: the zip archive is damaged or not one zipfile can read "
                            f"({type(exc).__name__}: {str(exc)[:200]}); copy the case again from its sender") from None


def _count(what: str, where: object, count: int, limits: Budgets) -> None:
    if count > limits.max_case_members:
        raise budget_error(CaseError, "max_case_members", limits.max_case_members, f"case {where}: {what}", count)


def _read_zip(handle, source: Path, limits: Budgets, deadline: Deadline) -> dict[str, bytes]:
    record = zipfile._EndRecData(handle)  # the end-of-central-directory record only
    if record is None:
        raise CaseError(f"{source} is neither a case folder nor a zip file (no zip end record in its "
                        f"{os.fstat(handle.fileno()).st_size:,} bytes); pass the folder or .zip mb.save_case wrote")
    _count("the members its zip directory announces", source, record[zipfile._ECD_ENTRIES_TOTAL], limits)
    if record[zipfile._ECD_SIZE] > limits.max_case_members * _DIRECTORY_ENTRY:
        raise budget_error(CaseError, "max_case_members", limits.max_case_members,
                           f"case {source}: the members its zip directory of {record[zipfile._ECD_SIZE]:,} bytes "
                           "can hold (46 bytes each at least)", record[zipfile._ECD_SIZE] // 46)
    handle.seek(0)
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(handle) as archive:
        infos = archive.infolist()
        _count("the members of the zip", source, len(infos), limits)
        for info in infos:
            _check_entry(info, source, limits)
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CaseError(f"case {source}: the zip holds {twice[:5]} more than once (which copy counts depends on "
                            f"the reader); {_SENT}")
        declared = sum(info.file_size for info in infos)
        if declared > limits.max_case_bytes:
            raise budget_error(CaseError, "max_case_bytes", limits.max_case_bytes,
                               f"case {source}: the sizes its members declare, together", declared, " bytes")
        total = 0
        for info in infos:
            if not info.is_dir():
                files[info.filename] = _inflate(archive, info, source, limits, deadline, total)
                total += len(files[info.filename])
    return files


def _check_entry(info: zipfile.ZipInfo, source: Path, limits: Budgets) -> None:
    check_name(info.orig_filename.rstrip("/") if info.is_dir() else info.orig_filename, source)
    kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # a Unix mode, when made on Unix
    if stat.S_ISLNK(kind) or kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symlink" if stat.S_ISLNK(kind) else f"a special file (mode {kind:o})"
        raise CaseError(f"case {source}: the entry {info.filename!r} is {what}, which could pull a file of this machine "
                        f"into the case (e.g. when it is unpacked and saved again); {_SENT}")
    if info.flag_bits & 0x1:
        raise CaseError(f"case {source}: the entry {info.filename!r} is encrypted; cases are never encrypted: {_SENT}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CaseError(f"case {source}: the entry {info.filename!r} uses compression method {info.compress_type}; "
                        f"expected stored (0) or deflate (8), as mb.save_case and common zip tools write: {_SENT}")
    if info.file_size > limits.max_case_member_bytes:
        raise budget_error(CaseError, "max_case_member_bytes", limits.max_case_member_bytes,
                           f"case {source}: the entry {info.filename!r} declares (from {info.compress_size:,} "
                           "compressed bytes)", info.file_size, " bytes")


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: Path, limits: Budgets, deadline: Deadline,
             before: int) -> bytes:
    """One member, inflated in chunks of at most what it declares and counted (zipfile also stops at the
    declared size and checks the CRC: a member inflating past it fails)."""
    member_limit = min(limits.max_case_member_bytes, limits.max_case_bytes - before)
    parts, size = [], 0
    with archive.open(info) as member:
        while chunk := member.read(min(_CHUNK, member_limit + 1 - size, info.file_size + 1 - size)):
            size += len(chunk)
            if size > member_limit:
                name = "max_case_member_bytes" if member_limit == limits.max_case_member_bytes else "max_case_bytes"
                raise budget_error(CaseError, name, getattr(limits, name),
                                   f"case {source}: the entry {info.filename!r} inflates past", size, " bytes")
            parts.append(chunk)
            deadline.check(f"reading case {source}")
    return b"".join(parts)


def _read_folder(source: Path, limits: Budgets, deadline: Deadline) -> dict[str, bytes]:
    """The files of a case folder; symlinks and special files refused (with ``lstat``, never followed)."""
    files: dict[str, bytes] = {}
    pending, seen, total = [(source, "")], 0, 0
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                seen += 1
                _count("the entries of the folder", source, seen, limits)
                rel = prefix + entry.name
                check_name(rel, source)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append((Path(entry.path), rel + "/"))
                    continue
                if not stat.S_ISREG(mode):
                    what = f"is a symlink to {os.readlink(entry.path)!r}" if stat.S_ISLNK(mode) else describe_file(entry.path)[1]
                    raise CaseError(f"case {source}: {rel} {what}, not a regular file: refused (a case never links "
                                    f"outside itself); {_SENT}")
                limit = min(limits.max_case_member_bytes, limits.max_case_bytes - total)
                name = "max_case_member_bytes" if limit == limits.max_case_member_bytes else "max_case_bytes"
                if entry.stat(follow_symlinks=False).st_size > limit:
                    raise budget_error(CaseError, name, getattr(limits, name), f"case {source}: the file {rel}",
                                       entry.stat(follow_symlinks=False).st_size, " bytes")
                files[rel] = read_regular(entry.path, CaseError, max_bytes=limit)
                total += len(files[rel])
                deadline.check(f"reading case {source}")
    return dict(sorted(files.items()))


def write_files(target: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` as a folder, or as one zip (deflate, fixed dates) when ``target`` ends in ``.zip``."""
    if target.suffix == ".zip":
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "x", zipfile.ZIP_DEFLATED) as archive:
            for rel in sorted(files):
                info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, files[rel])
        return
    for rel, data in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
