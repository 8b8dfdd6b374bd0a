"""Reading a log of any size for :func:`mlbench.triage`: whole when small, else its error lines; capped.

Budget (measured by ``bench/triage_speed.py``): linear in the input, bounded in memory, and the
Python work per line bounded in count, so a 10 MB log takes well under 2 s on a 2-core machine.

- At most ``max_triage_bytes`` (:class:`mlbench.budgets.Budgets`, default 64 MiB,
  ``MLBENCH_MAX_TRIAGE_BYTES``) of one input are kept in memory and searched: past it, the first
  quarter and the last three quarters (errors are usually at the end); the lines between are only
  counted, so line numbers stay right, and :attr:`Reading.note` says what was left out.
- Up to :data:`SMALL` (64 KiB and 4000 lines) an input is read whole. Above it, only its error
  lines go on (:mod:`mlbench.failures.error_lines`: whole tracebacks, repeats once, at most
  128 KiB and 4000 lines, the first and the last ones), and the note says which were left out.
"""

from __future__ import annotations

import io
import os
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from mlbench.budgets import budgets
from mlbench.errors import OptionsError
from mlbench.failures.error_lines import KEPT, KEPT_LINES, clean, error_lines

__all__ = ["Reading", "clean", "read_source", "read_text", "read_stream", "SMALL", "SMALL_LINES"]

SMALL, SMALL_LINES = 64 << 10, 4000
"""Bytes (characters of a str) and lines up to which an input is read whole."""
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Reading:
    """What triage reads of one input.

    Attributes
    ----------
    text : the text to diagnose (all of it, or the error lines of a large input).
    numbers : for each line of ``text``, its 1-based line number in the input; None when ``text`` is the input.
    summary : how it was read ("text", "stream", "large input, 12 distinct error-like line(s) kept").
    note : what of the input was not searched or not diagnosed, and how to search it all; "" when nothing was left out.
    """

    text: str
    numbers: list[int] | None
    summary: str
    note: str = ""


def _small(data: str | bytes) -> bool:
    return len(data) <= SMALL and data.count("\n" if isinstance(data, str) else b"\n") < SMALL_LINES


def read_source(source: Any, limit: int | None = None) -> Reading:
    """What triage reads of an exception, a str, bytes, a path or a stream (see the module's budget).

    Raises
    ------
    OptionsError
        For a path that is not a file, or a source of another type.
    """
    if isinstance(source, BaseException):
        text = "".join(traceback.format_exception(type(source), source, source.__traceback__))
        return read_text(text + _http_status_line(source), "exception", limit)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if _small(bytes(source[:SMALL + 1])):
            return Reading(clean(bytes(source).decode("utf-8", "replace")), None, "bytes")
        return read_stream(io.BytesIO(source), limit)
    if isinstance(source, str):
        return read_text(source, "text", limit)
    if isinstance(source, os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise OptionsError(f"triage: {path} is not a file; pass the log file's path, text, or an exception")
        with open(path, "rb") as handle:
            return read_stream(handle, limit)
    if hasattr(source, "read"):
        return read_stream(source, limit)
    raise OptionsError(f"triage takes an exception, text, bytes, a path or a stream, got {type(source).__name__}")


def _http_status_line(exc: BaseException) -> str:
    """``HTTP status 504 Gateway Timeout`` for an exception that carries an HTTP status (a client's
    error answer), so the status decides the class, not the words of the explanation."""
    import http

    status = getattr(exc, "status", None)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status < 600:
        return ""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP status {status} {phrase}\n"


def read_text(text: str, summary: str = "text", limit: int | None = None) -> Reading:
    """A str: whole when small; else, as UTF-8, its error lines (at most ``limit`` characters searched)."""
    if _small(text):
        return Reading(clean(text), None, summary)
    limit = budgets().max_triage_bytes if limit is None else limit
    head = limit // 4
    if len(text) <= limit:
        return _read_large(_Capture(text.encode("utf-8", "surrogatepass")), limit)
    tail = len(text) - (limit - head)
    return _read_large(_Capture(text[:head].encode("utf-8", "surrogatepass"), text[tail:].encode("utf-8", "surrogatepass"),
                                tail - head, text.count("\n", head, tail)), limit, unit="characters")


def read_stream(handle: IO, limit: int | None = None) -> Reading:
    """A binary or text stream: whole when small; otherwise its error lines with their numbers, at most
    ``limit`` bytes searched (default the ``max_triage_bytes`` budget)."""
    limit = budgets().max_triage_bytes if limit is None else limit
    first = _as_bytes(handle.read(SMALL + 1))
    if _small(first):
        return Reading(clean(first.decode("utf-8", "replace")), None, "stream")
    return _read_large(_capture(_chunks(handle, first), limit), limit)


# ---- the cap: head and tail in memory, the middle counted ----------------------------------------
@dataclass
class _Capture:
    """The bytes kept of an input: its head, its tail, and what lies between (bytes and newlines)."""

    head: bytes
    tail: bytes = b""
    skipped_bytes: int = 0
    skipped_lines: int = 0


def _capture(chunks: Iterable[bytes], limit: int) -> _Capture:
    """The first quarter of ``limit`` bytes and the last three quarters; the middle only counted."""
    head_left, head, tail, tail_size, tail_limit = limit // 4, [], deque(), 0, limit - limit // 4
    skipped_bytes = skipped_lines = 0
    for chunk in chunks:
        if head_left > 0:
            head.append(chunk[:head_left])
            chunk, head_left = chunk[head_left:], head_left - len(chunk)
        if chunk:
            tail.append(chunk)
            tail_size += len(chunk)
        while tail and tail_size - len(tail[0]) >= tail_limit:  # the oldest chunk is not needed
            dropped = tail.popleft()
            tail_size -= len(dropped)
            skipped_bytes, skipped_lines = skipped_bytes + len(dropped), skipped_lines + dropped.count(b"\n")
    rest = b"".join(tail)
    extra = max(0, len(rest) - tail_limit)
    skipped_bytes, skipped_lines = skipped_bytes + extra, skipped_lines + rest.count(b"\n", 0, extra)
    if not skipped_bytes:
        return _Capture(b"".join(head) + rest)
    return _Capture(b"".join(head), rest[extra:], skipped_bytes, skipped_lines)


# ---- error lines: forward from the start, backward from the end --------------------------------
def _read_large(capture: _Capture, limit: int, unit: str = "bytes") -> Reading:
    """The error lines of a large input, with their line numbers and what was left out."""
    segments = [(capture.head, 1)]  # (bytes, the line number of its first line)
    if capture.tail:
        segments.append((capture.tail, capture.head.count(b"\n") + 1 + capture.skipped_lines))
    lines, left_out = error_lines(segments)
    summary = f"large input, {len(lines)} distinct error-like line(s) kept"
    return Reading("\n".join(text for _, text in lines), [number for number, _ in lines], summary,
                   _note(capture, limit, unit, segments, left_out))


def _note(capture: _Capture, limit: int, unit: str, segments: list[tuple[bytes, int]],
          left_out: tuple[int, int] | None) -> str:
    """What was not searched (the middle of an input over the budget) or not diagnosed (error lines past
    :data:`KEPT`)."""
    notes = []
    if capture.skipped_bytes:
        total = len(capture.head) + len(capture.tail) + capture.skipped_bytes
        gap = (segments[1][1] - capture.skipped_lines, segments[1][1])
        notes.append(f"the input has {total:,} {unit}, over the budget max_triage_bytes = {limit:,}: its first "
                     f"{limit // 4:,} and last {limit - limit // 4:,} were searched, the {capture.skipped_bytes:,} between "
                     f"them (from line {gap[0]:,} to line {gap[1]:,}) were not; to search all, raise the environment "
                     "variable MLBENCH_MAX_TRIAGE_BYTES")
    if left_out and left_out[1] >= left_out[0]:
        notes.append(f"the error lines from line {left_out[0]:,} to line {left_out[1]:,} were not diagnosed: at most "
                     f"{KEPT:,} bytes and {KEPT_LINES:,} lines of error lines are, the first and the last ones")
    return "; ".join(notes)


def _chunks(handle: IO, first: bytes) -> Iterator[bytes]:
    yield first
    while True:
        data = handle.read(_CHUNK)
        if not data:
            return
        yield _as_bytes(data)


def _as_bytes(data: Any) -> bytes:
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data).encode("utf-8", "surrogatepass")
