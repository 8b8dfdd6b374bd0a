"""Hostile images, each built in a few lines in a temporary folder (nothing large is in git).

As in :mod:`hostile_checkpoints`: ``FAMILIES`` maps a family to ``(variants, environment)``, a
variant is ``name -> (builder, pattern)`` and the refusal (an ImageError, or a report with
``ok`` False) must match ``pattern``. Bombs are small files that announce huge images: tiles of
zeros compressed once and repeated, rows of zeros deflated one by one.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

_RNG = np.random.default_rng(0)
RGB = (_RNG.random((64, 48, 3)) * 255).astype(np.uint8)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _pil(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)
    return out.getvalue()


def _tiff(array: np.ndarray | None = None, **options) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array if array is not None else RGB, **options)
    return out.getvalue()


# ----- bombs: decoded bytes and pixels, from small files ---------------------------------------------

def _tiled_zeros(side: int, dtype, samples: int, **options) -> bytes:
    """A ``side`` x ``side`` TIFF of zeros, one 512 x 512 tile compressed once and repeated."""
    planar = options.get("planarconfig") == "separate"
    shape = (samples, side, side) if planar else (side, side, samples)
    tile = zlib.compress(np.zeros((512, 512) if planar else (512, 512, samples), dtype).tobytes())
    out = io.BytesIO()
    tiles = (side // 512) ** 2 * (samples if planar else 1)
    tifffile.imwrite(out, (tile for _ in range(tiles)), shape=shape, dtype=dtype, tile=(512, 512),
                     compression="zlib", **options)
    return out.getvalue()


def _png_zeros(width: int, height: int, depth: int, colour: int, samples: int) -> bytes:
    """A PNG of zero rows: one row deflated once and repeated (nothing of its decoded size is held)."""
    packer, row = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 + -(-width * samples * depth // 8))
    first = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    unit = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    check = 1
    for _ in range(height):
        check = zlib.adler32(row, check)
    body = b"\x78\xda" + first + unit * (height - 1) + packer.flush() + struct.pack(">I", check)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _patch_jpeg_size(data: bytes, height: int, width: int | None = None) -> bytes:
    out, pos = bytearray(data), 2
    while out[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", out[pos + 2:pos + 4])[0]
    out[pos + 5:pos + 9] = struct.pack(">HH", height, width if width is not None else struct.unpack(">H", out[pos + 7:pos + 9])[0])
    return bytes(out)


def _bomb_family() -> dict:
    decoded, pixels = r"max_decoded_bytes", r"exceeds the limit of 64,000,000"
    return {
        "tiff_float64_rgb": (lambda f: _write(f, "a.tif", _tiled_zeros(7168, np.float64, 3, photometric="rgb")), decoded),
        "tiff_float32_rgb": (lambda f: _write(f, "a.tif", _tiled_zeros(6144, np.float32, 3, photometric="rgb")), decoded),
        "tiff_planar_float64": (lambda f: _write(f, "a.tif", _tiled_zeros(4096, np.float64, 3, photometric="rgb",
                                                                          planarconfig="separate")), decoded),
        "tiff_uint16_64_samples": (lambda f: _write(f, "a.tif", _tiled_zeros(2048, np.uint16, 64,
                                                                             photometric="minisblack",
                                                                             planarconfig="contig")), decoded),
        "png_rgba16": (lambda f: _write(f, "a.png", _png_zeros(6000, 6000, 16, 6, 4)), decoded),
        "png_grey16_large": (lambda f: _write(f, "a.png", _png_zeros(8100, 8100, 16, 0, 1)), pixels),
        "png_palette_pixels": (lambda f: _write(f, "a.png", _png_zeros(20000, 20000, 1, 0, 1)), pixels),
        "jpeg_65000_square": (lambda f: _write(f, "a.jpg", _patch_jpeg_size(_pil(RGB, "JPEG"), 65000, 65000)), pixels),
        "gif_screen_65535": (lambda f: _write(f, "a.gif", _pil(RGB[..., 0], "GIF")[:6] + struct.pack("<HH", 65535, 65535)
                                              + _pil(RGB[..., 0], "GIF")[10:]), pixels),
        "bmp_header_30000": (lambda f: _write(f, "a.bmp", _bmp_size(_pil(RGB, "BMP"), 30000, 30000)), pixels),
    }


def _bmp_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


# ----- headers that announce rows the data does not hold ----------------------------------------------

def _png_size(data: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    out = bytearray(data)
    out[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        found = tif.pages[0].tags[tag]
        offset, code = found.valueoffset, "<H" if found.dtype == 3 else "<I"
    out = bytearray(data)
    out[offset:offset + struct.calcsize(code)] = struct.pack(code, value)
    return bytes(out)


def _header_family() -> dict:
    png, jpeg = _pil(RGB, "PNG"), _pil(RGB, "JPEG", quality=90)
    rows, filled = r"invent or drop rows", r"jpeg_rows_filled|libjpeg"
    grey_jpeg = _pil(RGB[..., 0], "JPEG", quality=90)
    return {
        "png_height_x1000": (lambda f: _write(f, "a.png", _png_size(png, 48, 64_000)), rows),
        "png_height_plus_1": (lambda f: _write(f, "a.png", _png_size(png, 48, 65)), rows),
        "png_height_minus_1": (lambda f: _write(f, "a.png", _png_size(png, 48, 63)), rows),
        "png_width_plus_1": (lambda f: _write(f, "a.png", _png_size(png, 49, 64)), rows),
        "png_height_crc_not_fixed": (lambda f: _write(f, "a.png", _png_size(png, 48, 128, False)), r"CRC"),
        "png_interlaced_height_plus_8": (lambda f: _write(f, "a.png", _png_size(_pil(RGB, "PNG", interlace=1), 48, 72)),
                                         rows),
        "png_zero_width": (lambda f: _write(f, "a.png", _png_size(png, 0, 64)), r"empty image"),
        "jpeg_height_plus_1": (lambda f: _write(f, "a.jpg", _patch_jpeg_size(jpeg, 65)), filled),
        "jpeg_height_x4": (lambda f: _write(f, "a.jpg", _patch_jpeg_size(jpeg, 256)), filled),
        "jpeg_grey_height_plus_8": (lambda f: _write(f, "a.jpg", _patch_jpeg_size(grey_jpeg, 72)), filled),
        "jpeg_zero_height": (lambda f: _write(f, "a.jpg", _patch_jpeg_size(jpeg, 0)), r"empty image"),
        "tiff_zlib_height_x2": (lambda f: _write(f, "a.tif", _tiff_tag(_tiff(compression="zlib"), 257, 128)),
                                r"strips or tiles"),
        "tiff_tiled_height_plus_1": (lambda f: _write(f, "a.tif", _tiff_tag(_tiff(tile=(16, 16), compression="zlib"),
                                                                            257, 65)), r"strips or tiles"),
        "tiff_raw_height_plus_1": (lambda f: _write(f, "a.tif", _tiff_tag(_tiff(), 257, 65)), r"strips|cannot be decoded"),
        "tiff_zero_width": (lambda f: _write(f, "a.tif", _tiff_tag(_tiff(), 256, 0)), r"empty image"),
        "tiff_written_zero_wide": (lambda f: _write(f, "a.tif", _tiff(np.zeros((16, 0), np.uint8))), r"empty image"),
        "bmp_height_plus_1": (lambda f: _write(f, "a.bmp", _bmp_size(_pil(RGB, "BMP"), 48, 65)), r"truncated"),
        "gif_screen_taller": (lambda f: _write(f, "a.gif", _pil(RGB[..., 0], "GIF")[:6] + struct.pack("<HH", 48, 200)
                                               + _pil(RGB[..., 0], "GIF")[10:]), r"background"),
    }


# ----- TIFF fields no decoder expects ----------------------------------------------------------------

def _fields_family() -> dict:
    grey, rgb = _tiff(RGB[..., 0]), _tiff()
    damaged = r"TIFF|BitsPerSample|header|damaged|decod"
    variants = {"bits_255": (rgb, 258, 255), "bits_0": (rgb, 258, 0), "grey_bits_3": (grey, 258, 3),
                "grey_bits_255": (grey, 258, 255), "samples_0": (rgb, 277, 0), "samples_200": (rgb, 277, 200),
                "compression_9999": (grey, 259, 9999), "strip_bytes_0": (grey, 279, 0),
                "strip_offset_past_end": (grey, 273, 10**9), "rows_per_strip_0": (grey, 278, 0),
                "length_4g": (grey, 257, 2**32 - 1), "width_65535": (grey, 256, 65535)}
    return {name: (lambda f, d=data, t=tag, v=value: _write(f, "a.tif", _tiff_tag(d, t, v)), damaged)
            for name, (data, tag, value) in variants.items()}


FAMILIES = {"image_bomb": (_bomb_family, {}), "image_header": (_header_family, {}),
            "tiff_fields": (_fields_family, {})}
"""family -> (variants, environment with the budgets it runs under)."""
