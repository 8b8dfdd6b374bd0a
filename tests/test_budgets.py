"""The budgets and the checks behind them, one refusal at a time (each ``raise`` with its message).

These inputs are small and safe to run in-process; the hostile files themselves run in child
processes (``tests/test_hostile.py``).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import tarfile
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch

import mlbench as mb
from hostile_checkpoints import _many_tensors_pickle, _raw_zip, _storage_numel, _zip
from hostile_images import RGB, _pil, _png_size, _tiff, _tiff_tag
from mlbench.budgets import Budgets, Deadline, budgets, describe_file, open_regular, read_regular
from mlbench.checks.weights import check_weights, read_checkpoint
from mlbench.image.formats import ImageHeader, check_header, load_bytes
from mlbench.models.checkpoint_formats import check_safetensors, scan_legacy, scan_zip
from mlbench.models.pickle_scan import scan_pickle


def _scan(data: bytes, **limits) -> None:
    scan_pickle(io.BytesIO(data), Budgets(**limits), Deadline(30, mb.WeightsError))


# ----- Budgets ------------------------------------------------------------------------------------

def test_budgets_are_positive_and_read_from_the_environment(monkeypatch):
    with pytest.raises(mb.OptionsError, match=r"Budgets\(max_pickle_depth=0\): every budget is a positive number"):
        Budgets(max_pickle_depth=0)
    monkeypatch.setenv("MLBENCH_MAX_PICKLE_DEPTH", "500")
    monkeypatch.setenv("MLBENCH_MAX_SECONDS", "2.5")
    assert budgets().max_pickle_depth == 500 and budgets().max_seconds == 2.5
    assert budgets(Budgets(), max_tensors=7).max_tensors == 7 and budgets(Budgets()).max_pickle_depth == 100
    monkeypatch.setenv("MLBENCH_MAX_SECONDS", "soon")
    with pytest.raises(mb.OptionsError, match=r"MLBENCH_MAX_SECONDS='soon' is not a number"):
        budgets()


def test_deadline_names_max_seconds():
    deadline = Deadline(0.001, mb.WeightsError)
    time.sleep(0.01)
    with pytest.raises(mb.WeightsError, match=r"scanning took too long: .* exceeds the budget max_seconds = 0.001 s"):
        deadline.check("scanning")


def test_open_regular_refuses_before_and_after_opening(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(mb.ImageError, match=r"pipe is a FIFO \(named pipe\), not a regular file: refused"):
        open_regular(tmp_path / "pipe", mb.ImageError)
    with pytest.raises(mb.ImageError, match=r"nope: does not exist \(absolute path tried"):
        open_regular(tmp_path / "nope", mb.ImageError)
    (tmp_path / "big").write_bytes(bytes(100))
    with pytest.raises(mb.WeightsError, match=r"the file size: 100 bytes exceeds the budget max_file_bytes = 10 bytes"):
        open_regular(tmp_path / "big", mb.WeightsError, 10)
    with pytest.raises(mb.ImageError, match=r"status: the bytes read: 11 bytes exceeds the budget max_file_bytes"):
        read_regular("/proc/self/status", mb.ImageError, 10)  # procfs says 0 bytes, then has more
    monkeypatch.setattr("mlbench.budgets.describe_file", lambda path: ("regular", ""))
    with pytest.raises(mb.ImageError, match=r"pipe is a FIFO \(named pipe\), not a regular file"):
        open_regular(tmp_path / "pipe", mb.ImageError)  # swapped in after the check: its descriptor says so

    def denied(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(mb.ImageError, match=r"big cannot be opened \(PermissionError: Permission denied\)"):
        open_regular(tmp_path / "big", mb.ImageError)


# ----- the pickle scan ------------------------------------------------------------------------------

@pytest.mark.parametrize("data, limits, match", [
    (b"\x80\x020.", {}, r"malformed \(stack underflow\)"),
    (b"\x80\x02t.", {}, r"no MARK before an opcode that needs one"),
    (b"\x80\x02K\x01Na.", {}, r"items added to a int"),
    (b"\x80\x02]q\x00]q\x01h\x01h\x00ah\x00Na.", {}, r"filled after it was placed inside another"),
    (b"\x80\x02h\x05.", {}, r"memo entry 5 read before it was written"),
    (b"\x80\x02q\x00.", {}, r"memo write with an empty stack"),
    (b"\x80\x02(o.", {}, r"OBJ without a class"),
    (b"\x80\x02N", {}, r"malformed \(ValueError: pickle exhausted before seeing STOP\)"),
    (b"\x80\x02\xff.", {}, r"malformed \(ValueError: at position 2, opcode b'\\xff' unknown\)"),
    (b"\x80\x02NNNNNNN.", {"max_pickle_memo": 5}, r"the unpickler's stack: 6 entries exceeds the budget max_pickle_memo"),
    (b"\x80\x02((((N.", {"max_pickle_memo": 2}, r"the unpickler's stack: 3 entries exceeds the budget max_pickle_memo"),
    (b"\x80\x02Nq\x00q\x01q\x02.", {"max_pickle_memo": 2}, r"the unpickler's memo: 3 entries exceeds"),
    (b"\x80\x02N\x85\x85\x85\x85.", {"max_pickle_depth": 3}, r"nesting depth .*: 4 exceeds the budget max_pickle_depth = 3"),
    (b"\x80\x02N" + b"q\x00h\x00\x86" * 12, {"max_pickle_objects": 1000}, r"max_pickle_objects = 1,000"),
    (b"\x80\x02NNN.", {"max_pickle_ops": 3}, r"the opcodes of the pickle: 4 exceeds the budget max_pickle_ops = 3"),
    (_many_tensors_pickle(3), {"max_tensors": 2}, r"the tensors in the pickle: 3 exceeds the budget max_tensors = 2"),
    (_storage_numel(1000), {"max_decompressed_bytes": 100}, r"tensor storage the pickle declares: 4,000 bytes exceeds"),
])
def test_the_scan_refuses_malformed_pickles_and_stops_at_each_budget(data, limits, match):
    with pytest.raises(mb.WeightsError, match=match):
        _scan(data, **limits)


def test_the_scan_finds_every_global_of_a_real_checkpoint():
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    scan = scan_pickle(io.BytesIO(data), Budgets(), Deadline(30, mb.WeightsError))
    assert scan.globals == ("collections.OrderedDict", "torch.FloatStorage", "torch._utils._rebuild_tensor_v2")
    assert (scan.tensors, scan.storage_bytes, scan.depth) == (1, 8, 5)


# ----- the formats -----------------------------------------------------------------------------------

def _zip_bytes(members: dict[str, bytes]) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out


def test_zip_refusals(tmp_path):
    limits, deadline = Budgets(max_tensors=1), Deadline(30, mb.WeightsError)
    with pytest.raises(mb.WeightsError, match=r"the zip archive is incomplete \(9 bytes, no end of central directory\)"):
        scan_zip(io.BytesIO(b"PK\x03\x04xxxxx"), 9, limits, deadline)
    many = _zip_bytes({f"archive/data/{i}": b"" for i in range(20)})
    with pytest.raises(mb.WeightsError, match=r"the members of the zip archive .*: 20 exceeds the budget max_tensors = 1"):
        scan_zip(many, 100, limits, deadline)
    large = _zip_bytes({"archive/data.pkl": b"N.", "archive/data/0": bytes(1000)})
    with pytest.raises(mb.WeightsError, match=r"largest: archive/data/0, 1,000 bytes.*: 1,002 bytes exceeds the budget "
                                              r"max_decompressed_bytes = 100 bytes"):
        scan_zip(large, 100, Budgets(max_decompressed_bytes=100), deadline)
    bad_crc = _raw_zip(tmp_path / "crc.pth", [("archive/data.pkl", 0, 2, b"N.")], bad_crc=True)
    with pytest.raises(mb.WeightsError, match=r"the pickle member archive/data.pkl fails its CRC check"):
        scan_zip(io.BytesIO(bad_crc.read_bytes()), 100, Budgets(), deadline)
    damaged = bytearray(_zip_bytes({"archive/data.pkl": b"N."}).getvalue())
    damaged[:4] = b"XXXX"
    with pytest.raises(mb.WeightsError, match=r"damaged or incomplete .*BadZipFile: Bad magic number for file header"):
        scan_zip(io.BytesIO(bytes(damaged)), len(damaged), Budgets(), deadline)


def test_legacy_and_safetensors_refusals():
    deadline = Deadline(30, mb.WeightsError)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("pickle"), io.BytesIO(b""))
    with pytest.raises(mb.WeightsError, match=r"a tar archive of pickles \(the torch < 0.4 format\)"):
        scan_legacy(io.BytesIO(tar.getvalue()), len(tar.getvalue()), Budgets(), deadline)
    forged = _storage_numel(1000)
    with pytest.raises(mb.WeightsError, match=r"declares 4,000 bytes of tensor data but the file has only"):
        scan_legacy(io.BytesIO(forged), len(forged), Budgets(), deadline)
    header = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, ' \
             b'"b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(mb.WeightsError, match=r"announces .* bytes of metadata but the file has only 40 bytes"):
        check_safetensors(io.BytesIO(data[:40]), 40, Budgets())
    with pytest.raises(mb.WeightsError, match=r"over safetensors' own limit of 100,000,000"):
        check_safetensors(io.BytesIO(struct.pack("<Q", 200_000_000)), 10**9, Budgets())
    with pytest.raises(mb.WeightsError, match=r"tensors in the safetensors header: 2 exceeds the budget max_tensors = 1"):
        check_safetensors(io.BytesIO(data), len(data), Budgets(max_tensors=1))


# ----- checkpoints: reports and refusals --------------------------------------------------------------

class Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def test_checkpoint_reports_name_what_was_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "w.pth")
    assert [p.code for p in check_weights(tmp_path / "w.pth").problems] == ["not_a_file"]
    with pytest.raises(mb.WeightsError, match=r"w.pth' is not a regular file: it is a FIFO \(named pipe\); refused"):
        mb.load_model(tmp_path / "w.pth")
    (tmp_path / "p0.pth").write_bytes(pickle.dumps({"w": Payload()}, protocol=0))  # no PROTO marker
    report = check_weights(tmp_path / "p0.pth")
    assert report.format == "legacy_pickle" and [p.code for p in report.problems] == ["code_execution"]
    assert "weights_only" not in str(report) and not (tmp_path / "PAYLOAD_RAN").exists()
    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pth")
    small = Budgets(max_file_bytes=100)
    assert [p.code for p in check_weights(tmp_path / "ok.pth", budgets=small).problems] == ["over_budget"]
    with pytest.raises(mb.WeightsError, match=r"the file size: .* exceeds the budget max_file_bytes = 100 bytes"):
        read_checkpoint(tmp_path / "ok.pth", budgets=small)
    _zip(tmp_path, "nodata.pth", _many_tensors_pickle(1))  # scans clean, but its storage record is missing
    failed = check_weights(tmp_path / "nodata.pth")
    assert [p.code for p in failed.problems] == ["load_failed"] and "weights_only=False" not in str(failed)


# ----- images ------------------------------------------------------------------------------------------

def test_image_budgets_from_the_header():
    with pytest.raises(mb.ImageError, match=r"<bytes>: the image bytes: 3 bytes exceeds the budget max_file_bytes = 2"):
        load_bytes(b"abc", 2)
    with pytest.raises(mb.ImageError, match=r"announces 5x0 pixels, an empty image"):
        check_header("a", ImageHeader(0, 5), Budgets())
    with pytest.raises(mb.ImageError, match=r"3x2 = 6 pixels exceeds the limit of 5"):
        check_header("a", ImageHeader(2, 3), Budgets(max_pixels=5))
    with pytest.raises(mb.ImageError, match=r"\(48x64 pixels x 3 channel\(s\) x 1 byte\(s\) per sample, from the header, "
                                             r"nothing decoded\): 9,216 bytes exceeds the budget max_decoded_bytes = 9,000"):
        mb.read_image(_pil(RGB, "PNG"), budgets=Budgets(max_decoded_bytes=9000))


def test_integrity_refusals():
    png = bytearray(_pil(RGB, "PNG"))
    png[-20] ^= 0xFF  # inside the IDAT chunk
    with pytest.raises(mb.ImageError, match=r"the PNG chunk 'IDAT' at byte 33 fails its CRC check"):
        mb.read_image(bytes(png))
    with pytest.raises(mb.ImageError, match=r"announces 48x65 pixels .* holds fewer .*invent or drop rows"):
        mb.read_image(_png_size(_pil(RGB, "PNG"), 48, 65))
    body = b"not zlib at all"
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    broken = _pil(RGB, "PNG")[:33] + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    with pytest.raises(mb.ImageError, match=r"the PNG's compressed rows are damaged \(Error -3"):
        mb.read_image(broken)
    with pytest.raises(mb.ImageError, match=r"needs 2 strips or tiles, but the file lists 1"):
        mb.read_image(_tiff_tag(_tiff(compression="zlib"), 257, 128))
    with pytest.raises(mb.ImageError, match=r"BitsPerSample 255 with SampleFormat 1 is no pixel type"):
        mb.read_image(_tiff_tag(_tiff(RGB[..., 0]), 258, 255))


def test_read_image_raises_only_image_error(monkeypatch):
    def index_error(*args):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr("mlbench.image.read.decode", index_error)
    with pytest.raises(mb.ImageError, match=r"cannot be decoded \(IndexError: tuple index out of range\)"):
        mb.read_image(_pil(RGB, "PNG"))
    monkeypatch.setattr("mlbench.image.read.decode", lambda *args: (np.zeros((16, 0), np.uint8), {"problems": []}))
    with pytest.raises(mb.ImageError, match=r"decodes to an array of shape \(16, 0\); expected"):
        mb.read_image(_pil(RGB, "PNG"))


@pytest.mark.parametrize("given, says", [
    ("~/cells.png", "a leading ~ is not expanded here: pass os.path.expanduser(path)"),
    ("https://example.org/cells.png", "a URL, not a path"),
    ("file:///data/cells.png", "a file:// URL: pass the path after it, '/data/cells.png'"),
    ("cells.png\n", "the path starts or ends with blanks, 'cells.png\\n'"),
    ("C:\\data\\cells.png", "a Windows path"),
    ("", "is an empty path (''): no file was named"),
    ("cells\x00.png", "holds a NUL character"),
    ("{tmp}/no/such/folder/cells.png", "its folder '{tmp}/no/such/folder' does not exist either"),
    ("{tmp}/cells_01.png", "did you mean 'Cells_01.PNG' or 'cells_02.png'?"),
    ("{tmp}/cels_02.png", "did you mean 'cells_02.png'?"),
])
def test_a_missing_path_says_what_is_wrong_with_it(tmp_path, monkeypatch, given, says):
    """The images', checkpoints' and cases' missing path: what its text shows (a URL, ~, blanks, a Windows path, an
    empty one) or the files of its folder with the same extension and a close name."""
    for name in ("Cells_01.PNG", "cells_02.png", "cells_02.pth"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    given, says = given.format(tmp=tmp_path), says.format(tmp=tmp_path)
    assert describe_file(given)[0] == "missing" and says in describe_file(given)[1], describe_file(given)
    with pytest.raises(mb.ImageError, match=re.escape(says)):
        mb.read_image(given)
    weights = check_weights(given.replace(".png", ".pth")).problems[0]
    assert weights.code == "missing" and ("did you mean 'cells_02.pth'" in weights.message) == ("did you mean" in says), weights


def test_read_image_names_its_argument_when_it_is_no_path():
    with pytest.raises(mb.OptionsError, match=r"got ndarray \(an array is decoded already: pass it to mb.segment"):
        mb.read_image(np.zeros((4, 4), np.uint8))


def test_a_state_dict_of_max_tensors_tensors_fits_the_opcode_budget_and_shared_storages_count_once():
    """``max_tensors`` is the budget a large state dict meets, not the opcode count before it; a
    storage that two tensors share (tied weights) counts its bytes once."""
    from mlbench.models.pickle_scan import scan_pickle

    shared = torch.zeros(10)
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(1000)}
    state.update({"tied.a": shared, "tied.b": shared[2:]})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    archive = zipfile.ZipFile(buffer)
    data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    scan = scan_pickle(io.BytesIO(data), Budgets(), Deadline(30, mb.WeightsError))
    assert scan.tensors == 1002 and scan.storage_bytes == 1000 * 2 * 4 + 10 * 4
    limits = Budgets()
    assert scan.ops / scan.tensors * limits.max_tensors < limits.max_pickle_ops
