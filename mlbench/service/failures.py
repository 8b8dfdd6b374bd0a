"""The refusal each failure of a segment request becomes, as served and fixed.

As served, the service answered 500 ``{"detail": "Segmentation failed: <exception text>"}``
for an unknown model, an undecodable, truncated or empty upload and any stage but the
forward (PIL's texts: ``cannot identify image file <_io.BytesIO object at 0x...>``,
``image file is truncated``); a failed forward was wrapped as an object
``{error: "Inference failed", message, model, processing_time}``. Under ``fixed`` client
mistakes answer 4xx with a message that says what to do, and only the service's own
failures answer 500.
"""

from __future__ import annotations

from mlbench.image.formats import bytes_io
from mlbench.service.limits import Refusal, field_error
from mlbench.service.queue import InferenceCancelled

__all__ = ["served_failure", "served_open", "unknown_model", "stage_refusal", "timeout_refusal", "out_of_memory"]


def served_failure(exc: BaseException | str) -> Refusal:
    """The service's 500: ``Segmentation failed: <text>`` (a batch item carries the bare text)."""
    text = str(exc)
    return Refusal(500, "segmentation_failed", f"Segmentation failed: {text}", item_error=text)


def served_open(data: bytes) -> None:
    """The service's first look at an upload, before it looked the model up: ``PIL.Image.open``.

    Raises
    ------
    Refusal
        500 with PIL's text when Pillow cannot identify the bytes (an empty file too).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        Image.open(bytes_io(data)).close()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise served_failure(exc) from exc


def unknown_model(name: str, served: list[str], preset: str) -> Refusal:
    """The refusal of a model the service does not serve: 500 as served, 422 under ``fixed``."""
    if preset == "as_served":
        return served_failure(f"Model {name} not available. Choose from: {sorted(served)}")
    return field_error("unknown_model", "model", f"unknown model {name!r}; this service serves {sorted(served)}: "
                       "send one of them (or its registry name) in the 'model' form field", name, models=sorted(served))


def stage_refusal(exc: BaseException, stage: str, model_id: str, preset: str, seconds: float) -> Refusal:
    """The refusal of a run that failed in ``stage`` after ``seconds``."""
    if preset == "as_served":
        if stage != "forward":
            return served_failure(exc)
        message = f"Inference failed for {model_id}: {exc}"
        detail = {"error": "Inference failed", "message": message, "model": model_id, "processing_time": seconds}
        return Refusal(500, "inference_failed", message, served_detail=detail, item_error="Inference failed")
    if isinstance(exc, InferenceCancelled):
        return Refusal(504, "inference_timeout", str(exc), model=model_id)
    if out_of_memory(exc):
        return Refusal(500, "out_of_memory", f"Segmentation failed: model {model_id!r} ran out of memory in stage "
                       f"{stage!r} ({type(exc).__name__}: {str(exc)[:200]}): the request needs more than the worker "
                       "may allocate (worker_memory_bytes, `mlbench serve --worker-memory-gib`, with the process "
                       "executor) or the machine has; send a smaller image, or raise the limit", model=model_id,
                       stage=stage)
    if stage == "decode":
        return field_error("image_error", "file", f"the image cannot be decoded: {exc}", "upload")
    return Refusal(500, "inference_failed", f"Segmentation failed: stage {stage!r} failed for model {model_id!r}: "
                   f"{type(exc).__name__}: {exc}", model=model_id, stage=stage)


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, or torch's allocator refusing (a RuntimeError)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "not enough memory" in str(exc)))


def timeout_refusal(settings, model_id: str, input_size: int, header: tuple[str, int, int] | None) -> Refusal:
    """The 504 of a run that did not finish within ``settings.timeout_s`` (it was cancelled)."""
    size = f"{header[2]}x{header[1]}" if header else "unknown size"
    timeout = settings.timeout_s
    if settings.executor == "process":
        stop = f"or its worker process is killed {settings.kill_grace_s:g} s after the cancel"
    else:
        stop = "(its worker thread cannot be killed)"
    return Refusal(504, "inference_timeout",
                   f"model {model_id!r} did not finish a {size} image (model input {input_size} px) within the "
                   f"{timeout:g} s inference timeout; the run was cancelled: it stops at the next layer {stop} (see "
                   "/metrics). Send a smaller image, pick a faster model, or raise timeout_s",
                   model=model_id, timeout_s=timeout, image_size=size, input_size=input_size)
