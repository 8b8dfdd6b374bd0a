"""``mb.ServiceClient``: talk to the reference service or the real one, and explain errors.

Every error answer becomes a :class:`ServiceError` whose message explains it: which
field a 422 is about, what was sent and the allowed range, which extension the allow-list
refused, what the first bytes of a file that is no image say, what a 413 limit was, when
to retry after 429/503, what a 504 means for this model and image size. A request that gets no
answer (nothing listening, no answer in time, the connection lost mid-request, an unknown host) is
a ServiceError with status 0 (:mod:`mlbench.client.no_answer`). Batch answers are
matched to the files by ``batch_index`` and ``filename`` (:mod:`mlbench.client.results`).
Pass a URL for a live service, or a FastAPI app to run it in this process (served on a
free loopback port).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlbench.client.results import BatchResult, SegmentResult, ServiceError, batch_result, segment_result
from mlbench.errors import OptionsError
from mlbench.client.explain import explain_error, explain_success, retry_after_of
from mlbench.client.no_answer import no_answer

__all__ = ["ServiceClient", "ServiceError", "SegmentResult", "BatchResult"]


def encode_image(image: Any, filename: str | None = None) -> tuple[str, bytes]:
    """``(filename, bytes)`` to upload: a path is read, bytes kept, an array encoded as PNG/TIFF.

    Invented names use ``.tiff``, never ``.tif``: the historic service's allow-list has
    only the former.
    """
    from mlbench.image.formats import sniff_format

    if isinstance(image, (str, Path)):
        path = Path(image)
        return filename or path.name, path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        fmt = sniff_format(data[:16]) or "bin"
        return filename or f"image.{ {'jpeg': 'jpg'}.get(fmt, fmt)}", data
    if isinstance(image, np.ndarray):
        buffer = io.BytesIO()
        if image.dtype == np.uint8 or (image.dtype == np.uint16 and image.ndim == 2):
            from PIL import Image

            Image.fromarray(image).save(buffer, format="PNG")
            return filename or "image.png", buffer.getvalue()
        import tifffile

        rgb = image.ndim == 3 and image.shape[2] in (3, 4)
        tifffile.imwrite(buffer, image, photometric="rgb" if rgb else "minisblack")
        return filename or "image.tiff", buffer.getvalue()
    raise OptionsError(f"image must be a path, bytes or a numpy array, got {type(image).__name__}")


class ServiceClient:
    """A client of the segmentation service (mlbench's reference service or the historic one).

    Parameters
    ----------
    url_or_app : str or FastAPI app
        ``"http://127.0.0.1:8000"`` for a live service, or an app from
        :func:`mlbench.service.create_app`, which is then served in this process on a
        free loopback port until :meth:`close`.
    timeout : float
        Seconds to wait for any answer.
    transport : httpx transport, optional
        Used instead of the network for a URL, e.g. ``httpx.MockTransport`` to replay
        recorded answers.
    """

    def __init__(self, url_or_app: Any, timeout: float = 120.0, transport: Any = None) -> None:
        import httpx

        self._server = None
        if isinstance(url_or_app, str):
            url = url_or_app.rstrip("/")
        else:
            from mlbench.service.runner import serve_in_thread

            self._server = serve_in_thread(url_or_app)
            url = self._server.url
        self.url, self.timeout = url, timeout
        self.http = httpx.Client(base_url=url, timeout=timeout, transport=transport)

    # ---- plumbing ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, sent: Mapping[str, Any] | None = None, **kwargs: Any):
        """The answer to one request; a request that gets none (refused, timed out, the
        connection lost) is a :class:`ServiceError` with ``status`` 0 and the reason."""
        import httpx

        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            code, explanation = no_answer(exc, self.url, self.timeout)
            raise ServiceError(0, explanation, None, {**(sent or {}), "method": method, "path": path},
                               code=code) from exc

    def _json(self, response) -> Any:
        try:
            return response.json()
        except ValueError:
            return response.text

    @staticmethod
    def _sent(response, sent: Mapping[str, Any] | None) -> dict[str, Any]:
        """What was sent, with the request's method, path, body size and JSON fields added."""
        facts = dict(sent or {})
        if response.request.headers.get("content-type") == "application/json":
            body = json.loads(response.request.read() or b"null")
            facts.update({k: v for k, v in body.items() if k not in facts} if isinstance(body, dict) else {})
        facts.setdefault("method", response.request.method)
        facts.setdefault("path", response.request.url.path)
        length = response.request.headers.get("content-length", "")
        facts.setdefault("body_bytes", int(length) if length.isdigit() else None)
        return facts

    def check(self, response, sent: Mapping[str, Any] | None = None) -> Any:
        """The decoded body of a 2xx answer.

        Raises
        ------
        ServiceError
            For any other answer, with its explanation (what was wrong, the values, the fix).
        """
        body = self._json(response)
        if response.is_success:
            return body
        sent = self._sent(response, sent)
        raise ServiceError(response.status_code, explain_error(response.status_code, body, response.headers, sent),
                           body, sent, retry_after_of(response.headers, body), response.headers.get("x-request-id"))

    def explain(self, response, sent: Mapping[str, Any] | None = None) -> str:
        """An explanation of any answer: errors, and notes on 200s (ignored values, warnings, no polygons).

        ``sent`` is what the request sent (form or query fields; ``filename``,
        ``file_bytes`` and ``file_head`` for the file) so the explanation can name it.
        """
        body = self._json(response)
        sent = self._sent(response, sent)
        if response.is_success:
            notes = explain_success(body, sent) if isinstance(body, dict) else []
            return f"{response.status_code}: OK" + "".join(f"\n- {n}" for n in notes)
        return explain_error(response.status_code, body, response.headers, sent)

    # ---- endpoints -----------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /health`` (``models_loaded`` is a count on the historic service)."""
        return self.check(self._request("GET", "/health"))

    def models(self) -> dict:
        """Model id -> info, from either envelope (``{"models": {...}}`` or the bare mapping)."""
        body = self.check(self._request("GET", "/api/v1/models"))
        return body["models"] if isinstance(body.get("models"), dict) else body

    def status(self) -> dict:
        """``GET /api/v1/status``: idle or processing (readiness and queue too on mlbench's fixed service)."""
        return self.check(self._request("GET", "/api/v1/status"))

    def ready(self) -> tuple[bool, dict]:
        """``(ready, checks)`` from ``/readyz`` (503 is an answer: not ready).

        Raises
        ------
        ServiceError
            When the service has no ``/readyz`` (the historic one answers 405).
        """
        response = self._request("GET", "/readyz")
        if response.status_code not in (200, 503):
            self.check(response)
        body = self._json(response)
        return response.status_code == 200, body.get("checks", body) if isinstance(body, dict) else body

    def metrics(self) -> dict:
        """mlbench's ``/metrics`` as JSON (the historic service has none: 405)."""
        return self.check(self._request("GET", "/metrics", params={"format": "json"}))

    @staticmethod
    def _form(model: str | None, threshold: float, detect_holes: bool) -> tuple[dict, dict]:
        """``(sent, form)``: the fields as sent (for explanations) and as multipart form fields."""
        sent: dict[str, Any] = {"threshold": threshold, "detect_holes": detect_holes}
        form = {"threshold": str(threshold), "detect_holes": str(bool(detect_holes)).lower()}
        if model is not None:
            sent["model"] = form["model"] = model
        return sent, form

    def segment(self, image: Any, model: str | None = None, threshold: float = 0.5, detect_holes: bool = True,
                filename: str | None = None) -> SegmentResult:
        """Segment one image (path, bytes or array) with ``POST /api/v1/segment``.

        ``model=None`` lets the service pick its default (``hrnet`` on the real service).
        Model and threshold always go as multipart form fields (the historic service
        ignores them in the query string).

        Raises
        ------
        ServiceError
            On an error answer, explained with the file's name, size and first bytes.
        """
        name, data = encode_image(image, filename)
        sent, form = self._form(model, threshold, detect_holes)
        sent.update(filename=name, file_bytes=len(data), file_head=data[:64])
        body = self.check(self._request("POST", "/api/v1/segment", sent, files={"file": (name, data)}, data=form), sent)
        return segment_result(body, sent)

    def batch_segment(self, images: Sequence[Any], model: str | None = None, threshold: float = 0.5,
                      detect_holes: bool = True) -> BatchResult:
        """Segment several images (paths, bytes or arrays) in one ``/api/v1/batch-segment`` request.

        A refusal of the whole request (too many files, a bad extension, an invalid field,
        overload) raises :class:`ServiceError`; a file that fails on its own is a
        ServiceError *item* of the returned :class:`BatchResult`, explained like
        :meth:`segment` would explain it. Items are matched to files by ``batch_index``
        and ``filename``; a missing, extra, duplicated or reordered item is reported.

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
        sent, form = self._form(model, threshold, detect_holes)
        sent["filenames"] = [name for name, _ in uploads]
        response = self._request("POST", "/api/v1/batch-segment", sent, files=[("files", upload) for upload in uploads],
                                 data=form)
        body = self.check(response, sent)
        return batch_result(body, uploads, sent, response.headers.get("x-request-id"))

    @staticmethod
    def _batch_upload(index: int, image: Any) -> tuple[str, bytes]:
        """``(filename, bytes)``: a path keeps its name, bytes and arrays are named image_<i>."""
        name, data = encode_image(image)
        return (name if isinstance(image, (str, Path)) else f"image_{index}{Path(name).suffix}"), data

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
