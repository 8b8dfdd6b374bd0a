"""Log formats :func:`mlbench.triage` unwraps before reading: ANSI colours, JSON log records, flattened tracebacks.

A pasted error rarely arrives as a clean Python traceback. Jupyter and rich colour it with
ANSI escape codes (or with their remains, ``[0;31m``, when the escape byte was lost on the
way); structured loggers and ``docker logs`` put the whole traceback in one JSON record,
newlines escaped (``{"levelname": "ERROR", "exc_info": "Traceback ...\\n  File ..."}``);
issue trackers and chat tools flatten a traceback onto one line
(``File "a.py", line 3, in f x = g() ^^^ ValueError: ...``). :func:`normalize` turns each
back into plain lines and keeps, for every new line, the number of the input line it came
from, so diagnoses still point at the line the user pasted.
"""

from __future__ import annotations

import json
import re

from mlbench.failures.patterns import names_exception

__all__ = ["normalize", "strip_ansi"]

# ANSI escapes (CSI and OSC), and the visible remains of a colour code whose ESC byte was lost.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]{0,200}(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_ANSI_REMAINS = re.compile(r"\[(?:\d{1,3};){0,4}\d{1,3}m")
# Keys under which structured loggers put the message, the exception and the traceback.
_MESSAGE_KEYS = ("message", "msg", "event", "log", "error", "err", "exception", "exc_info", "exc_text",
                 "stack_trace", "stacktrace", "stack", "traceback", "detail", "reason", "textPayload")
_ESCAPED_NEWLINE = re.compile(r"(?:\\r)?\\n")
# A traceback flattened onto one line: cut before each frame, each caret run and the exception.
_EMBEDDED_FRAME = re.compile(r'(?<=\S)\s+(?=File "[^"\n]{1,400}", line \d+)|(?<=\S)\s+(?=Traceback \(most recent call last\))')
_CARET_RUN = re.compile(r"(?<!\s)\s+[\^~]{3,}(?=\s|$)")  # from a blank run's start only: linear
# Where an exception line begins inside a flattened line: blanks after a word, then a dotted name whose
# last part names an exception type (checked by names_exception, not by backtracking), then ": ".
_EMBEDDED_NAME = re.compile(r"(?<=[\w)\]'\"])\s+((?:[A-Za-z_]\w*\.){0,4}[A-Z]\w*): ")
_EMBEDDED_WORDS = ("Error", "Exception", "Warning", "Exit", "Interrupt")
_FRAME_IN_LINE = re.compile(r'File "[^"\n]{1,400}", line \d+')
# ``docker logs -t`` / ``kubectl logs --timestamps``: an RFC 3339 stamp before each line of a traceback.
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)? ")
_STAMPED_REST = re.compile(r'\s|\[?Traceback|File "')
_EXCEPTION_START = re.compile(r"(?:[A-Za-z_]\w*\.){0,4}([A-Z]\w*):")


def strip_ansi(line: str) -> str:
    """``line`` without ANSI escape codes or their remains."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    return _ANSI_REMAINS.sub("", line) if "m" in line and "[" in line else line


def normalize(text: str) -> tuple[str, list[int]]:
    """Plain text and, for each of its lines, the 1-based number of the input line it came from."""
    out: list[str] = []
    origin: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        for piece in _unwrap(_unstamp(strip_ansi(line))):
            out.append(piece)
            origin.append(number)
    return "\n".join(out), origin


def _unstamp(line: str) -> str:
    """``line`` without a ``docker logs -t`` stamp when what follows is part of a traceback."""
    stamp = _STAMP.match(line)
    if not stamp:
        return line
    rest = line[stamp.end():]
    name = _EXCEPTION_START.match(rest)
    keep = _STAMPED_REST.match(rest) or (name and names_exception(name.group(1), ("Error", "Exception"), capital=True))
    return rest if keep else line


def _unwrap(line: str, depth: int = 0) -> list[str]:
    """One input line as the lines it stands for (a JSON record's fields, a flattened traceback's frames)."""
    stripped = line.strip()
    if depth < 2 and len(stripped) > 20 and stripped[0] == "{" and stripped[-1] == "}":
        fields = _json_fields(stripped)
        if fields:
            return [piece for field in fields for piece in _unwrap(field, depth + 1)]
    if depth < 2 and "\\n" in line and ("Traceback" in line or 'File \\"' in line or "Error" in line):
        line = _ESCAPED_NEWLINE.sub("\n", line).replace('\\"', '"').replace("\\t", "    ")
        return [piece for part in line.split("\n") for piece in _unwrap(part, depth + 1)]
    frames = list(_FRAME_IN_LINE.finditer(line))
    if len(frames) > 1 or (frames and len(re.sub(r"^, in [\w<>.]+", "", line[frames[0].end():]).strip()) > 30):
        return _split_flattened(line)
    return [line]


def _json_fields(record: str) -> list[str]:
    """The message-like fields of a JSON log record (newlines restored), or [] when it is not one."""
    try:
        data = json.loads(record)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    found = [data[key] for key in _MESSAGE_KEYS if isinstance(data.get(key), str) and data[key].strip()]
    level = next((str(data[k]) for k in ("levelname", "level", "severity") if k in data), "")
    found = [text.rstrip("\n") for text in found]
    if level and found:
        found[0] = f"{level.upper()}: {found[0]}" if not found[0].lstrip().startswith("Traceback") else found[0]
    return [piece for text in found for piece in text.split("\n")]


def _split_flattened(line: str) -> list[str]:
    """A traceback pasted onto one line, back on several: frames, source lines and the exception apart."""
    line = _CARET_RUN.sub("", line)
    parts = _EMBEDDED_FRAME.split(line)
    out: list[str] = []
    for part in parts:
        frame = re.match(r'(File "[^"\n]{1,400}", line \d+(?:, in [\w<>.]+)?)\s*(.*)$', part)
        if frame:
            out.append("  " + frame.group(1))
            part = frame.group(2)
            if not part:
                continue
        pieces = _split_exceptions(part)
        out.append(("    " if frame else "") + pieces[0])
        out.extend(pieces[1:])
    return out


def _split_exceptions(part: str) -> list[str]:
    """``part`` cut before each exception line it holds (``... x = f() ValueError: bad`` -> two pieces)."""
    pieces, start = [], 0
    for match in _EMBEDDED_NAME.finditer(part):
        if names_exception(match.group(1), _EMBEDDED_WORDS, capital=True):
            pieces.append(part[start:match.start()])
            start = match.start(1)
    return pieces + [part[start:]]
