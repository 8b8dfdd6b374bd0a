"""What the service refuses before any decoding, and the refusal every error becomes.

Type is sniffed from the content (:func:`mlbench.io.sniff_format`), never from the
name, unless the ``as_served`` allow-list is switched on; the pixel count is read from
the header (Pillow's lazy ``open`` or tifffile's first page) before anything is decoded.
"""

from __future__ import annotations

import math
import warnings
from pathlib import PurePath
from typing import Any

from ..errors import MlbenchError
from ..io import bytes_io, sniff_format

__all__ = ["Refusal", "image_header", "check_upload", "body_limit", "body_too_large"]


class Refusal(MlbenchError, RuntimeError):
    """An HTTP error answer: ``status``, a stable ``code``, the message and extra JSON fields.

    ``detail_list`` makes the body FastAPI's validation schema (``detail`` = list of
    ``{type, loc, msg, input}``) so every 422 has the same shape.
    """

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None,
                 detail_list: list[dict] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.detail_list, self.extra = retry_after, detail_list, extra

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else {}

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"detail": self.detail_list if self.detail_list is not None else self.message,
                                "error": self.code, "message": self.message, **self.extra}
        if self.retry_after is not None:
            body["retry_after_s"] = max(1, math.ceil(self.retry_after))
        if request_id:
            body["request_id"] = request_id
        return body


def field_error(code: str, field: str, message: str, value: Any, status: int = 422, **extra: Any) -> Refusal:
    """A 422 (or other) refusal about one form field, in FastAPI's detail schema."""
    item = {"type": code, "loc": ["body", field], "msg": message, "input": value}
    return Refusal(status, code, message, detail_list=[item], **extra)


def image_header(data: bytes) -> tuple[str, int, int]:
    """``(format, height, width)`` read from the header only (nothing decoded).

    Raises
    ------
    Refusal
        415 when the content is no known image format, 422 when the header is unreadable.
    """
    fmt = sniff_format(data[:16])
    if fmt is None:
        hint = "it looks like text" if data[:1] in b"<{ \t\r\n" else f"it starts with {data[:8]!r}"
        raise field_error("unsupported_type", "file", f"the upload is not an image (PNG, JPEG, TIFF, BMP, GIF, "
                          f"WebP) by its content; {hint}", f"{len(data)} bytes", status=415)
    try:
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(bytes_io(data)) as tif:
                page = tif.pages[0]
                return fmt, int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(bytes_io(data)) as image:
                return fmt, int(image.height), int(image.width)
    except Exception as exc:  # any reader error means an unreadable header
        raise field_error("image_error", "file", f"the {fmt.upper()} header cannot be read ({type(exc).__name__}: "
                          f"{exc}); the file is damaged or truncated, export it again", f"{len(data)} bytes") from exc


def check_upload(data: bytes, filename: str | None, allowed_extensions: tuple[str, ...] | None,
                 max_pixels: int | None) -> tuple[str, int, int] | None:
    """Apply the allow-list (400, as served) or sniff the type and check the pixel count (413).

    Returns the header's ``(format, height, width)``, or None under the allow-list
    (the historic service read nothing before decoding).
    """
    if allowed_extensions is not None:
        suffix = PurePath(filename or "").suffix.lower()
        if suffix not in allowed_extensions:
            raise Refusal(400, "extension_not_allowed",
                          f"Invalid file type. Allowed types: {', '.join(allowed_extensions)}",
                          extension=suffix, allowed=list(allowed_extensions))
        return None
    if not data:
        raise field_error("empty_file", "file", "the uploaded file is empty (0 bytes); send the file again", "0 bytes")
    fmt, height, width = image_header(data)
    if max_pixels is not None and height * width > max_pixels:
        raise Refusal(413, "too_many_pixels",
                      f"the image is {width}x{height} = {height * width:,} pixels, above the limit of "
                      f"{max_pixels:,} (read from the {fmt.upper()} header, nothing decoded); downscale or tile it",
                      width=width, height=height, pixels=height * width, limit=max_pixels)
    return fmt, height, width


def body_limit(settings, path: str) -> int | None:
    """The body limit of ``path`` in bytes (the batch route allows ``max_batch`` images)."""
    limit = settings.max_body_bytes
    return limit * settings.max_batch if limit and path.endswith("batch-segment") else limit


def body_too_large(settings, path: str, content_length: str | None) -> Refusal:
    """Starlette's plain-text 413 made explicit: the size sent and the limit."""
    limit = body_limit(settings, path)
    sent = int(content_length) if content_length and content_length.isdigit() else None
    return Refusal(413, "body_too_large", f"the request body ({sent if sent is not None else 'unknown'} bytes) is "
                   f"larger than the limit of {limit} bytes; send a smaller or compressed image, or tile it",
                   limit=limit, sent=sent)
