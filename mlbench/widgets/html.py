"""HTML for the Stepper: its stage strip, the text of a stage view, its status line and the model card (pure string functions)."""

from __future__ import annotations

import html

from mlbench.models.cards import ModelCard
from mlbench.widgets.views import StageView

__all__ = ["STATUS_COLOURS", "STATUS_STYLES", "card_html", "status_html", "strip_html", "view_html"]

STATUS_COLOURS = {"pending": "#d9d9d9", "done": "#009e73", "failed": "#d55e00"}


def _cell(name: str, status: str, seconds: float | None, current: bool) -> str:
    took = "" if seconds is None else f" &middot; {seconds * 1000:.0f} ms"
    border = "3px solid #0072b2" if current else "3px solid transparent"
    text_colour = "#222" if status == "pending" else "#fff"
    classes = f"mlbench-stage mlbench-stage-{status}" + (" mlbench-current" if current else "")
    return (f'<div class="{classes}" data-stage="{name}" style="background:{STATUS_COLOURS[status]};'
            f"color:{text_colour};border:{border};border-radius:4px;padding:3px 8px;margin-right:4px;"
            f'font-family:monospace;font-size:12px"><b>{name}</b><br>{status}{took}</div>')


def strip_html(records: dict, current: str | None) -> str:
    """One coloured box per stage (``records``: name -> StageRecord) with its state and wall time."""
    cells = "".join(_cell(name, r.status, r.seconds, name == current) for name, r in records.items())
    return f'<div class="mlbench-strip" style="display:flex;flex-wrap:wrap">{cells}</div>'


def view_html(view: StageView) -> str:
    """The view's title, report lines and (folded) long text, escaped."""
    colour = STATUS_COLOURS.get(view.status, "#222") if view.status != "pending" else "#666"
    body = html.escape("\n".join(view.lines))
    details = ""
    if view.details:
        label = "traceback" if view.status == "failed" else "JSON"
        details = (f'<details class="mlbench-details"><summary>{label}</summary>'
                   f'<pre style="max-height:300px;overflow:auto;font-size:11px">{html.escape(view.details)}</pre></details>')
    return (f'<div class="mlbench-view mlbench-view-{view.stage}" data-stage="{view.stage}" data-status="{view.status}">'
            f'<div style="font-weight:bold;color:{colour}">{html.escape(view.stage)}: {view.status}</div>'
            f'<pre style="margin:2px 0;font-size:12px;white-space:pre-wrap">{body}</pre>{details}</div>')


STATUS_STYLES = {"ready": ("#444", "&#10003;"), "busy": ("#0072b2", "&#8987;"), "error": ("#d55e00", "&#9888;")}
"""Status kind -> (colour, symbol) of the Stepper's status line."""


def status_html(kind: str, text: str) -> str:
    """The Stepper's status line: ``kind`` "ready", "busy" or "error" and an (escaped) message."""
    colour, symbol = STATUS_STYLES[kind]
    return (f'<div class="mlbench-status mlbench-status-{kind}" data-status="{kind}" style="color:{colour};'
            f'font-family:monospace;font-size:12px;white-space:pre-wrap">{symbol} {html.escape(text)}</div>')


def card_html(model_card: ModelCard) -> str:
    """The model's card folded under a one-line summary (name, source, recipe, head): its ``_repr_html_`` table."""
    c, normalization = model_card, model_card.to_dict()["normalization"]
    line = html.escape(f"model card: {c.name or c.architecture} · {c.source or 'no file'} · input {c.input_size} px, "
                       f"{c.channels} channel(s), {normalization}, {c.resize}, {c.output}")
    return (f'<details class="mlbench-card" data-model="{html.escape(c.name)}"><summary style="font-size:12px">'
            f'{line}</summary><div style="font-size:11px">{c._repr_html_()}</div></details>')
