"""Case files: save, checksum-verified load, replay and comparison; the casebook."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.cases.casebook import Casebook
from mlbench.failures.case_index import similar_cases
from mlbench.cases.casefile import CaseError, load_case, save_case
from mlbench.errors import DataError, OptionsError
from mlbench.failures._triage import make_diagnosis, triage

torch.set_num_threads(1)


def _png(side: int) -> bytes:
    image, _ = mb.make_spheroids((side, side), 2, np.random.default_rng(0))
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def failing_run():
    model = mb.build_model("ma_resunet", "small").eval()
    return mb.Pipeline(model, "as_served", resize="none").start(_png(72)).run()  # 72 is not a multiple of 16


@pytest.fixture(scope="module")
def good_run():
    model = mb.build_model("cbam_resunet", "small").eval()
    return mb.Pipeline(model, "fixed", input_size=64).start(_png(64)).run()


def test_failed_run_round_trip_and_replay(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "shape", note="72 px upload", doctor_report={"python": "3.x"})
    assert sorted(p.name for p in path.iterdir()) == ["case.json", "image.png", "previews"]
    meta = json.loads((path / "case.json").read_text())
    assert meta["failure_class"] == "shape_mismatch" and meta["outcome"]["failed_stage"] == "forward"
    assert meta["diagnosis"]["numbers"] == {"size_a": 8, "size_b": 9, "dimension": 3}
    assert set(meta["files"]) == {"image.png", "previews/decoded.png"}
    repo = str(Path(mb.__file__).resolve().parents[1])
    assert 'File ".../pipeline/stages.py"' in meta["traceback"] and repo not in meta["traceback"]
    case = load_case(path)
    assert case.replay.same and case.replay.differences == ()
    assert case.image_bytes == failing_run.source
    assert "replay: SAME outcome as recorded (failed at forward)" in repr(case)
    fixed = case.rerun(preset="fixed", input_size=64)
    assert fixed.observed["status"] == "done" and not fixed.same
    assert "status: recorded 'failed', now 'done'" in fixed.differences


def test_good_run_zip_keeps_the_mask(tmp_path, good_run):
    path = save_case(good_run, tmp_path / "good.zip", doctor_report={})
    case = load_case(path)
    assert case.failure_class in ("none", "postprocessing")
    assert case.recorded_mask.shape == (64, 64)
    assert np.array_equal(case.recorded_mask, good_run.output("postprocess").mask)
    assert case.replay.same
    other = case.rerun(threshold=0.3)
    assert other.observed["mask_pixels"] >= case.meta["outcome"]["mask_pixels"]


def test_changed_file_is_refused(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "c", doctor_report={})
    data = bytearray((path / "image.png").read_bytes())
    data[100] ^= 0xFF
    (path / "image.png").write_bytes(bytes(data))
    with pytest.raises(CaseError, match=r"image.png has sha256 .* but case.json records"):
        load_case(path)
    (path / "image.png").unlink()
    with pytest.raises(CaseError, match="listed in case.json but missing"):
        load_case(path)


def test_bad_targets_raise(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "once", doctor_report={})
    with pytest.raises(CaseError, match="already exists"):
        save_case(failing_run, path)
    with pytest.raises(DataError, match="no case at"):
        load_case(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError, match="no case.json inside"):
        load_case(tmp_path / "empty")
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(CaseError, match="neither a case folder nor a zip"):
        load_case(tmp_path / "plain.txt")
    meta = json.loads((path / "case.json").read_text())
    meta["format"] = "other/9"
    (path / "case.json").write_text(json.dumps(meta))
    with pytest.raises(CaseError, match="has format 'other/9'"):
        load_case(path)


def test_other_weights_are_refused(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "w", doctor_report={})
    meta = json.loads((path / "case.json").read_text())
    meta["model"]["state_sha256"] = "0" * 64
    (path / "case.json").write_text(json.dumps(meta))
    with pytest.raises(CaseError, match="are not the ones the case ran with"):
        load_case(path)
    case = load_case(path, replay=False)
    assert case.replay is None


def test_array_source_and_object_array(tmp_path, good_run):
    image, _ = mb.make_spheroids((64, 64), 2, np.random.default_rng(1))
    run = mb.Pipeline(good_run.pipeline.model, "fixed", input_size=64).start(image).run()
    path = save_case(run, tmp_path / "arr", doctor_report={})
    assert (path / "image.npy").exists()
    assert load_case(path).replay.same
    bad = mb.Pipeline(good_run.pipeline.model, "fixed").start(np.array([None, 1], dtype=object))
    with pytest.raises(OptionsError, match="object array cannot be saved"):
        save_case(bad, tmp_path / "obj", doctor_report={})


def test_casebook_search_and_similar_cases(tmp_path, failing_run, good_run):
    book = Casebook(tmp_path / "book")
    book.add(failing_run, "shape-72", note="MA-ResUNet on 72 px", fix="stretch to a multiple of 16")
    book.add(good_run, "good-64", failure_class="normalization")
    assert [e.name for e in book.entries] == ["good-64", "shape-72"]
    diagnosis = triage("RuntimeError: The size of tensor a (62) must match the size of tensor b (63) at non-singleton dimension 2",
                       casebook=book)
    assert diagnosis.similar_cases[0]["name"] == "shape-72"
    assert diagnosis.similar_cases[0]["fix"] == "stretch to a multiple of 16"
    assert similar_cases(make_diagnosis("cuda_oom", "x"), book) == []
    assert "2 case(s)" in repr(book)
    with pytest.raises(OptionsError, match="must be letters, digits"):
        book.add(good_run, "bad name/x")


def test_make_diagnosis_rejects_unknown_class():
    with pytest.raises(OptionsError, match="failure_class='oops' is unknown"):
        make_diagnosis("oops")
