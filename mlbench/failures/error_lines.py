"""The error lines of a large log, for :func:`mlbench.triage`: found at C speed, at most :data:`KEPT` of them.

The lines holding one of a few keywords (``bytes.find`` on the lower-cased text) are the error
lines; each Python traceback is taken whole (its ``Traceback`` line, its indented frames and the
exception line, at most 200 lines) so the rules still see the frames, and repeats (digits ignored)
are kept once. A line longer than 2000 bytes keeps its head and windows around its first and last
keyword hits (:func:`_cut`). At most :data:`KEPT` bytes and :data:`KEPT_LINES` lines are kept: the
first quarter found searching forward from the start, the rest searching backward from the end (32
KiB at a time, doubling up to 1 MiB), so a log dense with errors costs no more than one with few.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["KEPT", "KEPT_LINES", "clean", "error_lines"]

KEPT, KEPT_LINES = 128 << 10, 4000
"""Bytes and lines of error lines of a larger input that go on to the classifier (head and tail)."""
_LONG, _HEAD, _WINDOW, _SPAN = 2000, 600, 600, 1 << 16  # bytes: a longer line keeps its head and windows around keyword hits
_SEP = " \u2026 ".encode()
_FIRST_WINDOW, _LAST_WINDOW = 32 << 10, 1 << 20  # bytes searched at a time: doubling from the first to the last
_TRACEBACK = b"traceback (most recent call last)"
_TRACEBACK_LINES = 200
_SEEN = 50_000  # distinct lines remembered for de-duplication
_KEYWORDS = tuple(k.encode() for k in (  # every real error line we know holds one of these (lower case)
    "error", "exception", "traceback", "fail", "warn", "killed", "timeout", "timed out", "cuda", "memory", "nan",
    "invalid", "cannot", "unable", "could not", "not found", "denied", "refused", "sigkill", '" 4', '" 5', "exited",
    "exceed", "overload", "oom", "mismatch", "expected", "unsupported", "not supported", "missing", "no such", "too large",
    "too many", "unavailable", "gateway", "unprocessable", "bad request"))


def clean(text: str) -> str:
    """``text`` without NUL characters and with ``\\n`` line ends only."""
    return text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")


class _Kept:
    """Error lines kept: the first quarter of the budget in input order, the rest from the end backward."""

    def __init__(self) -> None:
        self.head: list[tuple[int, str]] = []
        self.tail: list[tuple[int, str]] = []  # newest first while searching backward
        self.sizes = [0, 0]
        self.seen: set[bytes] = set()

    def full(self, part: int) -> bool:
        lines = (self.head, self.tail)[part]
        return self.sizes[part] >= (KEPT // 4, KEPT - KEPT // 4)[part] or len(lines) >= (KEPT_LINES // 4, KEPT_LINES - KEPT_LINES // 4)[part]

    def add(self, part: int, number: int, lines: list[bytes], key: bytes) -> None:
        """Keep ``lines`` (one error line, or a traceback) from line ``number`` on, unless seen before."""
        if key in self.seen:
            return
        if len(self.seen) < _SEEN:
            self.seen.add(key)
        found = [(number + offset, clean(line.decode("utf-8", "replace"))) for offset, line in enumerate(lines)]
        self.sizes[part] += sum(len(text) + 1 for _, text in found)
        if part == 0:
            self.head.extend(found)
        else:
            self.tail.extend(reversed(found))

    def lines(self) -> list[tuple[int, str]]:
        return self.head + self.tail[::-1]


def error_lines(segments: list[tuple[bytes, int]]) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
    """The error lines of an input, as ``(line number, text)`` in input order, and the first and last line
    numbers of the part left out between the head and the tail (None when nothing was).

    ``segments`` are the input's pieces in order, ``(bytes, number of its first line)`` each: the whole
    input, or its head and tail when its middle was not read.
    """
    kept = _Kept()
    stop = (0, 0)  # where the forward search stopped: (segment, offset)
    for index, (data, first_line) in enumerate(segments):
        offset = _forward(data, first_line, kept)
        stop = (index, offset)
        if offset < len(data):
            break
    reached = _backward(segments, stop, kept)
    left_out = (_line_at(segments, stop), _line_at(segments, reached) - 1) if reached != stop else None
    return kept.lines(), left_out


def _line_at(segments: list[tuple[bytes, int]], where: tuple[int, int]) -> int:
    data, first_line = segments[where[0]]
    return first_line + data.count(b"\n", 0, where[1])


def _forward(data: bytes, first_line: int, kept: _Kept) -> int:
    """Keep error lines of ``data`` from its start until the head budget is full; where it stopped."""
    lo, line, window = 0, first_line, _FIRST_WINDOW
    while lo < len(data):
        hi = data.find(b"\n", min(len(data), lo + window)) + 1 or len(data)
        window = min(2 * window, _LAST_WINDOW)
        for start, stop, number, lines, key in _candidates(data, lo, hi, line):
            if kept.full(0):
                return start
            kept.add(0, number, lines, key)
            hi = max(hi, min(len(data), stop + 1))  # a traceback may run past the window
        line += data.count(b"\n", lo, hi)
        lo = hi
    return len(data)


def _backward(segments: list[tuple[bytes, int]], stop: tuple[int, int], kept: _Kept) -> tuple[int, int]:
    """Keep error lines from the end backward, down to ``stop`` or until the tail budget is full; where it stopped."""
    for index in range(len(segments) - 1, stop[0] - 1, -1):
        data, first_line = segments[index]
        floor = stop[1] if index == stop[0] else 0
        hi, line, window = len(data), first_line + data.count(b"\n"), _FIRST_WINDOW  # ``line``: the number at ``hi``
        while hi > floor:
            lo = max(floor, data.rfind(b"\n", floor, max(floor, hi - window)) + 1)
            window = min(2 * window, _LAST_WINDOW)
            line -= data.count(b"\n", lo, hi)
            for start, end, number, lines, key in reversed(list(_candidates(data, lo, hi, line, end=hi))):
                if kept.full(1):
                    return index, min(len(data), end + 1)
                kept.add(1, number, lines, key)
            hi = lo
    return stop


def _cut(line: bytes, low: bytes) -> bytes:
    """A line of at most about 2000 bytes: whole when short; else its head and windows around the
    first and the last keyword hit after the head, joined by `` … `` so the cut shows.

    A JSON log record often holds a whole escaped traceback on one line: the head names the record,
    the first hit is where the trouble starts and the last is usually the exception message.
    """
    if len(line) <= _LONG:
        return line
    tail = max(_HEAD, len(low) - _SPAN)  # both searches bounded: a 100 MB line without newlines stays fast
    hits = [p for k in _KEYWORDS for p in (low.find(k, _HEAD, _HEAD + _SPAN), low.rfind(k, tail)) if p >= 0]
    if not hits:
        return line[:_LONG]
    spans = [(_HEAD, _HEAD)]
    for hit in (min(hits), max(hits)):
        lo, hi = max(_HEAD, hit - _WINDOW // 3), min(len(line), hit + _WINDOW)
        if lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    parts = [line[:spans[0][1]]] + [line[lo:hi] for lo, hi in spans[1:]]
    return _SEP.join(parts)


def _traceback_end(data: bytes, start: int, limit: int) -> int:
    """Where the traceback whose header line starts at ``start`` ends: after its indented lines and the
    exception line that follows them (at most :data:`_TRACEBACK_LINES` lines, never past ``limit``)."""
    end = data.find(b"\n", start, limit)
    for _ in range(_TRACEBACK_LINES):
        if end < 0 or end + 1 >= limit:
            return limit if end < 0 else end
        indented = data[end + 1:end + 2] in (b" ", b"\t")
        following = data.find(b"\n", end + 1, limit)
        if not indented:
            return limit if following < 0 else following  # the exception line closes the traceback
        end = following
    return limit if end < 0 else end


def _candidates(data: bytes, lo: int, hi: int, first_line: int, end: int | None = None) -> Iterator[tuple]:
    """The error lines of ``data[lo:hi]`` (whole lines), in order: ``(start, stop, line number, lines, key)``
    (``stop``: where the last line ends), a traceback as one entry of all its lines; ``end`` bounds how far a
    traceback may run (default: the end of ``data``).

    Keywords are found with ``bytes.find`` on the lower-cased text (C speed); only lines holding one
    are sliced and cut.
    """
    end = len(data) if end is None else end
    low = data[lo:hi].lower()
    starts: set[int] = set()
    for keyword in _KEYWORDS:
        pos = low.find(keyword)
        while pos >= 0:
            starts.add(low.rfind(b"\n", 0, pos) + 1)
            stop = low.find(b"\n", pos)
            pos = -1 if stop < 0 else low.find(keyword, stop)
    counted, line, covered = lo, first_line, lo
    for start in sorted(starts):
        start += lo
        if start < covered:
            continue  # inside a traceback already taken
        line += data.count(b"\n", counted, start)
        counted = start
        stop = data.find(b"\n", start, end)
        stop = end if stop < 0 else stop
        if low.find(_TRACEBACK, start - lo, stop - lo) >= 0:
            covered = _traceback_end(data, start, end)
            lines = [_cut(x, x.lower()) for x in data[start:covered].split(b"\n")]
            key = b"\x00" + b"\n".join(lines[:2] + lines[-2:])[-600:].translate(None, b"0123456789")
            yield start, covered, line, lines, key
            continue
        cut = _cut(data[start:stop], data[start:stop].lower())
        yield start, stop, line, [cut], cut[:300].translate(None, b"0123456789")
