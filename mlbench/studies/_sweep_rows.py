"""The rows file of :func:`mlbench.sweep`: JSON lines, one row per task, appended as tasks end, read back to resume.

A file that a crash, a full disk, two writers or a hand edit damaged must neither stop a resume nor
lose a row, and a new row must never land on a torn line:

- a line that is not a row (not UTF-8, not JSON, or JSON that is not an object with a string
  ``key``, ``image`` and ``model`` and a known ``status``: ``{}``, ``null``, ``42``) is moved to
  ``<rows>.rejected``, one JSON record per line (``line``, ``reason``, ``text``, and ``base64`` of
  the bytes when they are not UTF-8), and an :class:`~mlbench.errors.MlbenchWarning` says how many
  and which lines; their tasks simply run again;
- a last line without its newline (a write cut short) is given its newline when it is a whole row,
  else moved aside the same way, before anything is appended;
- the good lines are kept byte for byte: the file is rewritten to a temporary file beside it and
  put in place with ``os.replace`` (a crash leaves the old file or the new one, never half of each),
  after the rejected records are safely written; each repair's records carry a batch id, so a
  repair cut short and run again adds no duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlbench.errors import MlbenchWarning

__all__ = ["STATUSES", "RowsRepair", "parse_row", "read_rows", "repair_rows", "rejected_path"]

STATUSES = ("ok", "failed", "timeout", "crashed")
_TEXT_FIELDS = ("key", "image", "model")


@dataclass(frozen=True)
class RowsRepair:
    """What :func:`repair_rows` found and did.

    Attributes
    ----------
    rows : the good rows by key (the last one of a key wins).
    rejected : ``(line, reason)`` of each line moved to ``rejected_path``.
    rejected_path : ``<rows>.rejected``, or None when nothing was rejected.
    newline_added : True when the last line was a whole row without its newline, and got one.
    """

    rows: dict[str, dict]
    rejected: tuple[tuple[int, str], ...] = ()
    rejected_path: Path | None = None
    newline_added: bool = False


def rejected_path(path: str | os.PathLike) -> Path:
    """``rows.jsonl`` -> ``rows.jsonl.rejected``: where the lines that are not rows are kept."""
    return Path(f"{path}.rejected")


def parse_row(raw: bytes) -> tuple[dict | None, str]:
    """One line of the rows file: ``(row, "")``, or ``(None, reason)``; ``(None, "")`` for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
    if not text.strip():
        return None, ""
    try:
        row = json.loads(text)
    except RecursionError:
        return None, "not a row: JSON nested too deep"
    except ValueError as exc:
        return None, f"not JSON ({str(exc)[:80]})"
    if not isinstance(row, dict):
        return None, f"not a row: JSON {type(row).__name__ if row is not None else 'null'}, not an object"
    missing = [name for name in _TEXT_FIELDS if not isinstance(row.get(name), str)]
    if missing:
        return None, f"not a row: no text field {missing[0]!r}"
    if row.get("status") not in STATUSES:
        return None, f"not a row: status {row.get('status')!r} is not one of {', '.join(STATUSES)}"
    return row, ""


def _scan(data: bytes) -> tuple[dict[str, dict], list[bytes], list[tuple[int, bytes, str]], bytes]:
    """(rows by key, good lines, bad lines as (line, bytes, reason), the fragment after the last newline)."""
    body, newline, fragment = data.rpartition(b"\n")
    rows, good, bad = {}, [], []
    for number, raw in enumerate(body.split(b"\n") if newline else [], start=1):
        row, reason = parse_row(raw)
        if row is not None:
            rows[row["key"]] = row
            good.append(raw)
        elif reason:
            bad.append((number, raw, reason))
    return rows, good, bad, fragment


def read_rows(out: str | os.PathLike) -> dict[str, dict]:
    """Rows already written to a sweep's JSON-lines file, by key; lines that are not rows (and a torn
    last line) are left out. Reads only: :func:`repair_rows` moves such lines aside."""
    path = Path(out)
    if not path.exists():
        return {}
    rows, _, _, fragment = _scan(path.read_bytes())
    row, _ = parse_row(fragment)
    if row is not None:
        rows[row["key"]] = row
    return rows


def repair_rows(out: str | os.PathLike) -> RowsRepair:
    """Make a rows file safe to resume and append to; return its rows and what was moved aside.

    Lines that are not rows, and a torn last line, go to ``<rows>.rejected`` and leave the file
    (see the module's notes); a last row without its newline gets one. Warns
    (:class:`~mlbench.errors.MlbenchWarning`) with how many lines and which, when any was moved.
    """
    path = Path(out)
    if not path.exists():
        return RowsRepair({})
    data = path.read_bytes()
    rows, good, bad, fragment = _scan(data)
    newline_added = False
    if fragment:
        row, reason = parse_row(fragment)
        if row is not None:  # a whole row that lacks only its newline
            rows[row["key"]] = row
            good.append(fragment)
            newline_added = True
        else:
            bad.append((data.count(b"\n") + 1, fragment, f"torn last line (no newline at the end){': ' + reason if reason else ''}"))
    if not bad:
        if newline_added:
            with open(path, "ab") as handle:
                handle.write(b"\n")
        return RowsRepair(rows, newline_added=newline_added)
    side = rejected_path(path)
    _set_aside(path, side, bad)
    _replace(path, b"".join(line + b"\n" for line in good))
    where = ", ".join(f"line {number}: {reason}" for number, _, reason in bad[:5]) + (", ..." if len(bad) > 5 else "")
    warnings.warn(f"{path}: {len(bad)} line(s) that are not sweep rows were moved to {side} ({where}); their tasks "
                  "run again. Look there for what damaged the file (a crash, a full disk, a second sweep writing "
                  "the same file).", MlbenchWarning, stacklevel=3)
    return RowsRepair(rows, tuple((number, reason) for number, _, reason in bad), side, newline_added)


def _set_aside(path: Path, side: Path, bad: list[tuple[int, bytes, str]]) -> None:
    """Append ``bad`` to the rejected file, once: the batch id of the same lines from the same file is
    looked for first, so a repair cut short before the rows file was replaced adds nothing twice."""
    digest = hashlib.sha256(str(path.name).encode())
    for number, raw, _ in bad:
        digest.update(b"%d:%d:" % (number, len(raw)) + raw)
    batch = digest.hexdigest()[:16]
    if side.exists() and f'"batch": "{batch}"'.encode() in side.read_bytes():
        return
    records = []
    for number, raw, reason in bad:
        record = {"batch": batch, "file": path.name, "line": number, "reason": reason,
                  "text": raw.decode("utf-8", "backslashreplace")}
        if "not UTF-8" in reason:
            record["base64"] = base64.b64encode(raw).decode("ascii")
        records.append(json.dumps(record) + "\n")
    with open(side, "a", encoding="utf-8") as handle:
        handle.write("".join(records))
        handle.flush()
        os.fsync(handle.fileno())


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and ``os.replace``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.copymode(path, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
