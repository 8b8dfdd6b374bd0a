"""``%load_ext mlbench``: a triage diagnosis under every exception raised in a notebook cell.

IPython still shows the original traceback first; the extension only appends the
diagnosis (class, deciding line, fix, notebook). ``%unload_ext mlbench`` removes it, and
``%triage`` diagnoses the last exception again (with its similar past cases).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["load_ipython_extension", "unload_ipython_extension", "diagnosis_text"]

_STATE: dict[int, Any] = {}


def diagnosis_text(exc: BaseException) -> str:
    """The block printed under a traceback: never raises (a failing triage must not hide the error)."""
    try:
        from mlbench.failures import triage

        diagnosis = triage(exc)
    except Exception as problem:  # the user's exception matters more than ours
        return f"mlbench triage could not diagnose this error ({type(problem).__name__}: {problem})"
    return "mlbench triage: " + repr(diagnosis)


def _handler(shell: Any, etype: type, evalue: BaseException, tb: Any, tb_offset: int | None = None) -> Any:
    shell.showtraceback((etype, evalue, tb), tb_offset=tb_offset)  # the original traceback, unchanged
    print("\n" + diagnosis_text(evalue), file=sys.stderr)
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
