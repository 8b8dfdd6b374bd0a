"""The repr is the report: every report object shows its text, never a dataclass dump or a machine path.

For each report class: ``repr(obj) == str(obj) == obj.text()``, IPython's pretty printer prints the
same text, no ``absolute_path``, ``cwd``, ``/root``, ``/tmp`` or working directory in it, and where the
class has an HTML table, it is well-formed (every cell escaped) and holds a ``<table``.
"""

from __future__ import annotations

import importlib
import io
import json
import pkgutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from IPython.lib.pretty import pretty
from PIL import Image

import mlbench as mb
from mlbench.findings import Problem, ReportText
from probe_toys import ToyNet


def _disks(shape=(64, 64), centres=((20, 20), (44, 40)), radius=9) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k, (r, c) in enumerate(centres, 1):
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = k
    return labels


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary working directory: reports made from relative paths in it must not name it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- one maker per report class (keyed by class name) -----------------------------------------------

def _image_report(workdir):
    Path("disk.png").write_bytes(_png((_disks() > 0).astype(np.uint8) * 200))
    return mb.check_image("disk.png")


def _weights_report(workdir):
    torch.save(mb.build_model("cbam_resunet", "small", seed=0).state_dict(), "w.pth")
    return mb.check_weights("w.pth")


def _norm_report(workdir):
    return mb.check_normalization(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255)


def _polygon_report(workdir):
    labels = _disks()
    return mb.check_polygons(labels > 0, mb.mask_to_polygons(labels > 0, min_area=5), min_area=5)


def _timeline():
    model = ToyNet()
    with mb.record_memory(model) as timeline, timeline.stage("forward"):
        model(torch.ones(1, 3, 8, 8))
    return timeline


def _case(workdir):
    return mb.load_case(Path(mb.__file__).resolve().parents[1] / "data" / "cases" / "ma_resunet_1000px_shape", replay=False)


def _segmentation(workdir):
    mask = _disks() > 0
    return mb.Segmentation(mask, mask.astype(np.float32) * 0.9, mb.mask_to_polygons(mask, min_area=5),
                           {"model_used": "toy"}, run=None)


def _segment_body():
    return {"polygons": [{"id": "polygon_1", "type": "external", "points": [{"x": 1, "y": 1}]}], "model_used": "hrnet",
            "threshold_used": 0.5, "image_size": {"width": 8, "height": 8}, "processing_time": 0.1}


def _batch_result(workdir):
    from mlbench.client.results import batch_result

    body = {"results": [dict(_segment_body(), batch_index=0, filename="a.png")], "total_processed": 1}
    return batch_result(body, [("a.png", b"x")], {})


def _tile_fidelity(workdir):
    table = pd.DataFrame({"tile": [96, 64], "norm_stats": ["image", "image"], "iou": [0.999, 0.97],
                          "passes": [1, 1], "settled": [True, True], "time_ratio": [1.1, 1.3]})
    return mb.TileFidelity(table, 0.99, (128, 128))


def _case_entry(workdir):
    from mlbench.failures.case_index import CaseEntry

    return CaseEntry("oom_1024", str(workdir / "cases" / "oom_1024"), "out_of_memory", "CUDA out of memory",
                     "use tiling", "")


def _case_index(workdir):
    from mlbench.failures.case_index import CaseIndex

    return CaseIndex(Path(mb.__file__).resolve().parents[1] / "data" / "cases")


def _replay():
    from mlbench.cases.casefile import Replay

    return Replay(None, {"status": "done"}, {"status": "failed", "failed_stage": "forward"}, ("status: done -> failed",))


def _model_card(workdir):
    from mlbench.models.cards import ModelCard

    return ModelCard(name="toy", architecture="cbam_resunet", source="bundled")


def _burst_report(workdir):
    from mlbench.service.load import BurstReport

    return BurstReport((200, 200, 429), (0.1, 0.2, 0.01), ((0.0, 1), (0.1, 2)), ((0.05, 0.01),), (1.0,))


def _decoded(workdir):
    from mlbench.pipeline.stages import Decoded

    Path("disk.png").write_bytes(_png(np.full((8, 8), 7, np.uint8)))
    return Decoded(*mb.read_image("disk.png"))


def _postprocessed(workdir):
    from mlbench.pipeline.postprocess import Postprocessed

    return Postprocessed(np.full((4, 4), 0.7, np.float32), np.ones((4, 4), bool), True, 0.5)


def _golden(workdir):
    Path("disk.png").write_bytes(_png((_disks() > 0).astype(np.uint8) * 200))
    return mb.golden_record("cbam_resunet", ["disk.png"], "g.safetensors", card={"input_size": 64})


def _bisect_report(workdir):
    from mlbench.studies.golden_bisect import BisectReport, VersionResult

    results = (VersionResult("1.0", "same", "0/1 image(s) moved", 1.0), VersionResult("2.0", "moved", "1/1 image(s) moved", 1.0))
    return BisectReport(str(workdir / "g.safetensors"), "mlb-toy", ("1.0", "2.0"), results, "2.0", "1.0", (),
                        "first version that moves the outputs: 2.0")


def _run_diff(workdir):
    Path("disk.png").write_bytes(_png((_disks() > 0).astype(np.uint8) * 200))
    model = mb.load_model("cbam_resunet", card=mb.ModelCard(input_size=64))
    return mb.diff_runs(mb.Pipeline(model).start("disk.png"), mb.Pipeline(model, threshold=0.6).start("disk.png"))


MAKERS = {
    "ImageReport": _image_report,
    "WeightsReport": _weights_report,
    "NormReport": _norm_report,
    "PolygonReport": _polygon_report,
    "Report": lambda w: mb.Report("Debugging report: t<1>", (("Error analysis", "`x` went **wrong**"),)),
    "Diagnosis": lambda w: mb.triage("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                     casebook=False),
    "PixelScores": lambda w: mb.pixel_scores(_disks() > 0, np.roll(_disks() > 0, 2, axis=1)),
    "Matching": lambda w: mb.match_objects(_disks(), np.roll(_disks(), 2, axis=1)),
    "MemoryEstimate": lambda w: mb.estimate_memory(ToyNet(), 16),
    "MemoryTimeline": lambda w: _timeline(),
    "MemoryPeak": lambda w: _timeline().peak,
    "ShapeTrace": lambda w: mb.trace_shapes(ToyNet(), torch.ones(1, 3, 8, 8)),
    "Explanation": lambda w: mb.trace_shapes(ToyNet(), torch.ones(1, 3, 8, 8)).explain(),
    "TileFidelity": _tile_fidelity,
    "Case": _case,
    "Segmentation": _segmentation,
    "SegmentResult": lambda w: mb.SegmentResult([], "hrnet", 0.5, 8, 8, 0.1, ("threshold not used",)),
    "BatchResult": _batch_result,
    "Sample": lambda w: mb.load_sample("spheroids_8bit"),
    "Fit": lambda w: _weights_report(w).best_fit,
    "CaseEntry": _case_entry,
    "CaseIndex": _case_index,
    "Casebook": lambda w: mb.Casebook(Path(mb.__file__).resolve().parents[1] / "data" / "cases"),
    "Replay": lambda w: _replay(),
    "BurstReport": _burst_report,
    "Decoded": _decoded,
    "ModelCard": _model_card,
    "Postprocessed": _postprocessed,
    "Golden": _golden,
    "GoldenReport": lambda w: mb.golden_check(_golden(w).path),
    "BisectReport": _bisect_report,
    "ParityReport": lambda w: mb.parity("cbam_resunet", _disks().astype(np.uint8) * 30, variants=["repeat", "cuda"],
                                        input_size=64),
    "RunDiff": _run_diff,
    "DomainReport": lambda w: mb.check_domain(mb.load_sample("spheroids_8bit").image, mb.load_model("cbam_resunet")),
}

OTHERS = {"EnvReport", "PackageCheck"}
"""Report classes tested elsewhere: the environment report (tests/test_doctor.py)."""

FORBIDDEN = ("absolute_path", "cwd", "/root", "/tmp", "/home/")


def _report_classes() -> set[type]:
    """Every subclass of ReportText in the package (all its modules imported first)."""
    for module in pkgutil.walk_packages(mb.__path__, "mlbench."):
        importlib.import_module(module.name)
    found, todo = set(), [ReportText]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def test_every_report_class_shows_its_text_and_is_tested_here():
    classes = _report_classes()
    dumped = [c.__name__ for c in classes if c.__repr__ is not ReportText.__repr__ or c.__str__ is not ReportText.__str__]
    assert not dumped, f"{dumped} override ReportText's __repr__/__str__ (declare dataclasses with repr=False)"
    untested = sorted({c.__name__ for c in classes} - set(MAKERS) - OTHERS)
    assert not untested, f"add a maker for {untested} to MAKERS"


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_repr_is_the_text_without_machine_paths(name, workdir):
    report = MAKERS[name](workdir)
    assert type(report).__name__ == name
    text = report.text()
    assert text and repr(report) == str(report) == text
    assert pretty(report) == text
    for forbidden in (*FORBIDDEN, str(workdir), str(Path(mb.__file__).resolve().parents[1])):
        assert forbidden not in text, f"{name}'s repr names {forbidden!r}:\n{text}"
    if hasattr(report, "_repr_html_"):
        page = report._repr_html_()
        assert "<table" in page
        ET.fromstring(page)  # well-formed: every cell escaped
        assert str(workdir) not in page and "/tmp" not in page


@pytest.mark.parametrize("name", ["ImageReport", "WeightsReport", "PolygonReport", "NormReport"])
def test_the_main_reports_have_an_html_table(name, workdir):
    assert "<table><tr><th>" in MAKERS[name](workdir)._repr_html_()


def test_missing_weights_keep_their_paths_out_of_the_repr_but_in_to_dict(workdir):
    report = mb.check_weights("weights/hrnet_best_model.pth")
    text = repr(report)
    assert text.splitlines()[:2] == ["WeightsReport(weights/hrnet_best_model.pth)",
                                     "  not found: the absolute path tried and the working directory are "
                                     ".absolute_path and .cwd"]
    assert ("problem [missing] weights/hrnet_best_model.pth does not exist (its folder 'weights' does not exist either) "
            "(machine paths: see to_dict())") in text
    assert str(workdir) not in text and str(workdir) not in report._repr_html_()
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["cwd"] == str(workdir) and str(workdir) in as_dict["problems"][0]["message"]


def test_missing_image_keeps_its_paths_out_of_the_repr(workdir):
    report = mb.check_image("missing.png")
    assert str(workdir) not in repr(report) and "/tmp" not in repr(report)
    assert "problem [missing] missing.png: does not exist (machine paths: see to_dict()); check the path" in repr(report)
    assert str(workdir) in report.to_dict()["problems"][0]["message"]


def test_weights_html_lists_fits_and_problems(workdir):
    page = _weights_report(workdir)._repr_html_()
    assert "<th>fits</th>" in page and "cbam_resunet" in page and "<th>problem</th>" in page


def test_html_cells_are_escaped():
    class Odd(ReportText):
        def text(self) -> str:
            return "odd"

    page = Odd._html("<b>", (("a&b",), [("<script>",)]))
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&amp;b" in page
    assert Odd._problem_table([]) == (("problem", "message"), [("-", "no problems")])
    assert Odd._problem_lines([Problem("x", "y (working directory /srv/a)")]) == [
        "  problem [x] y (machine paths: see to_dict())"]


def test_pretty_printer_cycle_names_the_class():
    from IPython.lib.pretty import RepresentationPrinter

    out = io.StringIO()
    printer = RepresentationPrinter(out)
    mb.pixel_scores(np.ones((2, 2), bool), np.ones((2, 2), bool))._repr_pretty_(printer, cycle=True)
    printer.flush()
    assert out.getvalue() == "PixelScores(...)"
