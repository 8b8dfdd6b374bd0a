"""``%load_ext mlbench``: every exception in a notebook cell explained first, its traceback folded away.

A deliberate error in a tutorial, or a real one in a postmortem, used to show 50 to 90 lines of
torch internals before anything a person can act on. With the extension loaded a failing cell
shows, in this order: the triage diagnosis (failure class, the deciding line, the fix, the
notebook to open), a short traceback (the cell's line and the line that raised, at most
:data:`SHORT_FRAMES` frames), and the full traceback folded in an HTML ``<details>`` element that
the reader opens on demand. The cell still fails (a ``raises-exception`` test still sees the
error). ``%unload_ext mlbench`` restores IPython's plain tracebacks, and ``%triage`` diagnoses the
last exception again (with its similar past cases).
"""

from __future__ import annotations

import html
import sys
import traceback
from typing import Any

from mlbench.paths import cut_machine_paths

__all__ = ["load_ipython_extension", "unload_ipython_extension", "diagnosis_text", "short_traceback_lines",
           "SHORT_FRAMES"]

SHORT_FRAMES = 3
"""Frames kept in the short traceback: the cell's own line first, then the innermost ones."""
_STATE: dict[int, Any] = {}


def diagnosis_text(exc: BaseException) -> str:
    """The diagnosis shown with an error: never raises (a failing triage must not hide the error).

    The casebook is not searched here (what a notebook shows must not depend on which cases happen
    to be saved on this machine); ``%triage`` shows the similar past cases.
    """
    try:
        from mlbench.failures import triage

        diagnosis = triage(exc, casebook=False)
    except Exception as problem:  # the user's exception matters more than ours
        return f"mlbench triage could not diagnose this error ({type(problem).__name__}: {problem})"
    return "mlbench triage: " + repr(diagnosis)


def short_traceback_lines(exc: BaseException, frames: int = SHORT_FRAMES) -> list[str]:
    """The traceback cut to the first frame (the cell) and the innermost ones, with a count of the rest.

    >>> try:
    ...     int("x")
    ... except ValueError as exc:
    ...     short_traceback_lines(exc)[-1]
    "ValueError: invalid literal for int() with base 10: 'x'"
    """
    stack = traceback.extract_tb(exc.__traceback__)
    while len(stack) > 1 and "/IPython/" in stack[0].filename.replace("\\", "/"):
        stack = stack[1:]  # IPython's own run_code: the cell's line comes next
    keep = list(stack) if len(stack) <= frames else [stack[0], *stack[len(stack) - frames + 1:]]
    lines = ["Traceback (most recent call last, shortened):"]
    for index, frame in enumerate(keep):
        if index == 1 and len(stack) > frames:
            lines.append(f"  ... {len(stack) - frames} frame(s) inside libraries, in the folded traceback ...")
        lines.append(cut_machine_paths(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'))
        if frame.line:
            lines.append(f"    {frame.line.strip()}")
    lines.extend(traceback.format_exception_only(type(exc), exc)[-1:])
    return [line.rstrip("\n") for line in lines]


def _explained_html(diagnosis: str, full: str) -> str:
    body = html.escape(full.rstrip())
    return (f"<div><pre style='white-space: pre-wrap'>{html.escape(diagnosis)}</pre>"
            f"<details><summary>full traceback ({body.count(chr(10)) + 1} lines)</summary>"
            f"<pre>{body}</pre></details></div>")


def _handler(shell: Any, etype: type, evalue: BaseException, tb: Any, tb_offset: int | None = None) -> Any:
    """Diagnosis and folded full traceback as one display, then the short traceback as the cell's error."""
    from IPython.display import display

    try:
        full = cut_machine_paths("".join(traceback.format_exception(etype, evalue, tb)))
        diagnosis = diagnosis_text(evalue)
        display({"text/plain": diagnosis, "text/html": _explained_html(diagnosis, full)}, raw=True)
        shell._showtraceback(etype, evalue, short_traceback_lines(evalue))
    except Exception:  # never lose the user's error: fall back to IPython's own traceback
        shell.showtraceback((etype, evalue, tb), tb_offset=tb_offset)
    return None


def _triage_magic(line: str = "") -> None:
    """``%triage``: diagnose the last exception (``sys.last_value``) again, or the text given."""
    from mlbench.failures import triage

    if line.strip():
        print(repr(triage(line)))
        return
    last = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
    print(repr(triage(last)) if last is not None else "no exception yet in this session")


def load_ipython_extension(ip: Any) -> None:
    """Called by ``%load_ext mlbench``: register the exception handler and ``%triage``."""
    ip.set_custom_exc((Exception,), _handler)
    ip.register_magic_function(_triage_magic, magic_kind="line", magic_name="triage")
    _STATE[id(ip)] = True


def unload_ipython_extension(ip: Any) -> None:
    """Called by ``%unload_ext mlbench``: back to IPython's plain tracebacks."""
    ip.set_custom_exc((), None)
    _STATE.pop(id(ip), None)

