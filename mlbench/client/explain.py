"""Turn a segmentation service's HTTP answer into an explanation a person can act on.

Works on the reference service's JSON bodies (``error``, ``limit``, ``retry_after_s`` ...)
and on the historic service's bare ones (``{"detail": "..."}``, 500 ``Segmentation failed:
<text>``, plain ``Content Too Large``), whose texts :mod:`mlbench.client.messages` recognises.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from mlbench.client.messages import explain_message, message_code

__all__ = ["explain_error", "explain_success", "error_code", "detail_text", "retry_after_of"]

_FIELD_HINTS = {
    "file": "send the image as the multipart file field named 'file', e.g. files={'file': (name, data, type)}",
    "files": "send each image as a multipart file field named 'files'",
    "threshold": "the API accepts 0.1 <= threshold <= 0.9 (pixels with probability strictly above it are foreground)",
    "model": "use one of the ids listed by GET /api/v1/models (the real service: hrnet, resunet_small, "
             "resunet_advanced)",
    "detect_holes": "send true or false",
    "contour": "send {'contour': [[x, y], ...], 'holes': [[[x, y], ...], ...]} as JSON",
}
_FILE_CONTENT_HINT = "the file arrived but its content is refused: check it (mb.check_image(path)) and export it again"
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_CODE = re.compile(r"[a-z][a-z0-9_]*")


def retry_after_of(headers: Mapping[str, str], body: Any) -> float | None:
    """Seconds to wait before retrying, from ``Retry-After`` or the body's ``retry_after_s``."""
    value = headers.get("retry-after") if headers else None
    if value is not None and value.strip().isdigit():
        return float(value)
    if isinstance(body, dict) and body.get("retry_after_s") is not None:
        return float(body["retry_after_s"])
    return None


def detail_text(body: Any) -> str:
    """The service's message in a body: ``detail`` text, a detail dict's message, or a batch item's ``error``."""
    if not isinstance(body, dict):
        return str(body)
    detail = body.get("detail")
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("error") or detail)
    if detail is not None:
        return str(detail)
    text = body.get("message") or body.get("error") or ""
    extra = body.get("error_detail")
    return f"{text}: {extra}" if isinstance(extra, str) and extra else str(text)


def error_code(status: int, body: Any, sent: Mapping[str, Any] | None = None) -> str | None:
    """A stable code for an error answer: the body's own ``code``/``error`` code, else one read from its text.

    ``validation_error`` for a 422 without a code; None when nothing says what failed.
    """
    info = body if isinstance(body, dict) else {}
    for key in ("code", "error"):
        own = info.get(key)
        if isinstance(own, str) and _CODE.fullmatch(own):
            return own
    detail = info.get("detail")
    if isinstance(detail, dict) and detail.get("error"):  # the historic 504/500 bodies
        return message_code(str(detail["error"]), sent)
    if status == 422:
        return "validation_error"
    return message_code(detail_text(body), sent)


def _sent(sent: Mapping[str, Any], field: str, kind: str | None) -> str:
    if field in sent:
        return f"you sent {field}={sent[field]!r}"
    if field == "file" and kind != "missing" and sent.get("filename"):
        size = sent.get("file_bytes")
        return f"you sent the file {sent['filename']!r}" + (f" ({size:,} bytes)" if isinstance(size, int) else "")
    return f"the request had no {field!r} field" if kind == "missing" else f"no {field!r} value is known as sent"


def _range(item: Mapping[str, Any]) -> str:
    bounds = [f"{_BOUNDS[k]} {v}" for k, v in (item.get("ctx") or {}).items() if k in _BOUNDS]
    return f"; allowed: {' and '.join(bounds)}" if bounds else ""


def _explain_422(body: Any, sent: Mapping[str, Any]) -> str:
    info = body if isinstance(body, dict) else {}
    items = info.get("detail") if isinstance(info.get("detail"), list) else info.get("errors")
    if not isinstance(items, list):
        return f"422: the request was refused as invalid: {detail_text(body)!r}"
    lines = [f"422: {len(items)} field(s) of the request are invalid:"]
    for item in items:
        field = str(item.get("loc", ["?"])[-1])
        kind = item.get("type")
        hint = _FILE_CONTENT_HINT if field == "file" and kind != "missing" else _FIELD_HINTS.get(field, "correct it")
        lines.append(f"- field {field!r}: {item.get('msg')} ({_sent(sent, field, kind)}; the service saw "
                     f"{item.get('input')!r}{_range(item)}). Fix: {hint}")
    return "\n".join(lines)


def _explain_413(body: Any, sent: Mapping[str, Any], code: str | None) -> str:
    info = body if isinstance(body, dict) else {}
    if code == "too_many_pixels":
        return (f"413: the image is {info['width']}x{info['height']} = {info['pixels']:,} pixels and the service "
                f"accepts at most {info['limit']:,} (checked from the file header before decoding). "
                "Fix: downscale or tile the image before sending it")
    if code == "too_many_decoded_bytes":
        return (f"413: the image would decode to {info['decoded_bytes']:,} bytes ({info['width']}x{info['height']} "
                f"pixels x {info['channels']} channel(s) x {info['sample_bytes']} byte(s) per sample) and the service "
                f"accepts at most {info['limit']:,} (checked from the file header before decoding). Fix: send 8- or "
                "16-bit data with fewer channels, or downscale or tile the image")
    if code == "too_many_files":
        return f"413: {info['sent']} files in one batch, the limit is {info['limit']}. Fix: split the batch"
    size = info.get("sent") or sent.get("body_bytes")
    limit = info.get("limit")
    limit_text = f"the limit of {limit:,} bytes" if limit else "the service's body size limit (it did not say which)"
    return (f"413: the request body ({size:,} bytes) is larger than {limit_text}. Fix: send a smaller or compressed "
            "image (PNG instead of an uncompressed TIFF), or tile it" if size else
            f"413: the request body is larger than {limit_text}. Fix: send a smaller image")


def _explain_busy(status: int, body: Any, retry: float | None, code: str | None) -> str:
    info = body if isinstance(body, dict) else {}
    wait = f"retry after {retry:g} s" if retry is not None else "retry later with backoff"
    if code == "breaker_open":
        breaker = info.get("breaker", {})
        return (f"{status}: model {info.get('model')!r} is failing; its circuit breaker opened after "
                f"{breaker.get('threshold')} consecutive failures and refuses calls during the cool-down: {wait} "
                "(one trial call is then let through). Fix the model (see /api/v1/status) or use another model")
    if code in ("queue_full", "queue_wait"):
        why = (f"the queue is full ({info.get('queue_depth')} of {info.get('queue_size')} waiting)" if code == "queue_full"
               else "no worker became free within the service's maximum wait")
        return f"{status}: the service is overloaded: {why}. Nothing was computed; {wait}, ideally with backoff"
    if code == "draining":
        return f"{status}: the instance is shutting down; {wait} (a load balancer sends you to another instance)"
    return f"{status}: the service is unavailable ({detail_text(body)!r}); {wait}"


def _explain_504(body: Any, sent: Mapping[str, Any]) -> str:
    info = body if isinstance(body, dict) else {}
    if "timeout_s" not in info:
        detail = info.get("detail") if isinstance(info.get("detail"), dict) else {}
        limit = f" after {detail['timeout']} s" if detail.get("timeout") is not None else ""
        return (f"504: inference timed out{limit} ({detail_text(body)!r}). The historic service keeps the forward "
                "running and holding the model lock after this, so later requests stall too. Fix: send a smaller "
                "image or use a faster model (hrnet)")
    return (f"504: model {info['model']!r} did not finish this {info['image_size']} image within {info['timeout_s']:g} s "
            f"(it runs at {info['input_size']} px input). The run was cancelled. Fix: send a smaller image, use a "
            "faster model (on the real service's CPU, hrnet needs about 3.1 s per 1024 px image, resunet_small 6.9 s, "
            "resunet_advanced 18.1 s), or raise the service's timeout_s")


def explain_error(status: int, body: Any, headers: Mapping[str, str] | None = None,
                  sent: Mapping[str, Any] | None = None) -> str:
    """An explanation of an error answer: what was wrong, with the values, and the fix.

    Parameters
    ----------
    status : the HTTP status (a failed batch item: its ``status``, else 500).
    body : the decoded body (dict, list or text), or a failed batch item.
    headers : the answer's headers (``Retry-After``).
    sent : what the request sent: ``filename``, ``file_bytes``, ``file_head`` (first bytes),
        ``filenames`` (batch), form fields, ``method`` and ``path``, ``body_bytes``.
    """
    sent, headers = dict(sent or {}), headers or {}
    code = error_code(status, body, sent)
    if status == 413:
        return _explain_413(body, sent, code)
    if status == 415:
        return f"415: {detail_text(body)}. Fix: check the file (mb.check_image(path) says what it is)"
    if status == 422:
        return _explain_422(body, sent)
    if status in (429, 503):
        return _explain_busy(status, body, retry_after_of(headers, body), code)
    if status == 504:
        return _explain_504(body, sent)
    text = detail_text(body)
    known = explain_message(text, sent)
    if known:
        return f"{status}: {known}"
    if status >= 500:
        return (f"{status}: the service failed: {text!r}. The historic service answers 500 for an unknown model, "
                "missing weights, an undecodable image, shape errors and out-of-memory alike: the message says which. "
                "`mb.triage(message)` names the failure class")
    return f"{status}: {text!r}"


def _same(field: str, asked: Any, used: Any) -> bool:
    if field == "threshold":
        return abs(float(asked) - float(used)) < 1e-9
    from mlbench.models import resolve_name

    try:
        return resolve_name(str(asked)) == resolve_name(str(used))
    except Exception:  # a name the registry does not know: compare as text
        return str(asked) == str(used)


def explain_success(body: Mapping[str, Any], sent: Mapping[str, Any]) -> list[str]:
    """Notes on a 200 answer: the service's warnings, values it did not use as sent, no polygons.

    ``model_used``/``threshold_used`` that differ from what was asked mean the service
    ignored the value (the historic one reads them only from multipart form fields).
    """
    notes = list(body.get("warnings", []))
    for field, used_key in (("threshold", "threshold_used"), ("model", "model_used")):
        if field in sent and used_key in body and not _same(field, sent[field], body[used_key]):
            notes.append(f"asked {field}={sent[field]!r} but the service used {body[used_key]!r}: it ignored the value "
                         "and used its default (the historic service reads model and threshold only from multipart "
                         "form fields and silently ignores them in the query string; send form fields)")
    if "warning" in body:
        notes.append(str(body["warning"]))
    elif body.get("polygons") == [] and not any("polygon" in note.lower() for note in notes):
        notes.append(f"no polygons in this answer (at threshold {body.get('threshold_used', '?')}; the batch route "
                     "gives no warning for it): the image may hold no detectable cells or the threshold may need "
                     "adjustment")
    return notes
