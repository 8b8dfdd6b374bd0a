"""The five-section debugging report: from a case (with the fix measured) and from an exception."""

from __future__ import annotations

import argparse
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.cases.casefile import Case, save_case
from mlbench.errors import OptionsError
from mlbench.cases._report import SECTION_TITLES, add_report_command, markdown_to_html, report

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    image, _ = mb.make_spheroids((72, 72), 2, np.random.default_rng(0))
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="PNG")
    model = mb.build_model("ma_resunet", "small").eval()
    run = mb.Pipeline(model, "as_served", resize="none").start(buffer.getvalue()).run()
    return save_case(run, tmp_path_factory.mktemp("cases") / "shape", note="72 px upload")


def test_case_report_has_five_sections_and_measures_the_fix(case_path):
    rendered = report(case_path)
    assert tuple(title for title, _ in rendered.sections) == SECTION_TITLES
    text = rendered.markdown
    for i, title in enumerate(SECTION_TITLES, 1):
        assert f"## {i}. {title}" in text
    assert "**shape_mismatch**" in text and "size 8 vs 9 at dimension 3" in text
    assert "| outcome | failed at forward | failed at forward | done |" in text
    assert "`resize`: 'none' -> 'stretch'" in text
    assert "/work/" not in text and 'File ".../' in text  # machine paths are cut


def test_recorded_and_replayed_times_are_told_apart_and_add_up(case_path, monkeypatch):
    """Section 2 shows the recorded stage times; section 5's "recorded" column is their sum, and the two replays
    (recorded options, the fix) are timed alike, the faster of two runs each, not a cold first run against a warm one."""
    calls = []
    original = Case.rerun
    monkeypatch.setattr(Case, "rerun", lambda self, preset=None, **kw: calls.append(preset) or original(self, preset, **kw))
    sections = dict(report(case_path).sections)
    stage_ms = [int(ms) for ms in re.findall(r"^\| \w+ \| \w+ \| (\d+) ms \|", sections["Resource status"], re.M)]
    assert stage_ms and f"Stages as recorded when the case was saved (times of that run, total {sum(stage_ms)} ms)" \
        in sections["Resource status"]
    impact = sections["Performance impact"]
    assert "| | recorded | replayed here | with the fix, here |" in impact
    assert re.search(rf"^\| total time \| {sum(stage_ms)} ms \| \d+ ms \| \d+ ms \|$", impact, re.M)
    assert sorted(calls, key=str) == [None, None, "fixed", "fixed"]


def test_html_is_standalone_and_escaped(case_path, tmp_path):
    rendered = report(case_path, replay=False)
    page = rendered.html()
    assert page.startswith("<!DOCTYPE html>") and "<h2>1. Error analysis</h2>" in page and "<table>" in page
    assert "<script" not in page
    assert "Not measured (replay disabled)." in rendered.markdown
    assert markdown_to_html("a <b> `x<y>`") == "<p>a &lt;b&gt; <code>x&lt;y&gt;</code></p>\n"


def test_exception_report():
    try:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    except RuntimeError as exc:
        rendered = report(exc)
    text = rendered.markdown
    assert "**shape_mismatch**" in text and "No case attached" in text and "cannot be replayed" in text
    assert rendered._repr_markdown_() == text


def test_bad_argument_raises():
    with pytest.raises(OptionsError, match="report takes a case, a case path or an exception"):
        report(42)


def test_cli_writes_html(case_path, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.html"
    args = parser.parse_args(["report", str(case_path), "--html", str(out), "--no-replay"])
    assert args.run(args) == 0
    assert "## 5. Performance impact" in capsys.readouterr().out
    assert "<h1>Debugging report: case shape</h1>" in out.read_text()
