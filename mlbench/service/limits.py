"""What the service refuses before any decoding, and the refusal every error becomes.

Type is sniffed from the content (:func:`mlbench.image.formats.sniff_format`), never from the
name, unless the ``as_served`` allow-list is switched on; the pixel count and the decoded bytes
(pixels x channels x bytes per sample) are read from the header
(:func:`mlbench.image.formats.read_header`, the reader's own) before anything is decoded, so a
small file that announces a huge image never reaches a worker.
"""

from __future__ import annotations

import math
from typing import Any

from mlbench.errors import MlbenchError
from mlbench.image.formats import ImageHeader, read_header, sniff_format
from mlbench.image.other_formats import HEAD_BYTES, identify

__all__ = ["Refusal", "field_error", "check_extension", "upload_header", "image_header", "check_upload", "check_size",
           "body_limit", "body_too_large"]


class Refusal(MlbenchError, RuntimeError):
    """An HTTP error answer: ``status``, a stable ``code``, the message and extra JSON fields.

    Its body is the service's ``{"detail": message}``; under ``fixed`` the corrections
    come as extra keys: ``error`` (the code), ``message``, ``request_id``, ``retry_after_s``,
    ``errors`` (FastAPI's ``[{type, loc, msg, input}]`` items for a field error) and ``extra``.
    ``item_error`` is the text a failed ``batch-segment`` item carries as its ``error``
    (the service gave the bare exception text there, without the "Segmentation failed: ");
    ``served_detail`` replaces the message as ``detail`` as served (the service answered
    some failures with an object there).
    """

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None,
                 errors: list[dict] | None = None, item_error: str | None = None, served_detail: Any = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after, self.errors, self.extra = retry_after, errors, extra
        self.item_error = item_error if item_error is not None else message
        self.served_detail = served_detail

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else {}

    def body(self, request_id: str | None = None, preset: str = "fixed") -> dict[str, Any]:
        """The JSON answer: ``{"detail"}`` as served, plus the corrections under ``fixed``."""
        if preset == "as_served":
            return {"detail": self.served_detail if self.served_detail is not None else self.message}
        body: dict[str, Any] = {"detail": self.message, "error": self.code, "message": self.message, **self.extra}
        if self.errors is not None:
            body["errors"] = self.errors
        if self.retry_after is not None:
            body["retry_after_s"] = max(1, math.ceil(self.retry_after))
        if request_id:
            body["request_id"] = request_id
        return body


def field_error(code: str, field: str, message: str, value: Any, status: int = 422, **extra: Any) -> Refusal:
    """A 422 (or other) refusal about one form field; ``errors`` holds it in FastAPI's item schema."""
    item = {"type": code, "loc": ["body", field], "msg": message, "input": value}
    return Refusal(status, code, message, errors=[item], **extra)


def check_extension(filename: str | None, allowed: tuple[str, ...], batch: bool = False) -> None:
    """The service's allow-list: the text after the last dot, lower-cased, must be in ``allowed``.

    Raises
    ------
    Refusal
        400 with the service's text (``batch`` names the file, as its batch route did).
    """
    suffix = "." + (filename or "").rsplit(".", 1)[-1].lower() if "." in (filename or "") else ""
    if suffix not in allowed:
        names = ", ".join(ext.lstrip(".").upper() for ext in allowed)
        where = f": {filename}" if batch else ""
        raise Refusal(400, "extension_not_allowed", f"Invalid image file{where}. Supported formats: {names}",
                      extension=suffix, allowed=list(allowed), filename=filename)


def upload_header(data: bytes) -> tuple[str, ImageHeader]:
    """``(format, header)`` of an upload, read from its header only (nothing decoded), with
    :func:`mlbench.image.formats.read_header`, the reader :func:`mlbench.read_image` checks its budgets with.

    Raises
    ------
    Refusal
        415 when the content is no known image format, 422 when the header is unreadable.
    """
    fmt = sniff_format(data[:16])
    if fmt is None:
        known = identify(data[:HEAD_BYTES])
        hint = (f"it is {known}" if known else "it looks like text" if data[:1] in b"<{ \t\r\n"
                else f"it starts with {data[:8]!r}")
        raise field_error("unsupported_type", "file", f"the upload is not an image (PNG, JPEG, TIFF, BMP, GIF, "
                          f"WebP) by its content; {hint}", f"{len(data)} bytes", status=415)
    header = read_header(data, fmt)
    if header is None:
        raise field_error("image_error", "file", f"the {fmt.upper()} header cannot be read; the file is damaged or "
                          "truncated, export it again", f"{len(data)} bytes")
    return fmt, header


def image_header(data: bytes) -> tuple[str, int, int]:
    """``(format, height, width)`` read from the header only (nothing decoded); raises as :func:`upload_header`."""
    fmt, header = upload_header(data)
    return fmt, header.height, header.width


def check_upload(data: bytes, filename: str | None, allowed_extensions: tuple[str, ...] | None,
                 max_pixels: int | None, max_decoded_bytes: int | None = None) -> tuple[str, int, int] | None:
    """Apply the allow-list (400, as served) or sniff the type, then check the pixel count and the
    decoded bytes (pixels x channels x bytes per sample) from the header, before decoding (413).

    Returns the header's ``(format, height, width)``, or None under the allow-list without
    limits (the historic service read nothing before decoding). Under the allow-list with a
    limit, an upload whose header cannot be read is left to the decoder, as served.
    """
    if allowed_extensions is not None:
        check_extension(filename, allowed_extensions)
        if max_pixels is None and max_decoded_bytes is None:
            return None
        fmt = sniff_format(data[:16])
        header = read_header(data, fmt) if fmt is not None else None
        if header is None:
            return None
    else:
        if not data:
            raise field_error("empty_file", "file", "the uploaded file is empty (0 bytes); send the file again",
                              "0 bytes")
        fmt, header = upload_header(data)
    check_size(fmt, header, max_pixels, max_decoded_bytes)
    return fmt, header.height, header.width


def check_size(fmt: str, header: ImageHeader, max_pixels: int | None, max_decoded_bytes: int | None) -> None:
    """413 when the header announces more pixels than ``max_pixels`` or more decoded bytes
    (:attr:`~mlbench.image.formats.ImageHeader.decoded_bytes`) than ``max_decoded_bytes``."""
    height, width = header.height, header.width
    if max_pixels is not None and height * width > max_pixels:
        raise Refusal(413, "too_many_pixels",
                      f"the image is {width}x{height} = {height * width:,} pixels, above the limit of "
                      f"{max_pixels:,} (read from the {fmt.upper()} header, nothing decoded); downscale or tile it",
                      width=width, height=height, pixels=height * width, limit=max_pixels)
    if max_decoded_bytes is not None and header.decoded_bytes > max_decoded_bytes:
        raise Refusal(413, "too_many_decoded_bytes",
                      f"the image would decode to {header.decoded_bytes:,} bytes ({width}x{height} pixels x "
                      f"{header.channels} channel(s) x {header.sample_bytes} byte(s) per sample, read from the "
                      f"{fmt.upper()} header, nothing decoded), above the limit of {max_decoded_bytes:,} bytes; "
                      "send 8- or 16-bit data, fewer channels, or downscale or tile the image",
                      width=width, height=height, channels=header.channels, sample_bytes=header.sample_bytes,
                      decoded_bytes=header.decoded_bytes, limit=max_decoded_bytes)


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
