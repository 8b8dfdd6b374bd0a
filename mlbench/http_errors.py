"""Turn a segmentation service's HTTP answer into an explanation a person can act on.

Works on the reference service's JSON bodies (``error``, ``limit``, ``retry_after_s`` ...)
and on the real service's bare ones (``{"detail": "..."}``, plain ``Content Too Large``).
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["explain_error", "explain_success", "retry_after_of"]

_FIELD_HINTS = {
    "file": "send the image as the multipart file field named 'file', e.g. files={'file': (name, data, type)}",
    "threshold": "the API accepts 0.1 <= threshold <= 0.9 (pixels with probability strictly above it are foreground)",
    "model": "use one of the ids listed by GET /api/v1/models (the real service: hrnet, resunet_small, "
             "resunet_advanced)",
    "detect_holes": "send true or false",
}


def retry_after_of(headers: Mapping[str, str], body: Any) -> float | None:
    """Seconds to wait before retrying, from ``Retry-After`` or the body's ``retry_after_s``."""
    value = headers.get("retry-after") if headers else None
    if value is not None and value.strip().isdigit():
        return float(value)
    if isinstance(body, dict) and body.get("retry_after_s") is not None:
        return float(body["retry_after_s"])
    return None


def _sent(sent: Mapping[str, Any], field: str) -> str:
    return f"you sent {field}={sent[field]!r}" if field in sent else f"no {field!r} form field was sent"


def _explain_422(body: Any, sent: Mapping[str, Any]) -> str:
    items = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return f"422: the request was refused as invalid: {body!r}"
    lines = [f"422: {len(items)} field(s) of the request are invalid:"]
    for item in items:
        field = str(item.get("loc", ["?"])[-1])
        lines.append(f"- field {field!r}: {item.get('msg')} ({_sent(sent, field)}; the service saw "
                     f"{item.get('input')!r}). Fix: {_FIELD_HINTS.get(field, 'correct this field')}")
    return "\n".join(lines)


def _explain_413(body: Any, sent: Mapping[str, Any]) -> str:
    info = body if isinstance(body, dict) else {}
    code = info.get("error")
    if code == "too_many_pixels":
        return (f"413: the image is {info['width']}x{info['height']} = {info['pixels']:,} pixels and the service "
                f"accepts at most {info['limit']:,} (checked from the file header before decoding). "
                "Fix: downscale or tile the image before sending it")
    if code == "too_many_files":
        return f"413: {info['sent']} files in one batch, the limit is {info['limit']}. Fix: split the batch"
    size = info.get("sent") or sent.get("body_bytes")
    limit = info.get("limit")
    limit_text = f"the limit of {limit:,} bytes" if limit else "the service's body size limit (it did not say which)"
    return (f"413: the request body ({size:,} bytes) is larger than {limit_text}. Fix: send a smaller or compressed "
            "image (PNG instead of an uncompressed TIFF), or tile it" if size else
            f"413: the request body is larger than {limit_text}. Fix: send a smaller image")


def _explain_busy(status: int, body: Any, retry: float | None) -> str:
    info = body if isinstance(body, dict) else {}
    code, wait = info.get("error"), f"retry after {retry:g} s" if retry is not None else "retry later with backoff"
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
    return f"{status}: the service is unavailable ({info.get('detail', body)!r}); {wait}"


def _explain_504(body: Any, sent: Mapping[str, Any]) -> str:
    info = body if isinstance(body, dict) else {}
    if "timeout_s" not in info:
        return (f"504: inference timed out ({info.get('detail', body)!r}). The historic service keeps the forward "
                "running and holding the model lock after this, so later requests stall too")
    return (f"504: model {info['model']!r} did not finish this {info['image_size']} image within {info['timeout_s']:g} s "
            f"(it runs at {info['input_size']} px input). The run was cancelled. Fix: send a smaller image, use a "
            "faster model (on the real service's CPU, hrnet needs about 3.1 s per 1024 px image, resunet_small 6.9 s, "
            "resunet_advanced 18.1 s), or raise the service's timeout_s")


def explain_error(status: int, body: Any, headers: Mapping[str, str] | None = None,
                  sent: Mapping[str, Any] | None = None) -> str:
    """An explanation of an error answer: what was wrong, with the values, and the fix."""
    sent, headers = dict(sent or {}), headers or {}
    retry = retry_after_of(headers, body)
    info = body if isinstance(body, dict) else {}
    detail = info.get("detail", body)
    if status == 400 and (info.get("error") == "extension_not_allowed" or "file type" in str(detail).lower()):
        return (f"400: the service judged the file by its name ({sent.get('filename', 'upload')!r}) and its extension "
                f"allow-list refused it: {detail}. The historic service forgot .tif/.tiff although it decodes TIFF. "
                "Fix: send an 8-bit PNG (that service's convert('RGB') clips 16-bit data at 255), or use a service that "
                "sniffs the type from the content")
    if status == 413:
        return _explain_413(body, sent)
    if status == 415:
        return f"415: the upload is not an image by its content: {info.get('message', detail)}. Fix: check the file"
    if status == 422:
        return _explain_422(body, sent)
    if status in (429, 503):
        return _explain_busy(status, body, retry)
    if status == 504:
        return _explain_504(body, sent)
    if status >= 500:
        return (f"{status}: the service failed: {info.get('message', detail)!r}. The historic service answers 500 for "
                "an unknown model, missing weights, an undecodable image, shape errors and out-of-memory alike: the "
                "message says which. `mb.triage(message)` names the failure class")
    return f"{status}: {detail!r}"


def _same(field: str, asked: Any, used: Any) -> bool:
    if field == "threshold":
        return abs(float(asked) - float(used)) < 1e-9
    from .models import resolve_name

    try:
        return resolve_name(str(asked)) == resolve_name(str(used))
    except Exception:  # a name the registry does not know: compare as text
        return str(asked) == str(used)


def explain_success(body: Mapping[str, Any], sent: Mapping[str, Any]) -> list[str]:
    """Warnings for a 200 answer that did not do what was sent (ignored parameters)."""
    notes = list(body.get("warnings", []))
    for field, used_key in (("threshold", "threshold_used"), ("model", "model_used")):
        if field in sent and used_key in body and not _same(field, sent[field], body[used_key]):
            notes.append(f"asked {field}={sent[field]!r} but the service used {body[used_key]!r}: it ignored the value "
                         "(query-string parameters are ignored by the multipart endpoint; send form fields)")
    if "warning" in body:
        notes.append(str(body["warning"]))
    return notes
