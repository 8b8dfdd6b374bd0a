"""The careful reader on awkward files generated here: every format quirk has a known answer."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

import mlbench as mb


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def _gradient(height: int = 48, width: int = 64) -> np.ndarray:
    return (np.add.outer(np.arange(height), np.arange(width)) * 2 % 256).astype(np.uint8)


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A few hundred bytes of valid PNG whose header announces width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_jpeg_and_png_raise(fmt):
    data = _encode(Image.fromarray(_gradient(256, 256)), fmt)
    with pytest.raises(mb.ImageError, match="truncated"):
        mb.read_image(data[: len(data) // 2])


def test_truncated_jpeg_that_cv2_accepts_is_refused(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    grey_rows = cv2.imread(str(path))  # cv2 hands back a full array, the lost half grey
    assert grey_rows.shape == (256, 256, 3) and grey_rows[-1].mean() == 128
    with pytest.raises(mb.ImageError, match="half.jpg: the image is truncated"):
        mb.read_image(path)


def test_truncated_tiff_raises():
    data = _tiff(np.zeros((128, 128), np.uint16))
    with pytest.raises(mb.ImageError, match=r"the TIFF is truncated: .* ends at byte 33,024, but the file has 16,512 "
                                             r"bytes \(16,512 missing\).*export the file again"):
        mb.read_image(data[: len(data) // 2])


def test_missing_file_names_absolute_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mb.ImageError, match=f"absolute path tried: {tmp_path}/nope.png, working directory: {tmp_path}"):
        mb.read_image("nope.png")
    with pytest.raises(mb.ImageError, match="is a directory"):
        mb.read_image(tmp_path)


def test_html_and_unknown_content_raise(tmp_path):
    page = tmp_path / "mask.png"
    page.write_text("<!DOCTYPE html><html><body>504 Gateway Time-out</body></html>")
    with pytest.raises(mb.ImageError, match="mask.png: not a recognised image.*HTML"):
        mb.read_image(page)
    with pytest.raises(mb.ImageError, match=r"it is a PDF document: export the page as PNG or TIFF"):
        mb.read_image(b"%PDF-1.7\n% not an image")
    with pytest.raises(mb.ImageError, match=r"first bytes b'%XYZ-1.7"):
        mb.read_image(b"%XYZ-1.7\n% not an image")


def test_png_bomb_refused_from_header_without_allocating():
    bomb = png_bomb()
    assert len(bomb) < 1000
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(mb.ImageError, match="60000x60000 = 3,600,000,000 pixels exceeds the limit of 64,000,000"):
        mb.read_image(bomb)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 5_000_000


def test_jpeg_size_is_read_from_the_sof_marker():
    data = _encode(Image.fromarray(_gradient(300, 200)), "JPEG")
    with pytest.raises(mb.ImageError, match="200x300 = 60,000 pixels exceeds the limit of 50,000"):
        mb.read_image(data, max_pixels=50_000)


def test_16_bit_rgb_png_keeps_16_bits_and_rgb_order():
    rgb = np.zeros((20, 30, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 60000, 30000, 1000
    rgb[5, 7] = (1, 2, 3)
    data = cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()  # cv2 writes BGR
    assert Image.open(io.BytesIO(data)).mode == "RGB"  # Pillow would give 8 bits
    image, report = mb.read_image(data)
    assert image.dtype == np.uint16 and np.array_equal(image, rgb)
    assert report.bit_depth == 16 and report.mode == "RGB;16" and report.ok


def test_12_bit_in_16_and_float32_tiff_kept():
    twelve = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    image, report = mb.read_image(_tiff(twelve))
    assert np.array_equal(image, twelve) and report.dtype == "uint16" and report.bit_depth == 12
    floats = np.linspace(-0.5, 2.5, 40 * 50, dtype=np.float32).reshape(40, 50)
    image, report = mb.read_image(_tiff(floats))
    assert image.dtype == np.float32 and np.array_equal(image, floats)
    assert report.bit_depth == 32 and report.value_range == (-0.5, 2.5)


def test_palette_png_gives_indices():
    indices = (np.arange(32 * 32).reshape(32, 32) % 5).astype(np.uint8)
    pal = Image.fromarray(indices, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * (3 * 251))
    image, report = mb.read_image(_encode(pal, "PNG"))
    assert image.shape == (32, 32) and np.array_equal(image, indices)
    assert [p.code for p in report.problems] == ["palette"]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (40, 30), (255, 0, 0, 0))  # pure cyan
    image, report = mb.read_image(_encode(cmyk, "JPEG", quality=95))
    assert image.shape == (30, 40, 3) and report.mode == "CMYK"
    assert image[..., 0].mean() < 10 and image[..., 1:].mean() > 245
    assert "cmyk" in [p.code for p in report.problems]


def test_exif_rotated_jpeg_is_turned_upright():
    stored = np.zeros((40, 60), np.uint8)
    stored[:10, :20] = 255  # bright block top-left as stored
    pil = Image.fromarray(stored)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image, report = mb.read_image(_encode(pil, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.shape == (60, 40) and report.orientation == 6
    assert np.abs(image.astype(int) - np.rot90(stored, -1)).mean() < 5
    assert [p.code for p in report.problems] == ["exif_rotated"]


def test_multi_page_tiff_pages_and_bad_page():
    pages = np.stack([np.full((16, 24), 10 * (i + 1), np.uint16) for i in range(3)])
    pages[:, 0, 0] = 0
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        for page in pages:
            writer.write(page)
    image, report = mb.read_image(buf.getvalue(), page=1)
    assert np.array_equal(image, pages[1]) and report.pages == 3 and report.page_used == 1
    assert [p.code for p in report.problems] == ["multi_page"]
    with pytest.raises(mb.ImageError, match=r"page 5 requested but the file has 3 page\(s\); pass page=0..2"):
        mb.read_image(buf.getvalue(), page=5)


@pytest.mark.parametrize("kind", ["imagej", "ome"])
def test_channels_first_tiff_is_moved_last(kind):
    planes = np.stack([np.full((20, 30), v, np.uint16) for v in (100, 2000, 4000)])
    data = _tiff(planes, **{kind: True}, metadata={"axes": "CYX"})
    image, report = mb.read_image(data)
    assert image.shape == (20, 30, 3) and list(image[0, 0]) == [100, 2000, 4000]
    assert report.axes == "CYX" and report.pages == 1
    assert [p.code for p in report.problems] == ["channels_first", "channels_as_rgb"]  # three stains fed as R, G, B
    _, rgb = mb.read_image(_tiff(planes.transpose(1, 2, 0), photometric="rgb"))  # a colour image's samples: no note
    assert rgb.problems == ()


def test_imagej_z_stack_of_channels_picks_one_plane():
    stack = np.arange(4 * 3 * 8 * 10, dtype=np.uint16).reshape(4, 3, 8, 10)
    image, report = mb.read_image(_tiff(stack, imagej=True, metadata={"axes": "ZCYX"}), page=2)
    assert np.array_equal(image, stack[2].transpose(1, 2, 0))
    assert report.pages == 4 and report.page_used == 2


def test_name_mismatch_and_report_to_dict(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(_encode(Image.fromarray(_gradient()), "PNG"))
    image, report = mb.read_image(path)
    assert report.format == "png" and image.shape == (48, 64)
    assert report.problems[0].code == "name_mismatch" and "ends in .tif but the content is PNG" in report.problems[0].message
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["ok"] is False and as_json["percentiles"]["p50"] == float(np.percentile(image, 50))
    assert "problem [name_mismatch]" in str(report)


def test_two_fluorescence_channels_are_not_taken_for_alpha():
    planes = np.stack([_gradient(), np.full((48, 64), 200, np.uint8)])
    image, report = mb.read_image(_tiff(planes, ome=True, metadata={"axes": "CYX"}))
    assert np.array_equal(image, planes[0]) and not report.alpha
    assert [p.code for p in report.problems] == ["channels_first", "channels_dropped"]
    assert "channel 0 used as grey, channel 1 ignored" in report.problems[1].message


def test_rgba_tiff_alpha_is_dropped():
    rgba = np.dstack([_gradient()] * 3 + [np.full((48, 64), 255, np.uint8)])
    image, report = mb.read_image(_tiff(rgba, photometric="rgb", extrasamples=["unassalpha"]))
    assert image.shape == (48, 64, 3) and report.alpha
    assert [p.code for p in report.problems] == ["alpha_dropped"]


def test_binary_tiff_becomes_0_255_and_is_flagged():
    """tifffile stores a bool array as MinIsWhite bits, which PIL (the service's reader) inverts: so does read_image."""
    mask = _gradient() > 100
    image, report = mb.read_image(_tiff(mask))
    assert image.dtype == np.uint8 and set(np.unique(image)) == {0, 255}
    assert np.array_equal(image == 0, mask)
    assert [p.code for p in report.problems] == ["min_is_white", "binary"]
    assert "looks like a mask" in report.problems[1].message


def test_tiff_colour_as_pil_reads_it_and_a_padded_last_strip_is_valid():
    """MinIsWhite inverted, CMYK converted and the Orientation tag applied, as for other formats; a
    palette's indices said; a last strip padded to a full one read, not refused."""
    grey = _gradient().astype(np.uint8)
    image, report = mb.read_image(_tiff(grey, photometric="miniswhite"))
    assert np.array_equal(image, 255 - grey) and report.problems[0].code == "min_is_white"
    cmyk = np.stack([grey, grey // 2, 255 - grey, grey // 4], -1)
    image, report = mb.read_image(_tiff(cmyk, photometric="separated"))
    with Image.open(io.BytesIO(_tiff(cmyk, photometric="separated"))) as pil:
        assert np.array_equal(image, np.asarray(pil.convert("RGB")))
    assert [p.code for p in report.problems] == ["cmyk"]
    image, report = mb.read_image(_tiff(grey, extratags=[(274, "H", 1, 6, True)]))
    assert image.shape == grey.shape[::-1] and "Orientation tag 6 applied" in report.problems[0].message
    _, report = mb.read_image(_tiff(grey, photometric="palette", colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))))
    assert [p.code for p in report.problems] == ["palette"]
    data = bytearray(_tiff(grey[:42], rowsperstrip=16))  # strips of 16, 16 and 10 rows
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag, counts = tif.pages[0].tags["StripByteCounts"], tif.pages[0].databytecounts
    full = 16 * grey.shape[1]
    assert counts[-1] == 10 * grey.shape[1]
    data += b"\0" * (full - counts[-1])  # bytes for the larger count to cover
    fmt = "<I" if tag.dtype == 4 else "<H"
    struct.pack_into(fmt, data, tag.valueoffset + struct.calcsize(fmt) * (len(counts) - 1), full)
    image, report = mb.read_image(bytes(data))
    assert np.array_equal(image, grey[:42]) and not report.problems


def test_nan_pixels_and_constant_image_are_flagged():
    values = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    values[3, 4] = np.nan
    _, report = mb.read_image(_tiff(values))
    assert [p.code for p in report.problems] == ["nonfinite"]
    assert report.problems[0].message.startswith("1 NaN/Inf pixels (0.03%)")
    _, report = mb.read_image(_tiff(np.full((10, 10), 7, np.uint8)))
    assert [p.code for p in report.problems] == ["constant"] and "the value 7:" in report.problems[0].message


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_negative_pixels_are_flagged_with_their_count(dtype):
    """Signed data (background-subtracted, CT) reaches the model below the 0..1 it was trained on."""
    values = (np.linspace(-1, 3, 48 * 64) * (1000 if dtype == np.int16 else 1)).reshape(48, 64).astype(dtype)
    image, report = mb.read_image(_tiff(values))
    assert image.dtype == dtype and image.min() < 0  # kept as it is: the report says what to do
    assert [p.code for p in report.problems] == ["negative"]
    below = int((values < 0).sum())
    assert report.problems[0].message.startswith(f"{below} pixels ({below / values.size:.2%}) below zero (minimum -1")
    assert "image - image.min()" in report.problems[0].message
    assert mb.read_image(_tiff((values - values.min()).astype(dtype)))[1].problems == ()


@pytest.mark.parametrize("compression", ["tiff_lzw", "jpeg"])
def test_compressed_tiffs_decode(compression):
    """LZW (ImageJ/Fiji's default) and JPEG-in-TIFF need imagecodecs; both must decode."""
    rgb = np.dstack([_gradient()] * 3)
    image, report = mb.read_image(_encode(Image.fromarray(rgb), "TIFF", compression=compression))
    assert image.shape == (48, 64, 3) and report.compression == ("lzw" if compression == "tiff_lzw" else "jpeg")
    assert np.abs(image.astype(int) - rgb).max() <= (0 if compression == "tiff_lzw" else 8)


def test_missing_codec_is_not_called_damage(monkeypatch):
    def refuse(*args, **kwargs):
        raise KeyError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile, "TiffFile", refuse)
    with pytest.raises(mb.ImageError, match="the codec is missing here, not the file damaged: pip install imagecodecs"):
        mb.read_image(_tiff(_gradient()))
    assert mb.check_image(_tiff(_gradient()), isolate=False).problems[0].code == "codec_missing"  # the patch is here


def test_16_bit_rgb_png_with_exif_orientation_is_turned_upright():
    stored = np.zeros((20, 30, 3), np.uint16)
    stored[..., 0] = np.arange(30, dtype=np.uint16) * 2000
    stored[0, 0] = (1, 2, 3)
    png = cv2.imencode(".png", stored[..., ::-1])[1].tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\0\0") else payload
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data = png[:33] + chunk + png[33:]  # after the signature (8) and IHDR (25)
    image, report = mb.read_image(data)
    assert image.dtype == np.uint16 and image.shape == (30, 20, 3) and report.orientation == 6
    assert np.array_equal(image, np.rot90(stored, k=-1))  # 6 = turn 90 degrees clockwise
    assert "exif_rotated" in [p.code for p in report.problems]


def test_large_images_get_sampled_percentiles_and_exact_extremes(tmp_path):
    """Above 2^18 values the percentiles come from a strided grid (the report says how many values);
    the value range and bit depth stay exact, even for one hot pixel the grid does not see."""
    from mlbench.image.read import EXACT_PERCENTILES, PERCENTILE_SAMPLE

    rng = np.random.default_rng(0)
    image = rng.integers(100, 3000, (640, 600), dtype=np.uint16)
    image[333, 431] = 40000  # off the grid's rows and columns (every 4th at this size)
    path = tmp_path / "big.tif"
    path.write_bytes(_tiff(image))
    read, report = mb.read_image(path)
    assert image.size > EXACT_PERCENTILES and report.percentile_sample >= PERCENTILE_SAMPLE
    assert report.value_range == (float(image.min()), 40000.0) and report.bit_depth == 16
    assert f"(of {report.percentile_sample:,} sampled values)" in str(report)
    assert report.percentiles[1] == pytest.approx(float(np.percentile(image, 50)), rel=0.02)
    assert np.array_equal(read, image) and report.to_dict()["percentile_sample"] == report.percentile_sample
    _, small = mb.read_image(_tiff(image[:512, :512]))
    assert small.percentile_sample == 0 and "sampled" not in str(small)
    assert small.percentiles == tuple(float(v) for v in np.percentile(image[:512, :512], (1, 50, 99)))


def test_nonfinite_pixels_are_counted_exactly_and_left_out_of_the_range():
    image = np.linspace(-1.0, 2.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    image[3, 5], image[7, 9], image[40, 60] = np.nan, np.inf, -np.inf
    _, report = mb.read_image(_tiff(image))
    finite = image[np.isfinite(image)]
    assert report.value_range == (float(finite.min()), float(finite.max()))
    assert [p.message.split(" ")[0] for p in report.problems if p.code == "nonfinite"] == ["3"]


def test_a_tiff_file_and_its_bytes_read_the_same(tmp_path):
    """TIFF files are decoded straight from the open file, bytes through memory: same pixels, same report."""
    stack = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    path = tmp_path / "stack.tif"
    path.write_bytes(_tiff(stack, photometric="minisblack"))
    from_file, report_file = mb.read_image(path, page=1)
    from_bytes, report_bytes = mb.read_image(path.read_bytes(), page=1)
    assert np.array_equal(from_file, stack[1]) and np.array_equal(from_bytes, stack[1])
    assert {**report_file.to_dict(), "name": ""} == {**report_bytes.to_dict(), "name": ""}


def test_complex_pixels_are_refused_not_cast():
    """numpy casts complex to float by dropping the imaginary part (a warning at most): a phase image or an FFT
    saved as a TIFF would reach the model as garbage; an array of them is refused the same way."""
    values = (np.ones((16, 16)) + 1j * np.arange(256).reshape(16, 16)).astype(np.complex64)
    with pytest.raises(mb.ImageError, match=r"holds complex numbers \(complex64.*np\.abs\(array\)"):
        mb.read_image(_tiff(values))
    run = mb.Pipeline("cbam_resunet").start(values).run_until("decode")
    assert run.failed_stage == "decode" and "<array>: the image array holds complex numbers" in str(run.error)


def test_a_12_bit_jpeg_is_named_not_called_damaged():
    """Pillow cannot open 12-bit JPEGs (CT and microscopy cameras write them); the file is not damaged."""
    imagecodecs = pytest.importorskip("imagecodecs")
    data = imagecodecs.jpeg8_encode((np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16), bitspersample=12,
                                    level=95)
    with pytest.raises(mb.ImageError, match=r"a 12-bit JPEG, which Pillow .* cannot open; it is not damaged") as err:
        mb.read_image(data)
    assert "0x" not in str(err.value)
    with pytest.raises(mb.ImageError, match=r"damaged \(UnidentifiedImageError: cannot identify image file <_io\.BytesIO "
                                            r"object>\)"):
        mb.read_image(b"\xff\xd8\xff\xe0" + bytes(200))  # a JPEG start, then nothing a decoder can use


def test_a_thumbnail_before_the_image_is_skipped_and_said():
    """A TIFF whose first page is a reduced-resolution copy (NewSubfileType 1: a thumbnail, a pyramid level) gives
    the full image, not 32 x 32 pixels of it; the report says what was skipped."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        writer.write(_gradient()[::8, ::8], subfiletype=1)
        writer.write(_gradient())
        writer.write(_gradient()[::-1])
    image, report = mb.read_image(buf.getvalue())
    assert np.array_equal(image, _gradient()) and report.pages == 2
    assert [p.code for p in report.problems] == ["reduced_pages_skipped", "multi_page"]
    assert np.array_equal(mb.read_image(buf.getvalue(), page=1)[0], _gradient()[::-1])


def _png(array: np.ndarray, colour_type: int) -> bytes:
    """A PNG written by hand (16-bit: big-endian samples, filter 0 per row), for layouts Pillow cannot write."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array.reshape(height, -1))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_grey_and_alpha_png_stays_grey():
    grey = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)
    data = _png(np.dstack([grey, np.full_like(grey, 65535)]), colour_type=4)
    image, report = mb.read_image(data)
    assert image.dtype == np.uint16 and np.array_equal(image, grey) and report.channels == 1
    assert [p.code for p in report.problems] == ["alpha_dropped"]


def test_damaged_png_headers_and_cut_or_packed_stacks_are_named():
    """A bit depth or colour type no PNG has is named; a shaped stack cut after its second page says
    how many pages are left; a stack of N x 1 planes, which tifffile packs into one page, reads plane by plane."""
    png = bytearray(cv2.imencode(".png", _gradient().astype(np.uint8))[1].tobytes())
    png[24] = 7  # bit depth
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    with pytest.raises(mb.ImageError, match="bit depth 7 with colour type 0, which no PNG has"):
        mb.read_image(bytes(png))
    stack = (np.arange(20 * 32 * 40) % 251).astype(np.uint8).reshape(20, 32, 40)
    data = _tiff(stack, metadata={"axes": "ZYX"})
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        cut = int(tif.pages[2].offset)  # where the third page's directory starts
    with pytest.raises(mb.ImageError, match=r"truncated: it describes 20 pages and only the first 2 can be read; pass page=0\.\.1"):
        mb.read_image(data[:cut], page=19)
    image, report = mb.read_image(data[:cut], page=1)
    assert np.array_equal(image, stack[1]) and report.problems[0].code == "pages_missing"
    columns = (np.arange(5 * 64) % 200).astype(np.uint8).reshape(5, 64, 1)
    image, _ = mb.read_image(_tiff(columns, metadata={"axes": "ZYX"}), page=3)
    assert np.array_equal(image, columns[3])


def test_each_page_is_read_with_its_own_tags_and_a_cut_stack_keeps_its_whole_pages():
    grey = (np.arange(64 * 48) % 200).astype(np.uint8).reshape(64, 48)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as writer:
        writer.write(grey, photometric="miniswhite", extratags=[(274, 3, 1, 6, True)])  # page 0: inverted, turned
        writer.write(grey, photometric="minisblack")  # page 1: as stored
    image, report = mb.read_image(buf.getvalue(), page=1)
    assert np.array_equal(image, grey) and [p.code for p in report.problems] == ["multi_page"]
    image, report = mb.read_image(buf.getvalue(), page=0)
    assert image.shape == grey.shape[::-1] and {"min_is_white", "exif_rotated"} <= {p.code for p in report.problems}
    stack = (np.arange(20 * 64 * 64) % 251).astype(np.uint8).reshape(20, 64, 64)
    data = _tiff(stack)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        cut = int(tif.pages[10].dataoffsets[0]) + 100  # inside page 10's pixels
    image, report = mb.read_image(data[:cut], page=0)
    assert np.array_equal(image, stack[0]) and report.problems[0].code == "pages_missing"
    with pytest.raises(mb.ImageError, match="page 15 requested, but the TIFF is truncated"):
        mb.read_image(data[:cut], page=15)


def _tiff_bytes(array: np.ndarray, **options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(1, 1, 20, 30), (1, 1, 1, 20, 30), (1, 20, 30, 1), (1, 1, 20, 30, 3)])
def test_a_tiff_with_axes_of_length_one_reads_as_the_image_they_hold(shape):
    """A model's output saved as (1, 1, H, W) is an image, not a damaged header."""
    array = np.random.default_rng(0).integers(0, 4000, shape).astype(np.uint16)
    image, report = mb.read_image(_tiff_bytes(array))
    assert image.shape == tuple(n for n in shape if n != 1) and np.array_equal(image, array.reshape(image.shape))
    assert not any(p.code == "channels_first" for p in report.problems)


def test_rgb_with_extra_samples_is_rgb_and_a_stack_of_one_channel_is_not_channels_first():
    rgb = np.random.default_rng(1).integers(0, 255, (20, 30, 5), dtype=np.uint8)
    image, report = mb.read_image(_tiff_bytes(rgb, photometric="rgb", extrasamples=[0, 0]))
    assert np.array_equal(image, rgb[..., :3]) and [p.code for p in report.problems] == ["extra_samples_dropped"]
    stack = np.random.default_rng(2).integers(0, 255, (3, 1, 20, 30), dtype=np.uint8)
    image, report = mb.read_image(_tiff_bytes(stack, imagej=True, metadata={"axes": "ZCYX"}), page=1)
    assert np.array_equal(image, stack[1, 0]) and [p.code for p in report.problems] == ["multi_page"]


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rfind(b"\xff\xda"):-2]
    start = time.perf_counter()
    with pytest.raises(mb.ImageError, match=r"holds 1,00\d scans"):
        mb.read_image(data[:-2] + last_scan * 1000 + b"\xff\xd9")
    assert time.perf_counter() - start < 5
    assert mb.read_image(data)[0].shape == (64, 64)  # a progressive JPEG of its usual scans reads


def test_sub_byte_grey_png_scaling_and_an_animated_webps_partial_frame_are_said():
    import zlib as _zlib

    rows = b"".join(b"\x00" + bytes([0b00011011, 0b00011011]) for _ in range(4))  # 2-bit grey, 8 x 4: 0 1 2 3 ...
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", _zlib.crc32(kind + body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 4, 2, 0, 0, 0, 0))
           + chunk(b"IDAT", _zlib.compress(rows)) + chunk(b"IEND", b""))
    image, report = mb.read_image(png)
    assert sorted(np.unique(image)) == [0, 85, 170, 255] and "samples_scaled" in [p.code for p in report.problems]
    from PIL import Image

    frames = [Image.fromarray(np.full((30, 40, 3), v, np.uint8)) for v in (50, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert "webp_partial_frame" not in [p.code for p in mb.read_image(buffer.getvalue())[1].problems]
    from mlbench.image.integrity import webp_frame_problems

    data = bytearray(buffer.getvalue())
    anmf = data.find(b"ANMF") + 8
    data[anmf + 6:anmf + 9] = (11).to_bytes(3, "little")  # the first frame says 12 px wide on a 40 px canvas
    assert [p.code for p in webp_frame_problems(bytes(data))] == ["webp_partial_frame"]


def test_a_page_that_is_no_whole_number_and_text_starting_bm_get_clear_errors():
    path = mb.load_sample("spheroids_8bit").path
    for page in (1.0, "1", True):
        with pytest.raises(mb.OptionsError, match="page=..."):
            mb.read_image(path, page=page)
    with pytest.raises(mb.ImageError, match="not a recognised image.*looks like text"):
        mb.read_image(b"BMI table for patients, version 2\n" * 4)


def test_a_sparse_tiff_block_and_one_inside_the_header_are_named():
    import tifffile

    data = bytearray(_tiff_bytes(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32), tile=(16, 16)))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        offsets, counts = tif.pages[0].tags["TileOffsets"], tif.pages[0].tags["TileByteCounts"]
        offsets_at, counts_at = offsets.valueoffset, counts.valueoffset
        offset_size, count_size = ({3: 2, 4: 4, 16: 8}[int(tag.dtype)] for tag in (offsets, counts))  # SHORT, LONG, LONG8
    header = bytes(data)
    data[offsets_at + 3 * offset_size:offsets_at + 4 * offset_size] = bytes(offset_size)  # tile 3 at byte 0
    with pytest.raises(mb.ImageError, match="tile 3 at byte 0"):
        mb.read_image(bytes(data))
    data = bytearray(header)
    data[offsets_at + 3 * offset_size:offsets_at + 4 * offset_size] = bytes(offset_size)
    data[counts_at + 3 * count_size:counts_at + 4 * count_size] = bytes(count_size)  # and 0 bytes: GDAL's sparse block
    with pytest.raises(mb.ImageError, match="sparse.*SPARSE_OK"):
        mb.read_image(bytes(data))


def test_an_imagej_stack_in_one_page_reads_every_plane():
    """ImageJ writes stacks over 4 GB as one page whose planes follow one another (images=N): each plane
    reads, none is called truncated."""
    import tifffile

    stack = np.random.default_rng(3).integers(0, 4096, (4, 24, 32)).astype(np.uint16)
    data = bytearray(_tiff_bytes(stack, imagej=True, metadata={"axes": "ZYX"}))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        next_ifd = tif.pages[0].offset + 2 + 12 * len(tif.pages[0].tags)  # where the first page's next-page link is
    data[next_ifd:next_ifd + 4] = bytes(4)  # one page only, as ImageJ writes large stacks
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        assert len(tif.pages) == 1 and tif.series[0].shape == (4, 24, 32)
    for page in range(4):
        image, report = mb.read_image(bytes(data), page=page)
        assert np.array_equal(image, stack[page]) and [p.code for p in report.problems] == ["multi_page"]
