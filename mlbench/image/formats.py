"""Image files as bytes: where they come from, what format their first bytes say, how large
their header says they are (rows, columns, channels, bytes per sample), all before anything is
decoded, and the budgets checked on that header.

The one place that reads an image format's signature and header size: :func:`read_image`,
:func:`check_image` and the service's upload check all ask here.
"""

from __future__ import annotations

import io as _io
import os
import struct
from dataclasses import dataclass
from typing import Union

from mlbench.budgets import Budgets, budget_error, budgets, read_regular
from mlbench.errors import ImageError

__all__ = ["ImageSource", "IMAGE_SOURCES", "ImageHeader", "sniff_format", "load_bytes", "read_header", "header_size", "pil_header",
           "check_header", "bytes_io", "tiff_header", "EXTENSIONS", "STREAMED"]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]
"""A path to an image file, or the file's bytes (as uploaded to the service)."""
IMAGE_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview)
"""The types of :data:`ImageSource`, for ``isinstance``."""
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
_BMP_INFO_SIZES = {struct.pack("<I", n) for n in (12, 16, 40, 52, 56, 64, 108, 124)}
"""The sizes a BMP's info header has (bytes 14..18): what tells a BMP from text that begins with "BM"."""
STREAMED = frozenset({"tiff", "bmp"})
"""Formats that :func:`mlbench.read_image` decodes straight from the open file: uncompressed, so
large, and nothing checks their bytes as a whole (a PNG's chunks are, a JPEG's markers are).
Copying a 4096x4096 16-bit TIFF into memory before decoding it took longer than decoding it."""
EXTENSIONS = {"png": {".png"}, "jpeg": {".jpg", ".jpeg", ".jpe"}, "tiff": {".tif", ".tiff"},
               "bmp": {".bmp"}, "gif": {".gif"}, "webp": {".webp"}}


def sniff_format(head: bytes) -> str | None:
    """The image format from its first bytes, or None when they match no known format."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic) and (fmt != "bmp" or len(head) < 18 or head[14:18] in _BMP_INFO_SIZES):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def load_bytes(source: ImageSource, max_bytes: int | None = None) -> tuple[bytes, str]:
    """The bytes of an image and its name (``"<bytes>"`` for bytes given directly).

    Raises
    ------
    ImageError
        For a missing path, or one that is not a regular file (a FIFO, a device, a socket, a
        directory, a symlink to one of them; refused before opening, saying which), or more bytes
        than ``max_bytes`` (default: the ``max_file_bytes`` budget).
    """
    limit = budgets().max_file_bytes if max_bytes is None else max_bytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limit:
            raise budget_error(ImageError, "max_file_bytes", limit, "<bytes>: the image bytes", len(source), " bytes")
        return bytes(source), "<bytes>"
    return read_regular(source, ImageError, limit), str(source)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header announces: rows, columns, channels and bytes per sample once decoded."""

    height: int
    width: int
    channels: int = 1
    sample_bytes: int = 1

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded array: pixels x channels x bytes per sample."""
        return self.height * self.width * self.channels * self.sample_bytes


def read_header(data: bytes, fmt: str) -> ImageHeader | None:
    """The :class:`ImageHeader` of an image, without decoding a pixel; None when unreadable.

    PNG (IHDR), JPEG (the first SOF marker), BMP and GIF are parsed from their bytes; TIFF from
    tifffile's header of the first page; WebP through Pillow's lazy open (which reads the header only).
    The one header reader of the package: :func:`mlbench.read_image` checks the budgets with it
    before decoding, and the reference service before accepting an upload.
    """
    try:
        return _HEADER_READERS.get(fmt, _pil_header)(data)
    except Exception:  # a damaged or truncated header in any of its many ways
        return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """``(height, width)`` from an image's header (:func:`read_header`), None when unreadable."""
    header = read_header(data, fmt)
    return None if header is None else (header.height, header.width)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_header(data: bytes) -> ImageHeader | None:
    if len(data) >= 26 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader(height, width, _PNG_CHANNELS.get(data[25], 4), 2 if data[24] == 16 else 1)
    return None


def _jpeg_header(data: bytes) -> ImageHeader | None:
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        if data[pos + 1] in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return ImageHeader(height, width, data[pos + 9], 2 if data[pos + 4] > 8 else 1)
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _bmp_header(data: bytes) -> ImageHeader | None:
    if len(data) < 30:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    bits = struct.unpack("<H", data[28:30])[0]
    return ImageHeader(abs(height), width, 1 if bits <= 8 else (4 if bits == 32 else 3))  # negative: top-down


def _gif_header(data: bytes) -> ImageHeader | None:
    if len(data) < 10:
        return None
    width, height = struct.unpack("<HH", data[6:10])
    return ImageHeader(height, width)


def _tiff_header(data: bytes) -> ImageHeader | None:
    import tifffile

    with tifffile.TiffFile(bytes_io(data)) as tif:
        return tiff_header(tif)


def tiff_header(tif) -> ImageHeader:
    """The :class:`ImageHeader` of an open ``tifffile.TiffFile``'s first page."""
    page = tif.pages[0]
    itemsize = page.dtype.itemsize if page.dtype is not None else max(1, -(-int(page.bitspersample) // 8))
    return ImageHeader(int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel), itemsize)


def _pil_header(data: bytes) -> ImageHeader | None:
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(bytes_io(data)) as image:
            return pil_header(image)


def pil_header(image) -> ImageHeader:
    """The :class:`ImageHeader` of an opened (not yet loaded) Pillow image, from its mode."""
    from PIL import ImageMode

    mode = ImageMode.getmode(image.mode)
    return ImageHeader(int(image.height), int(image.width), len(mode.bands), max(1, int(mode.typestr[-1])))


_HEADER_READERS = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header, "gif": _gif_header,
                   "tiff": _tiff_header}


def check_header(name: str, header: ImageHeader, limits: Budgets) -> None:
    """Raise before decoding when the header announces no pixels, or more pixels or decoded bytes
    than the budgets allow (``limits.max_pixels``, ``limits.max_decoded_bytes``)."""
    height, width = header.height, header.width
    if height <= 0 or width <= 0:
        raise ImageError(f"{name}: the header announces {width}x{height} pixels, an empty image; expected at least "
                         "1x1. The header is damaged (or was changed): export the image again")
    if height * width > limits.max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {height * width:,} pixels exceeds the limit of {limits.max_pixels:,} "
            "(checked from the header, nothing decoded); downscale or tile the image, or raise max_pixels "
            "if you trust the file"
        )
    if header.decoded_bytes > limits.max_decoded_bytes:
        raise budget_error(ImageError, "max_decoded_bytes", limits.max_decoded_bytes,
                           f"{name}: the decoded size ({width}x{height} pixels x {header.channels} channel(s) x "
                           f"{header.sample_bytes} byte(s) per sample, from the header, nothing decoded)",
                           header.decoded_bytes, " bytes")


def bytes_io(data: bytes) -> _io.BytesIO:
    """A seekable in-memory file over ``data``."""
    return _io.BytesIO(data)
