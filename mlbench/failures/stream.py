"""Reading a log of any size for :func:`mlbench.triage`: whole when small, else only its error lines.

Above 2 MiB the input is read in 8 MiB chunks; lines holding one of a few keywords (found
with ``bytes.find`` on the lower-cased chunk, C speed) are kept with their line numbers,
repeats (digits ignored) only once, at most 20,000. A line longer than 2000 bytes keeps its
head and windows around its first and last keyword hits, joined by `` … `` (see :func:`_cut`).
Memory stays constant and a 100 MB log takes a few seconds.
"""

from __future__ import annotations

from typing import IO, Any, Iterable

__all__ = ["clean", "read_stream"]

_SMALL = 2 << 20
_LONG, _HEAD, _WINDOW, _SPAN = 2000, 600, 600, 1 << 16  # bytes: a longer line keeps its head and windows around keyword hits
_SEP = " \u2026 ".encode()
_CHUNK = 8 << 20
_KEYWORDS = tuple(k.encode() for k in (  # every real error line we know holds one of these (lower case)
    "error", "exception", "traceback", "fail", "warn", "killed", "timeout", "timed out", "cuda", "memory", "nan",
    "invalid", "cannot", "unable", "could not", "not found", "denied", "refused", "sigkill", '" 4', '" 5', "exited",
    "exceed", "overload", "oom", "mismatch", "expected", "unsupported", "not supported", "missing", "no such", "too large",
    "too many", "unavailable", "gateway", "unprocessable", "bad request"))


def clean(text: str) -> str:
    return text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")


def read_stream(handle: IO) -> tuple[str, list[int] | None, str]:
    """Whole text when small; otherwise only the lines that look like errors, with their numbers."""
    first = _as_bytes(handle.read(_SMALL + 1))
    if len(first) <= _SMALL:
        return clean(first.decode("utf-8", "replace")), None, "stream"
    kept: list[str] = []
    numbers: list[int] = []
    seen: set[bytes] = set()
    line_no, carry = 0, b""
    for chunk in _chunks(handle, first):
        chunk = carry + chunk
        cut = chunk.rfind(b"\n") + 1 or len(chunk)
        carry, body = chunk[cut:], chunk[:cut]
        line_no = _scan(body, line_no, kept, numbers, seen)
    _scan(carry, line_no, kept, numbers, seen)
    return "\n".join(kept), numbers, f"large input, {len(kept)} distinct error-like line(s) kept"


def _chunks(handle: IO, first: bytes) -> Iterable[bytes]:
    yield first
    while True:
        data = handle.read(_CHUNK)
        if not data:
            return
        yield _as_bytes(data)


def _as_bytes(data: Any) -> bytes:
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data).encode("utf-8", "replace")


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


def _scan(body: bytes, line_no: int, kept: list[str], numbers: list[int], seen: set[bytes]) -> int:
    """Append the error-like lines of ``body`` (deduplicated, capped); return the new line count.

    Keywords are found with ``bytes.find`` on the lower-cased chunk (C speed, about 1 s per
    100 MB); only the lines that hold one are decoded.
    """
    low = body.lower()
    starts: set[int] = set()
    for keyword in _KEYWORDS:
        pos = low.find(keyword)
        while pos >= 0:
            starts.add(low.rfind(b"\n", 0, pos) + 1)
            end = low.find(b"\n", pos)
            pos = -1 if end < 0 else low.find(keyword, end)
    counted = 0
    for start in sorted(starts):
        line_no += body.count(b"\n", counted, start)
        counted = start
        end = body.find(b"\n", start)
        stop = len(body) if end < 0 else end
        line = _cut(body[start:stop], low[start:stop])
        key = line[:300].translate(None, b"0123456789")
        if key not in seen and len(seen) < 20000:
            seen.add(key)
            kept.append(clean(line.decode("utf-8", "replace")))
            numbers.append(line_no + 1)
    return line_no + body.count(b"\n", counted)
