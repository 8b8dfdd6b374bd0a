"""check_image: the careful reading plus what as_served would do, and the check-image command."""

from __future__ import annotations

import argparse
import io
import json
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

import mlbench as mb
from mlbench.checks.image import add_check_image_command, check_image, served_decode


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlbench")
    add_check_image_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_16_bit_sample_is_clipped_as_served():
    report = check_image(mb.load_sample("spheroids_16bit").path)
    codes = [p.code for p in report.problems]
    assert codes == ["served_clipped"] and not report.ok
    assert "16-bit clipped at 255: 100% of pixels saturate" in report.problems[0].message
    assert report.served[0] == "decoded as (512, 512, 3) uint8, values 255..255"


def test_partial_clipping_percentage_is_measured():
    image = np.zeros((10, 10), np.uint16)
    image[:3] = 1000  # 30% above 255
    buf = io.BytesIO()
    tifffile.imwrite(buf, image)
    report = check_image(buf.getvalue())
    assert report.problems[0].message == "10-bit clipped at 255: 30% of pixels saturate"


def test_float_tiff_turns_black_as_served():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40))
    report = check_image(buf.getvalue())
    assert [p.code for p in report.problems] == ["served_black"]
    assert served_decode(buf.getvalue()).max() <= 1


def test_exif_orientation_ignored_as_served():
    pil = Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1)))
    exif = pil.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", exif=exif.tobytes())
    report = check_image(buf.getvalue())
    assert [p.code for p in report.problems] == ["exif_rotated", "served_orientation"]
    assert "sees 40x60 as stored, not 60x40" in report.problems[1].message


def test_good_8_bit_png_is_ok_with_notes(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(_png(np.tile(np.arange(40, dtype=np.uint8) + 100, (30, 1))))
    report = check_image(path)
    assert report.ok and report.served[-2] == "stretched to a square input: aspect 40:30 becomes 1:1"
    assert "as_served: then /255 without ImageNet mean/std" in str(report)


def test_unreadable_files_become_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "page.png").write_text("<html>502</html>")
    full = _png(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    expected = {"missing.png": "missing", "empty.png": "empty", "page.png": "not_an_image", "cut.png": "truncated"}
    for name, code in expected.items():
        report = check_image(name)
        assert [p.code for p in report.problems] == [code] and not report.ok, name
    assert f"absolute path tried: {tmp_path}/missing.png" in check_image("missing.png").problems[0].message
    assert check_image("cut.png").format == "png"
    assert "not decoded" in str(check_image("empty.png"))


def test_bomb_is_reported_too_large():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    assert [p.code for p in check_image(bomb).problems] == ["too_large"]


def test_check_image_rejects_bad_argument():
    with pytest.raises(mb.OptionsError, match="check_image expects a path or bytes, got ndarray"):
        check_image(np.zeros((4, 4)))


def test_cli_exit_status_and_json_lines(tmp_path, capsys):
    good = tmp_path / "good.png"
    good.write_bytes(_png(np.tile(np.arange(32, dtype=np.uint8) + 100, (32, 1))))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    assert _run_cli(["check-image", str(good)]) == 0
    assert "no problems" in capsys.readouterr().out
    assert _run_cli(["check-image", str(good), str(bad), "--json"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["ok"] for o in objects] == [True, False] and objects[1]["problems"][0]["code"] == "empty"


def _files_that_are_not_images(tmp_path) -> dict[str, bytes]:
    """Real files of other kinds (written by their own libraries where installed) and real magic numbers."""
    import base64
    import gzip
    import zipfile

    import torch
    from safetensors.torch import save_file

    png = _png(np.zeros((8, 8), np.uint8))
    np.save(tmp_path / "a.npy", np.zeros((8, 8), np.float32))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("cells/a.png", png)
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "a.npz", image=np.zeros((8, 8), np.uint16))
    return {
        "a.npy": (tmp_path / "a.npy").read_bytes(), "a.zip": (tmp_path / "a.zip").read_bytes(),
        "a.png.gz": gzip.compress(png), "a.b64": base64.b64encode(png), "a.url": b"data:image/png;base64," + base64.b64encode(png),
        "w.safetensors": (tmp_path / "w.safetensors").read_bytes(), "w.pth": (tmp_path / "w.pth").read_bytes(),
        "old.pth": (tmp_path / "old.pth").read_bytes(), "a.npz": (tmp_path / "a.npz").read_bytes(),
        "a.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
        "a.dcm": bytes(128) + b"DICM" + bytes(64), "a.czi": b"ZISRAWFILE" + bytes(64), "a.nd2": b"\xda\xce\xbe\x0a" + bytes(64),
        "a.jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), "a.pdf": b"%PDF-1.7\n" + bytes(64),
        "a.pgm": b"P5\n8 8\n255\n" + bytes(64), "a.mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2" + bytes(64),
        "a.svg": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
        "a.tif": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 1024\n",
        "zeros.png": bytes(4096), "m.onnx": b"\x08\x07\x12\x07pytorch\x1a\x052.13.0" + bytes(64),
    }


@pytest.mark.parametrize("name, says", [
    ("a.npy", "NumPy array"), ("a.zip", "ZIP archive"), ("a.png.gz", "gzip"), ("a.b64", "base64 text of a PNG"),
    ("a.url", "data URL"), ("w.safetensors", "safetensors file (model weights)"), ("w.pth", "PyTorch checkpoint (torch.save)"),
    ("old.pth", "Python pickle"), ("a.npz", "NumPy .npz file"),
    ("a.heic", "HEIC/HEIF"), ("a.dcm", "DICOM"), ("a.czi", "Zeiss CZI"), ("a.nd2", "Nikon ND2"), ("a.jp2", "JPEG 2000"),
    ("a.pdf", "PDF"), ("a.pgm", "Netpbm image (PGM)"), ("a.mp4", "MP4 video"), ("a.svg", "SVG drawing"),
    ("a.tif", "Git LFS pointer"), ("zeros.png", "all zero bytes"), ("m.onnx", "an ONNX model"),
])
def test_a_file_of_another_kind_is_named_with_its_conversion(tmp_path, name, says):
    """Not "first bytes b'...'": what the file is and how to make an image of it, from the path and from the bytes."""
    data = _files_that_are_not_images(tmp_path)[name]
    (tmp_path / name).write_bytes(data)
    for source in (tmp_path / name, data):
        with pytest.raises(mb.ImageError, match="not a recognised image") as raised:
            mb.read_image(source)
        assert "; it is " in str(raised.value) and "first bytes" not in str(raised.value)
        assert says in str(raised.value), str(raised.value)
    report = check_image(tmp_path / name)
    assert [p.code for p in report.problems] == ["not_an_image"] and says in report.problems[0].message
    assert report.format.startswith("not an accepted image: ") and says in report.format  # not "unknown"


def test_unknown_bytes_still_show_their_first_bytes():
    with pytest.raises(mb.ImageError, match=r"first bytes b'\\x01\\x02\\x03\\x04.*check how the file was produced"):
        mb.read_image(bytes(range(1, 100)))
    assert check_image(bytes(range(1, 100))).format == "unknown"


def _retype_tag(data: bytes, tag: int, new_type: int = 99) -> bytes:
    """The TIFF ``data`` with the first IFD entry of ``tag`` given a field type that does not exist."""
    out = bytearray(data)
    ifd = int.from_bytes(out[4:8], "little")
    for i in range(int.from_bytes(out[ifd:ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        if int.from_bytes(out[entry:entry + 2], "little") == tag:
            out[entry + 2:entry + 4] = new_type.to_bytes(2, "little")
            return bytes(out)
    raise AssertionError(f"tag {tag} not in the first IFD")


def test_what_tifffile_logs_about_a_damaged_tiff_reaches_the_report(tmp_path, capfd):
    """tifffile logs a tag it cannot read instead of raising: a damaged Software tag still decodes
    (the log line is a problem of the report), a damaged Compression tag does not (the error quotes
    the log line, which names the tag, instead of only tifffile's AttributeError); stderr stays clean."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), software="scope")
    (tmp_path / "software.tif").write_bytes(_retype_tag(buffer.getvalue(), 305))
    (tmp_path / "compression.tif").write_bytes(_retype_tag(buffer.getvalue(), 259))
    array, report = mb.read_image(tmp_path / "software.tif")
    assert array.shape == (64, 64) and [p.code for p in report.problems] == ["decoder_log"]
    assert "TiffTag 305" in report.problems[0].message and "invalid data type 99" in report.problems[0].message
    with pytest.raises(mb.ImageError, match=r"compression\.tif: the TIFF cannot be decoded .*TiffTag 259.*invalid data type 99"):
        mb.read_image(tmp_path / "compression.tif")
    assert "TiffTag" not in capfd.readouterr().err


def test_a_tiff_without_pages_says_so(tmp_path):
    (tmp_path / "no_pages.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # header, first IFD offset 0
    with pytest.raises(mb.ImageError, match="no_pages.tif: the TIFF holds no image: its header is intact but lists no page"):
        mb.read_image(tmp_path / "no_pages.tif")


def test_a_format_without_a_signature_is_named_by_its_suffix(tmp_path):
    """A TGA file has no magic number: from a path ending in .tga it is named with its conversion; the
    same bytes without a name get the plain first-bytes message."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buffer, format="TGA")
    (tmp_path / "scan.TGA").write_bytes(buffer.getvalue())
    with pytest.raises(mb.ImageError, match=r"scan\.TGA: .*it is a Truevision TGA image .*save\('image\.png'\)"):
        mb.read_image(tmp_path / "scan.TGA")
    with pytest.raises(mb.ImageError, match="first bytes"):
        mb.read_image(buffer.getvalue())
    (tmp_path / "run.tga").mkdir()
    (tmp_path / "run.tga" / "scan").write_bytes(buffer.getvalue())  # the folder's suffix is not the file's
    with pytest.raises(mb.ImageError, match="first bytes"):
        mb.read_image(tmp_path / "run.tga" / "scan")
