"""What every inspector reports, in one form: findings (``Problem``) and report objects.

A report is a small frozen result whose text *is* the report: ``str(report)``, ``repr(report)``
and IPython's pretty printer all show the same rounded, stable text, never a dataclass dump with
machine paths. :class:`ReportText` gives a report class that behaviour from one method, ``text()``,
and the pieces its text and its optional HTML table (``_repr_html_``) are made of.
Byte counts are written one way everywhere (:func:`format_bytes`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Problem", "ReportText", "format_bytes"]


@dataclass(frozen=True)
class Problem:
    """One finding: a stable ``code`` (for programs and tests) and a human ``message`` (what is
    wrong, with the values, and the fix)."""

    code: str
    message: str


class ReportText:
    """Mixin for report objects: ``text()`` is the report; ``str``, ``repr`` and the notebook show it.

    Subclasses implement :meth:`text` (a dataclass subclass is declared with ``repr=False``, or
    the dataclass would write its own ``__repr__`` over this one). ``_repr_pretty_`` makes IPython
    print the text instead of the dataclass fields (which would include absolute paths and the
    working directory). A subclass whose findings read better as a table also defines
    ``_repr_html_``, built with :meth:`_html`.
    """

    def text(self) -> str:  # pragma: no cover - every subclass overrides it
        """The report: what ``str``, ``repr`` and the notebook show (rounded, stable, no machine paths)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(self.text() if not cycle else f"{type(self).__name__}(...)")

    @staticmethod
    def _shown(message: str) -> str:
        """``message`` without the machine paths a "missing file" finding carries.

        >>> ReportText._shown("a.pth does not exist (absolute path tried /srv/a.pth, working directory /srv); fix")
        'a.pth does not exist (machine paths: see to_dict()); fix'
        """
        return _MACHINE_PATHS.sub(" (machine paths: see to_dict())", message)

    @classmethod
    def _problem_lines(cls, problems: Iterable[Problem]) -> list[str]:
        """One ``  problem [code] message`` line per finding, or ``  no problems``."""
        return [f"  problem [{p.code}] {cls._shown(p.message)}" for p in problems] or ["  no problems"]

    @classmethod
    def _problem_table(cls, problems: Iterable[Problem]) -> tuple[tuple[str, str], list[tuple[str, str]]]:
        """The findings as a ``(header, rows)`` table for :meth:`_html`, machine paths left out."""
        return ("problem", "message"), [(p.code, cls._shown(p.message)) for p in problems] or [("-", "no problems")]

    @staticmethod
    def _html(title: str, *tables: tuple[Sequence[str], Sequence[Sequence[Any]]]) -> str:
        """A bold ``title`` and small tables, each ``(header, rows)``, every cell escaped; empty tables left out.

        >>> ReportText._html("R<1>", (("code", "message"), [("a", "x < y")]), (("fit",), []))
        '<div><b>R&lt;1&gt;</b><table><tr><th>code</th><th>message</th></tr><tr><td>a</td><td>x &lt; y</td></tr></table></div>'
        """
        def row(cells: Sequence[Any], tag: str) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

        parts = [f"<div><b>{html.escape(title)}</b>"]
        for header, rows in tables:
            if rows:
                parts.append("<table>" + row(header, "th") + "".join(row(r, "td") for r in rows) + "</table>")
        return "".join(parts) + "</div>"


_MACHINE_PATHS = re.compile(r" ?\((?:absolute path tried|working directory)[^)]*\)")


def format_bytes(nbytes: float) -> str:
    """A byte count in binary units with three significant digits.

    >>> format_bytes(1536), format_bytes(2 * 1024**3), format_bytes(512), format_bytes(1020 * 1024**2)
    ('1.5 KiB', '2 GiB', '512 B', '1020 MiB')
    """
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 999.5 else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"
