"""Case files: save, checked load, replay and comparison; signatures; hostile cases; the casebook.

Hostile cases are made at test time from a good one (``hostile_cases.py``): every variant is
refused in-process with its message, and the whole family again in a child process with a memory
limit and a timeout (``hostile_run``), where a crash or a blow-up would show.
"""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hostile_cases
import mlbench as mb
from hostile_run import run_family
from mlbench.cases import signing
from mlbench.cases.casebook import Casebook
from mlbench.cases.casefile import CaseError, load_case, save_case
from mlbench.errors import MlbenchWarning, OptionsError
from mlbench.failures._triage import make_diagnosis, triage
from mlbench.failures.case_index import similar_cases
from mlbench.paths import data_dir

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def case_key(tmp_path_factory, monkeypatch):
    """One signing key for the session, in its temporary folder (where hostile_cases keeps it too)."""
    path = tmp_path_factory.getbasetemp() / "case-signing.key"
    monkeypatch.setenv(signing.KEY_ENV, str(path))
    return path


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


def _edit(path: Path, change, *, unsign: bool = True) -> None:
    meta = json.loads((path / "case.json").read_text())
    change(meta)
    (path / "case.json").write_text(json.dumps(meta))
    if unsign:
        (path / "case.sig").unlink(missing_ok=True)


def test_failed_run_round_trip_and_replay(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "shape", note="72 px upload", doctor_report={"python": "3.x"})
    assert sorted(p.name for p in path.iterdir()) == ["case.json", "case.sig", "image.png", "previews"]
    meta = json.loads((path / "case.json").read_text())
    assert meta["failure_class"] == "shape_mismatch" and meta["outcome"]["failed_stage"] == "forward"
    assert meta["diagnosis"]["numbers"] == {"size_a": 8, "size_b": 9, "dimension": 3}
    assert set(meta["files"]) == {"image.png", "previews/decoded.png"}
    repo = str(Path(mb.__file__).resolve().parents[1])
    assert 'File ".../pipeline/stages.py"' in meta["traceback"] and repo not in meta["traceback"]
    case = load_case(path)
    assert case.replay.same and case.replay.differences == ()
    assert case.integrity.code == "signed" and "integrity" not in repr(case)
    assert case.image_bytes == failing_run.source
    assert "replay: SAME outcome as recorded (failed at forward)" in repr(case)
    fixed = case.rerun(preset="fixed", input_size=64)
    assert fixed.observed["status"] == "done" and not fixed.same
    assert "status: recorded 'failed', now 'done'" in fixed.differences


def test_good_run_zip_keeps_the_mask(tmp_path, good_run):
    path = save_case(good_run, tmp_path / "good.zip", doctor_report={})
    with zipfile.ZipFile(path) as archive:
        assert {i.filename for i in archive.infolist()} == {"case.json", "case.sig", "image.png", "outcome.npz",
                                                            "previews/decoded.png", "previews/overlay.png"}
    case = load_case(path)
    assert case.failure_class in ("none", "postprocessing") and case.integrity.code == "signed"
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
    with pytest.raises(CaseError, match="no case at .*nothing: it does not exist"):
        load_case(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError, match="no case.json inside"):
        load_case(tmp_path / "empty")
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(CaseError, match="neither a case folder nor a zip"):
        load_case(tmp_path / "plain.txt")
    _edit(path, lambda m: m.__setitem__("format", "other/9"), unsign=False)
    with pytest.raises(CaseError, match=r"case.json was changed after the case was saved \(its HMAC does not match"):
        load_case(path)
    (path / "case.sig").unlink()
    with pytest.raises(CaseError, match="has format 'other/9'"):
        load_case(path)


def test_other_weights_are_refused(tmp_path, failing_run):
    path = save_case(failing_run, tmp_path / "w", doctor_report={})
    _edit(path, lambda m: m["model"].__setitem__("state_sha256", "0" * 64))
    with pytest.raises(CaseError, match="are not the ones the case ran with"):
        load_case(path)
    case = load_case(path, replay=False)
    assert case.replay is None and case.integrity.code == "unsigned"
    assert "integrity: unsigned case (no case.sig): contents checked for self-consistency only" in repr(case)


def test_array_source_and_object_array(tmp_path, good_run):
    image, _ = mb.make_spheroids((64, 64), 2, np.random.default_rng(1))
    run = mb.Pipeline(good_run.pipeline.model, "fixed", input_size=64).start(image).run()
    path = save_case(run, tmp_path / "arr", doctor_report={})
    assert (path / "image.npy").exists()
    assert load_case(path).replay.same
    bad = mb.Pipeline(good_run.pipeline.model, "fixed").start(np.array([None, 1], dtype=object))
    with pytest.raises(OptionsError, match="object array cannot be saved"):
        save_case(bad, tmp_path / "obj", doctor_report={})
    hostile_cases.replace_file(path, "image.npy", hostile_cases.npy_header_only((40_000, 40_000, 3)))
    with pytest.raises(CaseError, match=r"image.npy: the header announces \(40000, 40000, 3\) uint8 .* but 16 bytes follow"):
        load_case(path)


# ----- who vouches for case.json -----------------------------------------------------------------

def test_signatures_say_who_vouches_for_a_case(tmp_path, good_run, monkeypatch):
    path = save_case(good_run, tmp_path / "signed", doctor_report={})
    assert load_case(path, replay=False, require_signature=True).integrity.code == "signed"
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "other-machine.key"))
    foreign = load_case(path, replay=False)
    assert foreign.integrity.code == "foreign"
    assert "integrity: foreign case: signed with another key" in repr(foreign)
    assert "cannot be verified here; contents checked for self-consistency only" in repr(foreign)
    assert "this machine has no key yet" in foreign.integrity.message
    with pytest.raises(CaseError, match="is not signed with this machine's key .*require_signature=True"):
        load_case(path, replay=False, require_signature=True)
    assert "- integrity: foreign case" in mb.report(foreign, replay=False).sections[0][1]
    bundled = load_case(data_dir() / "cases" / "ma_resunet_1000px_shape", replay=False)
    assert bundled.integrity.code == "bundled" and "integrity" not in repr(bundled)


def test_a_consistent_forgery_loads_unsigned_and_is_said_to(tmp_path, good_run):
    """What no checksum can catch: a case edited with its case.json rewritten to match."""
    path = hostile_cases.replace_file(save_case(good_run, tmp_path / "forged", doctor_report={}),
                                      "previews/decoded.png", hostile_cases.zeros_png(8))
    case = load_case(path, replay=False)
    assert case.integrity.code == "unsigned" and "nothing vouches" in case.integrity.message
    with pytest.raises(CaseError, match=r"not signed with this machine's key \(unsigned case"):
        load_case(path, require_signature=True)


def test_the_key_file_is_checked_and_its_absence_warns(tmp_path, good_run, monkeypatch):
    path = save_case(good_run, tmp_path / "c", doctor_report={})
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    monkeypatch.setenv(signing.KEY_ENV, str(bad))
    with pytest.raises(CaseError, match=r"signing key .*bad.key is not 64 hex digits \(9 characters found\); delete it"):
        load_case(path, replay=False)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "a-file" / "case.key"))
    with pytest.warns(MlbenchWarning, match=r"case saved unsigned: the signing key .* cannot be created"):
        unsigned = save_case(good_run, tmp_path / "unsigned", doctor_report={})
    assert not (unsigned / "case.sig").exists()
    assert load_case(unsigned, replay=False).integrity.code == "unsigned"


# ----- budgets and options -----------------------------------------------------------------------

def test_save_refuses_what_load_would_refuse(tmp_path, good_run, monkeypatch):
    monkeypatch.setenv("MLBENCH_MAX_CASE_MEMBER_BYTES", "1000")
    with pytest.raises(CaseError, match=r"cannot save .*big, load_case would refuse it: image.png: .* bytes exceeds the "
                                        r"budget max_case_member_bytes = 1,000 bytes"):
        save_case(good_run, tmp_path / "big", doctor_report={})
    assert not (tmp_path / "big").exists()


def test_replayed_options_are_bounded_like_a_users(tmp_path, good_run, monkeypatch):
    path = save_case(good_run, tmp_path / "c", doctor_report={})
    case = load_case(path, replay=False)
    with pytest.raises(CaseError, match=r"model input its options ask for \(8192x8192 x 3 channel\(s\) x 4 bytes\).* "
                                        r"max_decoded_bytes"):
        case.rerun(input_size=8192)
    monkeypatch.setenv("MLBENCH_MAX_REPLAY_BYTES", str(1 << 20))
    with pytest.raises(CaseError, match=r"forward pass of cbam_resunet on 64x64 would need about .* MiB .*max_replay_bytes"):
        case.rerun()
    _edit(path, lambda m: m["model"].__setitem__("input_size", 100_000))
    with pytest.raises(CaseError, match=r"model.input_size=100000 asks for a model input"):
        load_case(path, replay=False)


@pytest.mark.parametrize("variant", sorted(hostile_cases.FAMILIES["cases"][0]()))
def test_hostile_cases_raise_case_error(variant, tmp_path, monkeypatch):
    """Each hostile variant (built from a good case) ends in a CaseError with its message."""
    for name, value in hostile_cases.ENV.items():
        monkeypatch.setenv(name, value)
    builder, pattern = hostile_cases.FAMILIES["cases"][0]()[variant]
    path = builder(tmp_path)
    with pytest.raises(CaseError, match=pattern):
        load_case(path)


def test_zip_bombs_are_read_in_bounded_memory(tmp_path, monkeypatch):
    """A 64 MiB member (65 kB compressed) and one lying about its size: refused with under 2 MiB allocated."""
    for name, value in hostile_cases.ENV.items():
        monkeypatch.setenv(name, value)
    bomb = hostile_cases.case_zip(tmp_path / "a", [("previews/bomb.png", bytes(64 << 20))])
    liar = hostile_cases.lying_zip(tmp_path / "b")
    for path, pattern in ((bomb, "max_case_member_bytes"), (liar, "Bad CRC-32 for file 'filler.bin'")):
        with pytest.raises(CaseError, match=pattern):
            load_case(path)  # once unmeasured: the first call imports codecs
        tracemalloc.start()
        try:
            load_case(path)
        except CaseError:
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{path.parent.name}: {peak:,} bytes allocated"


def test_hostile_case_family_in_a_child_process(tmp_path):
    """The same variants, each in a child with a 3 GiB address-space limit: no crash, hang or blow-up."""
    results = run_family("cases", tmp_path)
    bad = [f"{r['variant']}: {r['outcome']} ({r['detail']})" for r in results if r["outcome"] != "clean"]
    assert not bad, "\n".join(bad)
    assert [r["variant"] for r in results] == list(hostile_cases.FAMILIES["cases"][0]())


# ----- the casebook ------------------------------------------------------------------------------

def test_casebook_search_and_similar_cases(tmp_path, failing_run, good_run):
    book = Casebook(tmp_path / "book")
    book.add(failing_run, "shape-72", note="MA-ResUNet on 72 px", fix="stretch to a multiple of 16")
    book.add(good_run, "good-64", failure_class="normalization")
    assert [e.name for e in book.entries] == ["good-64", "shape-72"]
    assert load_case(tmp_path / "book" / "shape-72", replay=False).integrity.code == "signed"  # the fix is signed too
    diagnosis = triage("RuntimeError: The size of tensor a (62) must match the size of tensor b (63) at non-singleton dimension 2",
                       casebook=book)
    assert diagnosis.similar_cases[0]["name"] == "shape-72"
    assert diagnosis.similar_cases[0]["fix"] == "stretch to a multiple of 16"
    assert similar_cases(make_diagnosis("cuda_oom", "x"), book) == []
    channels = triage("RuntimeError: Given groups=1, weight of size [64, 3, 3, 3], expected input[1, 1, 512, 512] to "
                      "have 3 channels, but got 1 channels instead", casebook=book)
    assert channels.failure_class == "shape_mismatch" and not channels.similar_cases  # a class in common is not enough
    assert "2 case(s)" in repr(book)
    with pytest.raises(OptionsError, match="must be letters, digits"):
        book.add(good_run, "bad name/x")


def test_make_diagnosis_rejects_unknown_class():
    with pytest.raises(OptionsError, match="failure_class='oops' is unknown"):
        make_diagnosis("oops")
