"""What :class:`~mlbench.client.service_client.ServiceClient` returns: an explained error, a segment result,
a batch result whose items are matched to the files sent by ``batch_index`` and ``filename``.

A batch answer is never zipped with the files by position: the historic service once
answered short and reordered, and every result after the gap went to the wrong file.
A missing, extra, duplicated or reordered item is reported, each in its own warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from mlbench.errors import MlbenchError
from mlbench.client.explain import error_code, explain_error, explain_success, retry_after_of
from mlbench.findings import ReportText

__all__ = ["ServiceError", "SegmentResult", "BatchResult", "segment_result", "batch_result"]


class ServiceError(MlbenchError, RuntimeError):
    """An error answer from the service, or none at all; ``str(err)`` is the explanation.

    Attributes
    ----------
    status : HTTP status code (a failed batch item without one: what ``/segment`` answers
        for the same failure, 504 for a timeout, else 500); 0 when no answer came
        (``code`` ``connection_refused``, ``name_not_resolved``, ``tls_error``,
        ``connect_timeout``, ``client_timeout``, ``connection_lost``, ``no_answer``).
    code : the service's own error code (``queue_full``, ``inference_timeout`` ...), else
        one read from its message (``unknown_model``, ``image_error``,
        ``extension_not_allowed`` ...); the client's ``missing_from_answer`` and
        ``duplicated_in_answer`` for a batch file the answer does not settle; or None.
    explanation : what went wrong, with the values, and the fix.
    retry_after : seconds to wait before retrying (429/503), else None.
    body : the decoded body (dict, list or text); ``sent`` : what the request sent.
    """

    def __init__(self, status: int, explanation: str, body: Any, sent: Mapping[str, Any],
                 retry_after: float | None = None, request_id: str | None = None, code: str | None = None) -> None:
        super().__init__(explanation)
        self.status, self.explanation, self.body, self.sent = status, explanation, body, dict(sent)
        self.retry_after = retry_after
        self.request_id = request_id or (body.get("request_id") if isinstance(body, dict) else None)
        self.code = code if code is not None else error_code(status, body, sent)


@dataclass(frozen=True, repr=False)
class SegmentResult(ReportText):
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
        """(H, W) bool mask drawn from the polygons, islands inside holes kept.

        Drawn by :func:`mlbench.checks.polygons.rasterize_polygons`: nesting depth from the
        ``parent_id`` chain (even fills, odd cuts), the even-odd rule without parent ids.
        """
        from mlbench.checks.polygons import rasterize_polygons

        return rasterize_polygons(self.polygons, (self.height, self.width))

    def to_dict(self) -> dict:
        """The service's answer as received."""
        return dict(self.response)

    def text(self) -> str:
        n_ext = sum(p.get("type") == "external" for p in self.polygons)
        notes = "; ".join(self.warnings) or "none"
        return (f"SegmentResult({self.model_used}, {self.width}x{self.height}, threshold {self.threshold_used:g}, "
                f"{len(self.polygons)} polygon(s) ({n_ext} external), warnings: {notes})")


def segment_result(body: Mapping[str, Any], sent: Mapping[str, Any]) -> SegmentResult:
    """A :class:`SegmentResult` from one segment answer (also one item of a batch answer)."""
    size = body.get("image_size", {})
    return SegmentResult(body.get("polygons", []), body.get("model_used", "?"), float(body.get("threshold_used", 0)),
                         int(size.get("width", 0)), int(size.get("height", 0)),
                         float(body.get("processing_time", 0.0)), tuple(explain_success(body, sent)), dict(body))


@dataclass(frozen=True, repr=False)
class BatchResult(ReportText):
    """A parsed ``/api/v1/batch-segment`` answer: one entry per file, in the order sent.

    Attributes
    ----------
    filenames : the name each file was sent under.
    items : for each file, a :class:`SegmentResult`, or a :class:`ServiceError` that explains
        why it failed or why the answer has no single item for it.
    warnings : one sentence per problem of the answer: a missing, extra, duplicated or
        reordered item, counts that disagree, values the service did not use as sent.
    """

    filenames: tuple[str, ...]
    items: tuple[Any, ...]
    warnings: tuple[str, ...] = ()
    response: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        """A unique key per file: its name, with ``(file i)`` added to a name sent twice."""
        return tuple(n if self.filenames.count(n) == 1 else f"{n} (file {i})" for i, n in enumerate(self.filenames))

    @property
    def results(self) -> dict[str, SegmentResult]:
        """The segmented files by label."""
        return {n: item for n, item in zip(self.labels, self.items) if isinstance(item, SegmentResult)}

    @property
    def errors(self) -> dict[str, ServiceError]:
        """The failed or unsettled files by label, each with its explanation."""
        return {n: item for n, item in zip(self.labels, self.items) if isinstance(item, ServiceError)}

    @property
    def ok(self) -> bool:
        """Every file has its own successful result."""
        return not self.errors

    def to_dict(self) -> dict:
        """The service's batch answer as received."""
        return dict(self.response)

    def text(self) -> str:
        lines = [f"BatchResult: {len(self.results)} of {len(self.items)} file(s) segmented"]
        for name, item in zip(self.labels, self.items):
            text = repr(item) if isinstance(item, SegmentResult) else item.explanation.splitlines()[0]
            lines.append(f"- {name}: {text}")
        lines += ["warnings:"] + [f"  - {w}" for w in self.warnings] if self.warnings else []
        return "\n".join(lines)


def _claim(k: int, item: Any, filenames: Sequence[str], taken: dict[str, int]) -> tuple[int | None, str | None]:
    """``(file index, problem)`` for answer item ``k``: matched by batch_index and filename."""
    if not isinstance(item, Mapping):
        return None, f"answer item {k} is not an object ({str(item)[:60]!r}): not attributed to any file"
    n, index, name = len(filenames), item.get("batch_index"), item.get("filename")
    if isinstance(index, int) and not isinstance(index, bool):
        if not 0 <= index < n:
            return None, (f"answer item {k} has batch_index {index} (filename {name!r}) but {n} file(s) were sent "
                          f"(batch_index 0..{n - 1}): an extra item, not attributed to any file")
        if name is not None and name != filenames[index]:
            return None, (f"answer item {k} has batch_index {index} and filename {name!r}, but file {index} was sent "
                          f"as {filenames[index]!r}: the two disagree, so the item is not attributed to any file")
        return index, None
    if name is None:
        return None, f"answer item {k} has neither filename nor batch_index: it cannot be matched to a file"
    positions = [i for i, sent in enumerate(filenames) if sent == name]
    if not positions:
        return None, f"answer item {k} is for {name!r}, which was not sent (sent: {list(filenames)}): an extra item"
    if len(positions) == 1:
        return positions[0], None
    nth = taken.get(name, 0)
    taken[name] = nth + 1
    index = positions[min(nth, len(positions) - 1)]
    return index, (f"{name!r} was sent {len(positions)} times and answer item {k} has no batch_index: paired with "
                   f"file {index} by order of occurrence")


def _unsettled(i: int, name: str, claims: list[int], n_items: int, n_files: int) -> tuple[str, str]:
    """``(code, explanation)`` for a file with no answer item or more than one."""
    if not claims:
        return "missing_from_answer", (
            f"200: the answer has no item for {name!r} (file {i}, batch_index {i}); it answered {n_items} item(s) for "
            f"{n_files} file(s) sent. This file's result is unknown: do not assume it succeeded. Fix: send it again")
    return "duplicated_in_answer", (
        f"200: the answer has {len(claims)} items for {name!r} (file {i}, batch_index {i}: answer items "
        f"{claims}); which one is right cannot be told, so none is used. Fix: send this file again on its own")


def _item(item: Mapping[str, Any], one: Mapping[str, Any], request_id: str | None) -> Any:
    """One file's answer item: a SegmentResult, or a ServiceError explained like a single request's."""
    status = int(item.get("status", 500 if item.get("success") is False else 200))
    if status < 400 and item.get("success") is not False:
        return segment_result(item, one)
    if "status" not in item or status < 400:  # the historic items carry no status: what /segment would answer
        status = 504 if error_code(500, item, one) == "inference_timeout" else 500
    return ServiceError(status, explain_error(status, item, {}, one), dict(item), one, retry_after_of({}, item),
                        item.get("request_id") or request_id)


def _count_problems(body: Mapping[str, Any], n_items: int, n_files: int, parsed: Sequence[Any]) -> list[str]:
    found = [f"the answer has {n_items} item(s) for {n_files} file(s) sent"] if n_items != n_files else []
    declared = body.get("batch_size", body.get("total"))
    if declared is not None and declared != n_files:
        found.append(f"the answer says batch_size={declared} but {n_files} file(s) were sent")
    said = body.get("successful_count", body.get("successful"))
    matched = sum(isinstance(item, SegmentResult) for item in parsed)
    if said is not None and said != matched:
        found.append(f"the answer says {said} file(s) succeeded but {matched} file(s) have a successful item")
    return found


def batch_result(body: Any, files: Sequence[tuple[str, bytes]], sent: Mapping[str, Any],
                 request_id: str | None = None) -> BatchResult:
    """Match a batch answer's items to the files sent (by ``batch_index`` and ``filename``).

    Parameters
    ----------
    body : the decoded 200 answer (``{results: [...], ...}``, or a bare list of items).
    files : the ``(filename, bytes)`` uploads, in the order sent.
    sent : the form fields sent (``model``, ``threshold``, ``detect_holes``).
    request_id : the answer's request id, given to the errors of items without their own.
    """
    body = body if isinstance(body, dict) else {"results": body}
    items, names = list(body.get("results") or []), [name for name, _ in files]
    claims: list[list[int]] = [[] for _ in names]
    warnings, taken, order = [], {}, []
    for k, item in enumerate(items):
        index, problem = _claim(k, item, names, taken)
        warnings += [problem] if problem else []
        if index is not None:
            claims[index].append(k)
            order.append(index)
    if order != sorted(order):
        warnings.append(f"the answer lists the files in another order than sent (file indexes in answer order: "
                        f"{order}); each item was matched by its batch_index and filename, not by position")
    fields = {k: v for k, v in sent.items() if k not in ("filenames", "body_bytes")}
    parsed = []
    for i, ((name, data), found) in enumerate(zip(files, claims)):
        one = {**fields, "filename": name, "file_bytes": len(data), "file_head": data[:64], "batch_index": i}
        if len(found) == 1:
            parsed.append(_item(items[found[0]], one, request_id))
            continue
        code, text = _unsettled(i, name, found, len(items), len(names))
        warnings.append(text.split(": ", 1)[1].split(". Fix")[0])
        parsed.append(ServiceError(200, text, [items[k] for k in found], one, request_id=request_id, code=code))
    warnings = _count_problems(body, len(items), len(names), parsed) + warnings
    warnings += [f"batch: {note}" for note in explain_success({k: v for k, v in body.items() if k != "results"}, sent)]
    return BatchResult(tuple(names), tuple(parsed), tuple(warnings), body)
