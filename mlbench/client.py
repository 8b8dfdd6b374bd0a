"""``mb.ServiceClient``: talk to the reference service or the real one, and explain errors.

Every error answer becomes a :class:`ServiceError` whose message explains it: which
field a 422 is about and what was sent, what a 413 limit was, when to retry after
429/503, what a 504 means for this model and image size. Pass a URL for a live
service, or a FastAPI app to run it in this process (served on a free loopback port).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import MlbenchError, OptionsError
from .http_errors import explain_error, explain_success, retry_after_of

__all__ = ["ServiceClient", "ServiceError", "SegmentResult", "BatchResult"]


class ServiceError(MlbenchError, RuntimeError):
    """An error answer from the service; ``str(err)`` is the explanation.

    Attributes
    ----------
    status : HTTP status code.
    code : the service's error code (``queue_full``, ``inference_timeout`` ...) or None.
    explanation : what went wrong, with the values, and the fix.
    retry_after : seconds to wait before retrying (429/503), else None.
    body : the decoded body (dict, list or text); ``sent`` : what the request sent.
    """

    def __init__(self, status: int, explanation: str, body: Any, sent: Mapping[str, Any],
                 retry_after: float | None = None, request_id: str | None = None) -> None:
        super().__init__(explanation)
        self.status, self.explanation, self.body, self.sent = status, explanation, body, dict(sent)
        self.retry_after, self.request_id = retry_after, request_id
        self.code = body.get("error") if isinstance(body, dict) else None


@dataclass(frozen=True)
class SegmentResult:
    """A parsed ``/api/v1/segment`` answer; ``warnings`` lists what did not go as sent."""

    polygons: list
    model_used: str
    threshold_used: float
    width: int
    height: int
    processing_time: float
    warnings: tuple[str, ...] = ()
    response: dict = field(default_factory=dict, repr=False)

    def to_mask(self) -> np.ndarray:
        """(H, W) bool mask drawn from the polygons (external filled, internal cut out)."""
        import cv2

        mask = np.zeros((self.height, self.width), np.uint8)
        for kind, value in (("external", 1), ("internal", 0)):
            for poly in (p for p in self.polygons if p["type"] == kind):
                points = np.array([[pt["x"], pt["y"]] for pt in poly["points"]], np.int32)
                cv2.fillPoly(mask, [points], value)
        return mask.astype(bool)

    def to_dict(self) -> dict:
        return dict(self.response)

    def __repr__(self) -> str:
        n_ext = sum(p["type"] == "external" for p in self.polygons)
        notes = "; ".join(self.warnings) or "none"
        return (f"SegmentResult({self.model_used}, {self.width}x{self.height}, threshold {self.threshold_used:g}, "
                f"{len(self.polygons)} polygon(s) ({n_ext} external), warnings: {notes})")


def _segment_result(body: Mapping[str, Any], sent: Mapping[str, Any]) -> SegmentResult:
    """A :class:`SegmentResult` from one segment answer (also one item of a batch answer)."""
    size = body.get("image_size", {})
    return SegmentResult(body.get("polygons", []), body.get("model_used", "?"), float(body.get("threshold_used", 0)),
                         int(size.get("width", 0)), int(size.get("height", 0)),
                         float(body.get("processing_time", 0.0)), tuple(explain_success(body, sent)), dict(body))


@dataclass(frozen=True)
class BatchResult:
    """A parsed ``/api/v1/batch-segment`` answer: one entry per file, in the order sent.

    Attributes
    ----------
    filenames : the name each file was sent under.
    items : a :class:`SegmentResult` for each file segmented, a :class:`ServiceError`
        (with its explanation) for each file the service refused or failed on.
    """

    filenames: tuple[str, ...]
    items: tuple[Any, ...]
    response: dict = field(default_factory=dict, repr=False)

    @property
    def results(self) -> dict[str, SegmentResult]:
        """The segmented files by name."""
        return {n: item for n, item in zip(self.filenames, self.items) if isinstance(item, SegmentResult)}

    @property
    def errors(self) -> dict[str, ServiceError]:
        """The failed files by name, each with its explanation."""
        return {n: item for n, item in zip(self.filenames, self.items) if isinstance(item, ServiceError)}

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return dict(self.response)

    def __repr__(self) -> str:
        lines = [f"BatchResult: {len(self.results)} of {len(self.items)} file(s) segmented"]
        for name, item in zip(self.filenames, self.items):
            text = repr(item) if isinstance(item, SegmentResult) else item.explanation.splitlines()[0]
            lines.append(f"- {name}: {text}")
        return "\n".join(lines)


def encode_image(image: Any, filename: str | None = None) -> tuple[str, bytes]:
    """``(filename, bytes)`` to upload: a path is read, bytes kept, an array encoded as PNG/TIFF."""
    from .io import sniff_format

    if isinstance(image, (str, Path)):
        path = Path(image)
        return filename or path.name, path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        fmt = sniff_format(data[:16]) or "bin"
        return filename or f"image.{ {'jpeg': 'jpg', 'tiff': 'tif'}.get(fmt, fmt)}", data
    if isinstance(image, np.ndarray):
        buffer = io.BytesIO()
        if image.dtype == np.uint8 or (image.dtype == np.uint16 and image.ndim == 2):
            from PIL import Image

            Image.fromarray(image).save(buffer, format="PNG")
            return filename or "image.png", buffer.getvalue()
        import tifffile

        rgb = image.ndim == 3 and image.shape[2] in (3, 4)
        tifffile.imwrite(buffer, image, photometric="rgb" if rgb else "minisblack")
        return filename or "image.tif", buffer.getvalue()
    raise OptionsError(f"image must be a path, bytes or a numpy array, got {type(image).__name__}")


class ServiceClient:
    """A client of the segmentation service.

    Parameters
    ----------
    url_or_app : str or FastAPI app
        ``"http://127.0.0.1:8000"`` for a live service, or an app from
        :func:`mlbench.service.create_app`, which is then served in this process on a
        free loopback port until :meth:`close`.
    timeout : float
        Seconds to wait for any answer.
    """

    def __init__(self, url_or_app: Any, timeout: float = 120.0) -> None:
        import httpx

        self._server = None
        if isinstance(url_or_app, str):
            url = url_or_app.rstrip("/")
        else:
            from .service.runner import serve_in_thread

            self._server = serve_in_thread(url_or_app)
            url = self._server.url
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=timeout)

    # ---- plumbing ------------------------------------------------------------------------------
    def _json(self, response) -> Any:
        try:
            return response.json()
        except ValueError:
            return response.text

    def check(self, response, sent: Mapping[str, Any] | None = None) -> Any:
        """The decoded body of a 2xx answer; raises :class:`ServiceError` with an explanation otherwise."""
        body = self._json(response)
        if response.is_success:
            return body
        sent = dict(sent or {})
        length = response.request.headers.get("content-length", "")
        sent.setdefault("body_bytes", int(length) if length.isdigit() else None)
        raise ServiceError(response.status_code, explain_error(response.status_code, body, response.headers, sent),
                           body, sent, retry_after_of(response.headers, body), response.headers.get("x-request-id"))

    def explain(self, response, sent: Mapping[str, Any] | None = None) -> str:
        """An explanation of any answer (errors, and 200s that ignored what was sent)."""
        body = self._json(response)
        if response.is_success:
            notes = explain_success(body, sent or {}) if isinstance(body, dict) else []
            return f"{response.status_code}: OK" + "".join(f"\n- {n}" for n in notes)
        return explain_error(response.status_code, body, response.headers, sent)

    # ---- endpoints -----------------------------------------------------------------------------
    def health(self) -> dict:
        return self.check(self.http.get("/health"))

    def models(self) -> dict:
        return self.check(self.http.get("/api/v1/models"))

    def status(self) -> dict:
        return self.check(self.http.get("/api/v1/status"))

    def ready(self) -> tuple[bool, dict]:
        """``(ready, checks)`` from ``/readyz`` (never raises for 503: not ready is an answer)."""
        response = self.http.get("/readyz")
        body = self._json(response)
        return response.status_code == 200, body.get("checks", body) if isinstance(body, dict) else body

    def metrics(self) -> dict:
        return self.check(self.http.get("/metrics", params={"format": "json"}))

    def segment(self, image: Any, model: str | None = None, threshold: float = 0.5, detect_holes: bool = True,
                filename: str | None = None) -> SegmentResult:
        """Segment one image (path, bytes or array); raises :class:`ServiceError` on an error answer.

        ``model=None`` lets the service pick its default (``hrnet`` on the real service).
        """
        name, data = encode_image(image, filename)
        sent = {"filename": name, "threshold": threshold, "detect_holes": detect_holes}
        form = {"threshold": str(threshold), "detect_holes": str(bool(detect_holes)).lower()}
        if model is not None:
            sent["model"] = form["model"] = model
        body = self.check(self.http.post("/api/v1/segment", files={"file": (name, data)}, data=form), sent)
        return _segment_result(body, sent)

    def batch_segment(self, images: Sequence[Any], model: str | None = None, threshold: float = 0.5,
                      detect_holes: bool = True) -> BatchResult:
        """Segment several images (paths, bytes or arrays) in one ``/api/v1/batch-segment`` request.

        A refusal of the whole request (too many files, an invalid field, overload) raises
        :class:`ServiceError`; a file that fails on its own is a ServiceError *item* of the
        returned :class:`BatchResult`, explained like :meth:`segment` would explain it.

        Raises
        ------
        OptionsError
            When ``images`` is empty or a single image instead of a sequence of them.
        ServiceError
            When the service refuses the whole batch.
        """
        if isinstance(images, (str, Path, bytes, bytearray, np.ndarray)):
            raise OptionsError(f"images must be a list of images, got a single {type(images).__name__}; wrap it in a "
                               "list, or use segment() for one image")
        if not len(images):
            raise OptionsError("images is an empty list; pass at least one image (a path, bytes or an array)")
        uploads = [self._batch_upload(i, image) for i, image in enumerate(images)]
        sent = {"filenames": [name for name, _ in uploads], "threshold": threshold, "detect_holes": detect_holes}
        form = {"threshold": str(threshold), "detect_holes": str(bool(detect_holes)).lower()}
        if model is not None:
            sent["model"] = form["model"] = model
        response = self.http.post("/api/v1/batch-segment", files=[("files", upload) for upload in uploads], data=form)
        body = self.check(response, sent)
        items = body.get("results", []) if isinstance(body, dict) else body
        request_id = response.headers.get("x-request-id")
        parsed = tuple(self._batch_item(item, name, sent, request_id) for (name, _), item in zip(uploads, items))
        return BatchResult(tuple(name for name, _ in uploads), parsed, body if isinstance(body, dict) else {"results": body})

    @staticmethod
    def _batch_upload(index: int, image: Any) -> tuple[str, bytes]:
        """``(filename, bytes)``: a path keeps its name, bytes and arrays are named image_<i>."""
        name, data = encode_image(image)
        return (name if isinstance(image, (str, Path)) else f"image_{index}{Path(name).suffix}"), data

    @staticmethod
    def _batch_item(item: Mapping[str, Any], name: str, sent: Mapping[str, Any], request_id: str | None) -> Any:
        """One file's entry of a batch answer: a SegmentResult, or a ServiceError that explains it."""
        one = {**{k: v for k, v in sent.items() if k != "filenames"}, "filename": name}
        status = int(item.get("status", 200 if item.get("success", True) else 500))
        if status < 400:
            return _segment_result(item, one)
        return ServiceError(status, explain_error(status, item, {}, one), dict(item), one,
                            retry_after_of({}, item), request_id)

    def close(self) -> None:
        """Close the connection pool (and stop the in-process server, if any)."""
        self.http.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServiceClient({'in-process app' if self._server else self.url})"
