"""Image files as bytes: where they come from, what format their first bytes say, how large
their header says they are, all before anything is decoded.

The one place that reads an image format's signature and header size: :func:`read_image`,
:func:`check_image` and the service's upload check all ask here.
"""

from __future__ import annotations

import io as _io
import os
import struct
from pathlib import Path
from typing import Union

from mlbench.errors import ImageError

__all__ = ["ImageSource", "sniff_format", "load_bytes", "header_size", "check_pixels", "bytes_io", "EXTENSIONS"]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A path to an image file, or the file's bytes (as uploaded to the service)."""
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
]
EXTENSIONS = {"png": {".png"}, "jpeg": {".jpg", ".jpeg", ".jpe"}, "tiff": {".tif", ".tiff"},
               "bmp": {".bmp"}, "gif": {".gif"}, "webp": {".webp"}}


def sniff_format(head: bytes) -> str | None:
    """The image format from its first bytes, or None when they match no known format."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def load_bytes(source: ImageSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    path = Path(source)
    if not path.exists():
        raise ImageError(
            f"{path}: no such file (absolute path tried: {path.resolve()}, working directory: {Path.cwd()}); "
            "check the path or pass an absolute one"
        )
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, expected an image file; pass the path of one image")
    return path.read_bytes(), str(path)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """``(height, width)`` from an image's header, without decoding a pixel; None when unreadable.

    PNG (IHDR), JPEG (the first SOF marker), BMP and GIF are parsed from their bytes; TIFF from
    tifffile's header of the first page; WebP through Pillow's lazy open (which reads the header only).
    The one header reader of the package: :func:`mlbench.read_image` checks the pixel budget with it
    before decoding, and the reference service before accepting an upload.
    """
    try:
        return _HEADER_READERS.get(fmt, _pil_size)(data)
    except Exception:  # a damaged or truncated header in any of its many ways
        return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        if data[pos + 1] in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return height, width
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    return abs(height), width  # a negative height is a top-down bitmap


def _gif_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 10:
        return None
    width, height = struct.unpack("<HH", data[6:10])
    return height, width


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    import tifffile

    with tifffile.TiffFile(bytes_io(data)) as tif:
        page = tif.pages[0]
        return int(page.imagelength), int(page.imagewidth)


def _pil_size(data: bytes) -> tuple[int, int] | None:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(bytes_io(data)) as image:
            return int(image.height), int(image.width)


_HEADER_READERS = {"png": _png_size, "jpeg": _jpeg_size, "bmp": _bmp_size, "gif": _gif_size, "tiff": _tiff_size}


def check_pixels(name: str, height: int, width: int, max_pixels: int) -> None:
    """Raise before decoding when the header announces more pixels than allowed."""
    if height * width > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {height * width:,} pixels exceeds the limit of {max_pixels:,} "
            "(checked from the header, nothing decoded); downscale or tile the image, or raise max_pixels "
            "if you trust the file"
        )


def bytes_io(data: bytes) -> _io.BytesIO:
    """A seekable in-memory file over ``data``."""
    return _io.BytesIO(data)
