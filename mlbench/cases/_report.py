"""``mb.report``: the debugging report of a case or an exception, in five sections.

1. Error analysis (the traceback interpreted), 2. Resource status (CPU/GPU/memory when it
happened), 3. Model diagnostics (weights, architecture, shapes), 4. Solution (the fix as
code or configuration), 5. Performance impact (time and quality effect of the fix,
measured by replaying the case with the fix applied). Markdown for notebooks, HTML for
sharing (:meth:`Report.html`, ``mlbench report CASE --html OUT``).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlbench.cases.sections import case_sections, exception_sections
from mlbench.findings import ReportText

__all__ = ["Report", "report", "add_report_command", "markdown_to_html"]

SECTION_TITLES = ("Error analysis", "Resource status", "Model diagnostics", "Solution", "Performance impact")


@dataclass(frozen=True, repr=False)
class Report(ReportText):
    """A rendered report: ``title`` and the five ``(title, markdown body)`` sections."""

    title: str
    sections: tuple

    @property
    def markdown(self) -> str:
        parts = [f"# {self.title}"] + [f"## {i}. {title}\n\n{body.strip()}" for i, (title, body) in enumerate(self.sections, 1)]
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        """A standalone HTML page (inline style, no scripts, no external files)."""
        style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
                 "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}td,th{border:1px solid #ccc;padding:.2em .5em}"
                 "table{border-collapse:collapse}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n{markdown_to_html(self.markdown)}</body></html>\n")

    def save_html(self, path: str | Path) -> Path:
        target = Path(path)
        target.write_text(self.html(), encoding="utf-8")
        return target

    def _repr_markdown_(self) -> str:
        return self.markdown

    def text(self) -> str:
        return self.markdown


def report(source: Any, *, replay: bool = True, fix_preset: str = "fixed") -> Report:
    """The five-section debugging report of a case (path or :class:`~mlbench.cases.casefile.Case`) or an exception.

    Parameters
    ----------
    source : Case, str, Path or BaseException
        A case (loaded, or the path of a case folder/zip) or an exception object.
    replay : bool
        For a case: replay it as recorded and with the fix, to measure the impact.
    fix_preset : str
        The preset that holds the fix (default "fixed").
    """
    from mlbench.cases.casefile import Case, load_case
    from mlbench.errors import OptionsError

    if isinstance(source, (str, Path)):
        source = load_case(source, replay=False)
    if isinstance(source, Case):
        return Report(f"Debugging report: case {source.name}", tuple(case_sections(source, replay, fix_preset)))
    if isinstance(source, BaseException):
        return Report(f"Debugging report: {type(source).__name__}", tuple(exception_sections(source)))
    raise OptionsError(f"report takes a case, a case path or an exception, got {type(source).__name__}")


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_to_html(markdown: str) -> str:
    """The Markdown subset the report uses (headings, bullets, tables, code fences, paragraphs) as HTML."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i]) <= set("|-: "):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out) + "\n"


def add_report_command(sub) -> None:
    """Register ``mlbench report CASE [--html OUT] [--no-replay]``."""
    p = sub.add_parser("report", help="the five-section debugging report of a saved case")
    p.add_argument("case", help="case folder or .zip (see mb.save_case)")
    p.add_argument("--html", metavar="OUT", default=None, help="also write the report as a standalone HTML page")
    p.add_argument("--no-replay", action="store_true", help="do not replay the case to measure the fix")
    p.set_defaults(run=_report_cli)


def _report_cli(args) -> int:
    rendered = report(args.case, replay=not args.no_replay)
    print(rendered.markdown)
    if args.html:
        print(f"HTML written to {rendered.save_html(args.html)}")
    return 0
