"""The historic service's error texts, recognised and explained with what was sent.

That service answers ``{"detail": "<text>"}`` (400, 405, 501; 500 ``Segmentation failed:
<exception text>``) and puts the bare exception text in a failed batch item's ``error``.
:func:`message_code` names the failure a text describes (``extension_not_allowed``,
``unknown_model``, ``image_error`` ...); :func:`explain_message` says what it means for
the file or field that was sent (its name, size and first bytes, when the client has them).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

__all__ = ["message_code", "explain_message", "file_extension"]


def file_extension(filename: str) -> str | None:
    """The extension as the historic service computes it (after the last dot, lower case), or None."""
    parts = filename.split(".")
    return "." + parts[-1].lower() if len(parts) >= 2 else None


def _file(sent: Mapping[str, Any], name: str | None = None) -> str:
    """``'name' (N bytes)`` of the sent file, as much as is known."""
    name = name or sent.get("filename")
    size = sent.get("file_bytes")
    text = repr(name) if name else "the file"
    return text + (f" ({size:,} bytes)" if isinstance(size, int) else "")


def _allowed(text: str) -> list[str]:
    """``['.png', ...]`` from ``PNG, JPG`` or ``.png, .jpg``."""
    return ["." + item.strip().strip(".").lower() for item in text.rstrip(". ").split(",") if item.strip()]


def _tiff_note(ext: str | None, allowed: list[str], stem: str) -> str:
    if ".tiff" in allowed and ".tif" not in allowed:
        if ext == ".tif":
            return (f" '.tiff' passes where '.tif' does not: the same TIFF sent as {stem + '.tiff'!r} is accepted "
                    "(but this service's convert('RGB') clips 16-bit data at 255, so an 8-bit PNG is safer).")
        return " (Note: '.tiff' passes where '.tif' does not.)"
    if ".tiff" not in allowed and ".tif" not in allowed:
        return " Neither '.tif' nor '.tiff' passes: save TIFF images as 8-bit PNG."
    return ""


def _extension(match: re.Match, sent: Mapping[str, Any]) -> str:
    name = match["name"] or sent.get("filename")
    allowed = _allowed(match["allowed"])
    ext = file_extension(name) if name else None
    what = (f"its extension {ext!r}" if ext else "it has no extension") if name else "the file name's extension"
    stem = name.rsplit(".", 1)[0] if name and ext else (name or "image")
    return (f"the service judges an upload by its file name only and refused {_file(sent, name)}: {what} is not in "
            f"its allow-list ({' '.join(allowed)}); the content was never looked at."
            f"{_tiff_note(ext, allowed, stem)} Fix: send the image under an allowed extension "
            "that matches its content, e.g. as PNG")


def _batch_limit(match: re.Match, sent: Mapping[str, Any]) -> str:
    limit, count = int(match["limit"]), len(sent.get("filenames", ()))
    sent_text = f"{count} were sent" if count else "more were sent"
    parts = f" into {math.ceil(count / limit)} requests" if count else ""
    return (f"model {match['model']!r} takes at most {limit} image(s) per batch request and {sent_text}; "
            f"nothing was segmented. Fix: split the batch{parts} of at most {limit} file(s), or pick a model with a "
            "larger max_safe_batch_size (GET /api/v1/models lists each model's limit)")


def _unknown_model(match: re.Match, sent: Mapping[str, Any]) -> str:
    from mlbench.models import ALIASES

    model = match["model"]
    choices = re.findall(r"'([^']+)'", match["choices"] or "")
    if not choices:
        return (f"the service has no model {model!r} and did not list its models here. Fix: send one of the ids "
                "GET /api/v1/models lists (the historic service: 'hrnet', 'resunet_small', 'resunet_advanced')")
    served = ", ".join(f"{c!r}" + (f" (mlbench's {ALIASES[c]!r})" if c in ALIASES else "") for c in choices)
    renamed = {target: alias for alias, target in ALIASES.items() if alias in choices}
    fix = (f"send model={renamed[model]!r}, the service's id for mlbench's {model!r}" if model in renamed
           else f"send one of these ids as the model form field, e.g. model={choices[0]!r}")
    return f"the service has no model {model!r}; it serves {served}. Fix: {fix}"


def _head_text(head: bytes) -> str:
    """What the first bytes of a file say it is."""
    from mlbench.image.formats import sniff_format

    stripped = head.lstrip()
    first = stripped.split(b"\n", 1)[0][:40].decode("utf-8", "replace").strip()
    if stripped[:1] == b"<":
        kind = "an HTML page" if b"html" in stripped[:200].lower() else "an XML or HTML document"
        return (f"the file starts with `{first}`, so it is {kind}, typically a web server's error page saved under "
                "an image name by a failed download")
    if stripped[:1] in (b"{", b"["):
        return f"the file starts with `{first}`, so it is a JSON document (an API's error answer?), not an image"
    fmt = sniff_format(head[:16])
    if fmt:
        return f"its first bytes are a {fmt.upper()} signature, but Pillow could not open it (a damaged header?)"
    return f"the file starts with the bytes {head[:8].hex(' ')}, which match no image format Pillow knows"


def _not_an_image(match: re.Match, sent: Mapping[str, Any]) -> str:
    file, head = _file(sent), sent.get("file_head")
    if sent.get("file_bytes") == 0:
        return (f"{sent.get('filename') or 'the file'!r} is empty (0 bytes): nothing was uploaded for it, and its "
                "name passed the extension check. "
                "Fix: check that the file was written completely before sending it")
    if isinstance(head, (bytes, bytearray)):
        why = _head_text(bytes(head))
    else:
        why = ("it may be an HTML error page saved under an image name, an empty file (0 bytes) or another format; "
               "look at the file's first bytes (a PNG starts with \\x89PNG)")
    return (f"the body of {file} is not an image Pillow can identify (the service checks the name only): {why}. "
            "Fix: fetch the image again and check it opens locally (mb.check_image(path))")


def _truncated(match: re.Match, sent: Mapping[str, Any]) -> str:
    return (f"{_file(sent)} is cut short (truncated): its header was read but the pixel data ends early. It was "
            "cut off in a download or copy, or sent while still being written. Fix: copy or export the file again "
            "and compare its size with the original")


def _async(match: re.Match, sent: Mapping[str, Any]) -> str:
    return ("this service has no asynchronous task API: GET /api/v1/segment/{task_id} always answers 501. Fix: use "
            "the synchronous route POST /api/v1/segment (multipart field 'file', form fields model, threshold, "
            "detect_holes), whose answer carries the polygons: ServiceClient.segment(image)")


def _no_route(match: re.Match, sent: Mapping[str, Any]) -> str:
    route = f"{sent.get('method', '')} {sent.get('path', 'this path')}".strip()
    return (f"this service has no route {route}: its OPTIONS catch-all route turns every unknown path into 405 "
            "instead of 404. The historic service has no /readyz, /livez or /metrics; use GET /health or "
            "/api/v1/health, GET /api/v1/models, GET /api/v1/status")


_RULES: tuple[tuple[str, re.Pattern, Callable[[re.Match, Mapping[str, Any]], str] | None], ...] = (
    ("extension_not_allowed", re.compile(r"Invalid (?:image )?file(?: type)?(?:: (?P<name>.*?))?\. "
                                         r"(?:Supported formats|Allowed types): (?P<allowed>.+)"), _extension),
    ("too_many_files", re.compile(r"Batch size for (?P<model>\S+) model cannot exceed (?P<limit>\d+) images"),
     _batch_limit),
    ("unknown_model", re.compile(r"Model (?P<model>\S+) not (?:available|found)(?:\. Choose from: "
                                 r"\[(?P<choices>[^\]]*)\])?"), _unknown_model),
    ("image_error", re.compile(r"image file is truncated"), _truncated),
    ("image_error", re.compile(r"cannot identify image file"), _not_an_image),
    ("inference_timeout", re.compile(r"[Tt]ime(?:d )?out"), None),  # explained by the 504 explainer
    ("not_implemented", re.compile(r"Async processing not implemented"), _async),
    ("method_not_allowed", re.compile(r"^Method Not Allowed$"), _no_route),
)


def _find(text: str) -> tuple[str, re.Match, Callable] | None:
    for code, pattern, explain in _RULES:
        match = pattern.search(text)
        if match:
            return code, match, explain
    return None


def message_code(text: str, sent: Mapping[str, Any] | None = None) -> str | None:
    """The failure a service text describes (``empty_file`` for an unidentifiable 0-byte upload), or None."""
    found = _find(str(text))
    if found is None:
        return "inference_failed" if str(text).startswith("Inference failed") else None
    empty = found[2] is _not_an_image and (sent or {}).get("file_bytes") == 0
    return "empty_file" if empty else found[0]


def explain_message(text: str, sent: Mapping[str, Any] | None = None) -> str | None:
    """What a service text means for what was sent, with the fix; None for a text it does not know."""
    found = _find(str(text))
    return found[2](found[1], dict(sent or {})) if found and found[2] else None
