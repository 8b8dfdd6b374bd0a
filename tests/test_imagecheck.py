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
